"""Head scores, one module per family of scores; importing the package registers them all.

  base.py       the protocol (Scorer, PromptBatch, StepView), the registry, the accumulation rule
  retrieval.py  retrieval (Wu et al. 2024) and r2 (HeadKV)
  reasoning.py  reasoning
  query.py      query (QRHead)
  pattern.py    previous_token, duplicate_token, induction, echo
  segments.py   reasoning_focus, receiver: think and answer segments of reasoning models

May import: the foundation modules only (errors, validate, ...): a scorer is a pure function of what a step shows it.
"""
from .base import SCORERS, PromptBatch, Scorer, StepView, keeps_zeros, load_scorer, register_scorer
from .pattern import DuplicateTokenScorer, EchoScorer, InductionScorer, PatternScorer, PreviousTokenScorer
from .query import QueryScorer
from .reasoning import ReasoningScorer
from .retrieval import R2Scorer, RetrievalScorer
from .segments import ReasoningFocusScorer, ReceiverScorer

__all__ = ["SCORERS", "PromptBatch", "Scorer", "StepView", "keeps_zeros", "load_scorer", "register_scorer",
           "RetrievalScorer", "R2Scorer", "ReasoningScorer", "QueryScorer", "PatternScorer", "PreviousTokenScorer",
           "DuplicateTokenScorer", "InductionScorer", "EchoScorer", "ReasoningFocusScorer", "ReceiverScorer"]
