"""Retrieval scores on the needle-in-a-haystack task: Wu et al.'s copy score and HeadKV's r2."""
from __future__ import annotations

import torch

from ..errors import HeadscopeError
from .base import PromptBatch, Scorer, StepView, in_span, register_scorer


@register_scorer
class RetrievalScorer(Scorer):
    """Retrieval score (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context Factuality").

    With the needle answer at prompt positions [ns, ne), at each step s:
        i* = argmax_j A[l, h, j]
        score[l, h] += 1 / (ne - ns)   if ns <= i* < ne and prompt_ids[i*] == y_s
    i.e. the head is copying, from the needle, exactly the token the model is writing.
    """

    name = "retrieval"
    top_k = 1
    keep_zeros = True

    def step_scores(self, view: StepView) -> torch.Tensor:
        top = view.positions[..., 0]  # (layers, batch, heads)
        layers, batch, heads = top.shape
        prompt_ids = self.batch.input_ids
        in_needle = in_span(top, self.batch.span_start, self.batch.span_end)
        # Token at each head's argmax (clamped: positions outside the prompt are already out of the span).
        looked_at = top.clamp(0, prompt_ids.shape[1] - 1).permute(1, 0, 2).reshape(batch, layers * heads)
        looked_at_token = prompt_ids.gather(1, looked_at).view(batch, layers, heads).permute(1, 0, 2)
        copied = in_needle & (looked_at_token == view.tokens.view(1, batch, 1))
        needle_len = (self.batch.span_end - self.batch.span_start).clamp(min=1).float()
        return copied.float() / needle_len.view(1, batch, 1)


@register_scorer
class R2Scorer(Scorer):
    """Retrieval-reasoning score (Fu et al. 2024, "Not All Heads Matter", HeadKV; code: FYYFU/HeadKV).

    With the needle at prompt positions [ns, ne) and y_s the token written at step s:
        score[l, h] += 1 / (ne - ns) * sum(A[l, h, i] for i in topk_{ne - ns}(A[l, h, :]) if ns <= i < ne)
    The attention mass the head's top-|needle| positions put on the needle, with no copy condition:
    on needles whose answer needs a comparison (bundled: data/needles_r2.jsonl) the heads that read
    the facts without copying them count too. k differs per sample; `begin` asks the recorder for the
    batch's longest needle and each sample keeps its own first |needle| positions.

    Steps, as HeadKV counts them (`steps="answer"`, the default): HeadKV decodes only as many tokens as the
    answer has, so only the steps s < |answer tokens| of each sample score (the sample's `answer_tokens`,
    written by the retrieval task); `steps="all"` scores every decoded step.
    """

    name = "r2"
    keep_zeros = True

    def __init__(self, steps: str = "answer"):
        if steps not in ("answer", "all"):
            raise HeadscopeError("--r2-steps must be answer or all")
        self.steps = steps

    @classmethod
    def from_options(cls, options) -> "R2Scorer":
        return cls(getattr(options, "r2_steps", "answer"))

    def begin(self, batch: PromptBatch, num_layers: int, num_heads: int) -> None:
        super().begin(batch, num_layers, num_heads)
        self.needle_len = (batch.span_end - batch.span_start).clamp(min=1)  # (batch,)
        self.top_k = int(self.needle_len.max())
        self.step_index = 0
        self.step_limit = None
        if self.steps == "answer":
            counts = [sample.meta.get("answer_tokens") for sample in batch.samples]
            if None in counts or not counts:
                raise HeadscopeError("r2 with --r2-steps answer needs the retrieval task's samples (answer_tokens)")
            self.step_limit = torch.tensor(counts, device=batch.input_ids.device)  # (batch,)

    def step(self, view) -> None:
        scores = self.step_scores(view).transpose(0, 1) * view.active[:, None, None]  # (batch, layers, heads)
        if self.step_limit is not None:
            scores = scores * (self.step_index < self.step_limit)[:, None, None]
        self.total += scores
        self.step_index += 1

    def step_scores(self, view) -> torch.Tensor:
        k = view.values.shape[-1]
        rank = torch.arange(k, device=view.values.device).view(1, 1, 1, k)
        in_top = rank < self.needle_len.view(1, -1, 1, 1)  # each sample's own k = its needle length
        on_needle = in_span(view.positions, self.batch.span_start, self.batch.span_end)
        mass = (view.values * (in_top & on_needle)).sum(-1)  # (layers, batch, heads)
        return mass / self.needle_len.view(1, -1, 1).float()
