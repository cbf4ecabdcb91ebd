"""Tasks: small declarative pieces that turn options and data into `Sample`s for the one engine.

Each module defines its options dataclass, its prompt builder and registers itself (tasks/base.py);
importing this package registers the built-in ones. `spans.py` encodes a prompt and finds a span's tokens in it.

May import: `options` (the options every task declares), `scorers` and the foundation modules.
"""
from . import pattern, query, reasoning, retrieval  # noqa: F401  (registration)
from .base import DATA_DIR, TASKS, Sample, Task, register_task

__all__ = ["DATA_DIR", "TASKS", "Sample", "Task", "register_task"]
