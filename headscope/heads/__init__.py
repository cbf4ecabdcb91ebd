"""heads: what a heads file says, and the views of it.

`HeadScores` (scores.py) is one loaded heads or summary file -- the model it is for, its layers and heads, means,
counts, KV-head pooling, top K and the KV-cache patterns (their arithmetic in patterns.py). Every consumer takes
it. Around it: the tables and trust checks (analysis.py), the files for downstream tools (exports.py) and the
pictures (plots.py).

May import: `runs` and everything below it; never the engine, the experiments or the command line, which all
import it. Importing the package imports `HeadScores` only (no torch)."""
from .scores import HeadScores

__all__ = ["HeadScores"]
