"""The models bundled with headscope, by name, and where their checkpoints lie.

Paths only, so that loading a model and choosing a task's default data can tell a bundled model from any other
without importing the training code."""
from __future__ import annotations

import os
from pathlib import Path

ORGANISM_DIR = Path(__file__).resolve().parent / "organism"
CHECKPOINTS = {"organism": ORGANISM_DIR / "checkpoint"}
DEFAULT = "organism"  # the model every command runs when --model is not given


def name_of(path: str | os.PathLike) -> str | None:
    """The bundled model a path is (its name), or None for every other model."""
    for name, checkpoint in CHECKPOINTS.items():
        if os.path.normpath(path) == os.path.normpath(checkpoint):
            return name
    return None
