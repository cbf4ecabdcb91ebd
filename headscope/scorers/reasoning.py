"""The reasoning score: top-k attention mass on the model's own generated tokens plus the question."""
from __future__ import annotations

import torch

from .base import Scorer, StepView, in_span, register_scorer


@register_scorer
class ReasoningScorer(Scorer):
    """Reasoning score: top-k attention mass on the model's own generated tokens plus the question.

    With the question at [qs, qe) and the prompt ending at prompt_len, at each step s:
        T = the top-k positions of A[l, h, :]
        score[l, h] += generated_weight * sum(A[i] for i in T if i >= prompt_len)
                     + query_weight     * sum(A[i] for i in T if qs <= i < qe)
    (positions >= prompt_len are the generated tokens fed so far, the current one included).
    Only heads with a score > 0 join a head's list, unless `keep_zeros`.

    With `exclude_current_token`, the position of the token being fed at step s (prompt_len + s - 1) is not
    counted as generated: a head that attends to its own position no longer collects about 1 per step.
    """

    name = "reasoning"
    keep_zeros = False

    @classmethod
    def from_options(cls, options) -> "ReasoningScorer":
        names = ("top_k", "generated_weight", "query_weight", "keep_zeros", "exclude_current_token")
        return cls(**{name: getattr(options, name) for name in names if hasattr(options, name)})

    def __init__(self, top_k: int = 5, generated_weight: float = 1.0, query_weight: float = 0.5,
                 keep_zeros: bool = False, exclude_current_token: bool = False):
        self.top_k = top_k
        self.generated_weight = generated_weight
        self.query_weight = query_weight
        self.keep_zeros = keep_zeros
        self.exclude_current_token = exclude_current_token

    def begin(self, batch, num_layers: int, num_heads: int) -> None:
        super().begin(batch, num_layers, num_heads)
        self.step_index = 0

    def step(self, view: StepView) -> None:
        super().step(view)
        self.step_index += 1

    def step_scores(self, view: StepView) -> torch.Tensor:
        values = view.values[..., : self.top_k]  # (layers, batch, heads, k)
        positions = view.positions[..., : self.top_k]
        on_generated = positions >= self.batch.prompt_len
        if self.exclude_current_token:  # the token fed at this step sits at prompt_len + step - 1
            on_generated = on_generated & (positions != self.batch.prompt_len + self.step_index - 1)
        on_question = in_span(positions, self.batch.span_start, self.batch.span_end)
        weights = self.generated_weight * on_generated + self.query_weight * on_question
        return (values * weights).sum(-1)
