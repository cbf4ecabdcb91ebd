"""What a score file holds and what is made of it: `HeadScores` (scores.py), one loaded heads or summary file --
the model it is for, its layers and heads, means, counts, KV-head pooling, top K and the KV-cache patterns -- and
the pattern arithmetic those use (patterns.py).

May import: errors, schema, outputs, store (the run folder) -- never the engine, the experiments (ablation,
kv_curve, specificity, rescore, check), the command line or the report, which all import it.
"""
from .scores import HeadScores

__all__ = ["HeadScores"]
