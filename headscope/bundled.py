"""The models bundled with headscope, by name, and where their checkpoints lie.

Paths only, so that loading a model and choosing a task's default data can tell a bundled model from any other
without importing the training code."""
from __future__ import annotations

import os
from pathlib import Path

ORGANISM_DIR = Path(__file__).resolve().parent / "organism"
CHECKPOINTS = {"organism": ORGANISM_DIR / "checkpoint",  # retrieval and one-line reasoning (organism/train.py)
               "thinker": ORGANISM_DIR / "thinker_checkpoint"}  # think blocks with planted anchors (organism/thinker.py)
DEFAULT = "organism"  # the model every command runs when --model is not given


def path_of(model: str | os.PathLike | None) -> str:
    """Where a --model value loads from: none is the default organism; a bundled name ("thinker") is its checkpoint
    unless a folder of that name is here; anything else as given (a folder or a hub id)."""
    if model is None:
        return str(CHECKPOINTS[DEFAULT])
    if str(model) in CHECKPOINTS and not os.path.isdir(model):
        return str(CHECKPOINTS[str(model)])
    return str(model)


def name_of(model: str | os.PathLike | None) -> str | None:
    """The bundled model a --model value or path is (its name), or None for every other model."""
    for name, checkpoint in CHECKPOINTS.items():
        if os.path.normpath(path_of(model)) == os.path.normpath(checkpoint):
            return name
    return None
