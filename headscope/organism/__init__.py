"""The bundled "model organism": a small Llama trained on a synthetic world whose retrieval and
reasoning skills are real, so headscope's detectors find real heads with no download."""

from pathlib import Path

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"
THINKER_DIR = Path(__file__).resolve().parent / "thinker_checkpoint"  # the thinking organism (thinker.py)

__all__ = ["CHECKPOINT_DIR", "THINKER_DIR"]
