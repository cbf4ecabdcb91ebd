"""The bundled model organisms: small Llamas trained on a synthetic world whose skills are real, so headscope's
detectors find real heads with no download -- the organism (retrieval and one-line reasoning) and the thinker
(think blocks whose later sentences must read planted anchor sentences: ground truth for the reasoning-model
scorers).

`synth` writes the organism's world and the bundled data, `train` trains and evaluates it; `thinker` does the same
for the thinker. May import: `experiments` and everything below it (the evaluators run the detection engine)."""

from ..bundled import CHECKPOINTS

CHECKPOINT_DIR = CHECKPOINTS["organism"]
THINKER_DIR = CHECKPOINTS["thinker"]

__all__ = ["CHECKPOINT_DIR", "THINKER_DIR"]
