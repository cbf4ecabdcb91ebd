"""The bundled "model organism": a small Llama trained on a synthetic world whose retrieval and
reasoning skills are real, so headscope's detectors find real heads with no download.

`synth` writes its world and the bundled data, `train` trains and evaluates it.
May import: `experiments` and everything below it (its evaluator runs the detection engine)."""

from ..bundled import CHECKPOINTS

CHECKPOINT_DIR = CHECKPOINTS["organism"]

__all__ = ["CHECKPOINT_DIR"]
