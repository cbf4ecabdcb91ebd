"""Pattern heads on repeated random blocks: previous-token, duplicate-token, induction and echo
(TransformerLens `head_detector`, Olsson et al. 2022, RazorAttention)."""
from __future__ import annotations

import torch

from ..errors import HeadscopeError
from .base import PromptBatch, Scorer, register_scorer


class PatternScorer(Scorer):
    """Base of the pattern-head scores, on the `pattern` task's prompts: a block of n random tokens
    repeated R times at the end of the prompt (after BOS), the sequence starting at position t0.

    headscope's convention: for query position i, the score of a head is sum_{d in offsets} A[i, i - d]
    (keys i - d >= t0 only), averaged over the query positions i >= t0 + first; a subclass gives
    `offsets(n, R)` and `first(n)`.
    TransformerLens' convention (`head_detector.detect_head`, error_measure="mul", exclude_bos=False,
    exclude_current_token=False): sum_{i, j} A[i, j] D[i, j] / T over every row of the T-token sequence
    (BOS included), with the 0/1 detection pattern D of the subclass's `tl_pattern` built from the tokens.
    The rows come from the prefill, block by block; the last position's is decoding step 0's.
    """

    reads_top_k = False  # its score never reads the step's top-k view (no tie of it to count)
    keep_zeros = True
    CONVENTIONS = ("headscope", "transformerlens")

    def __init__(self, convention: str = "headscope"):
        if convention not in self.CONVENTIONS:
            raise HeadscopeError(f"--pattern-convention must be one of {', '.join(self.CONVENTIONS)}")
        self.convention = convention

    @classmethod
    def from_options(cls, options) -> "PatternScorer":
        return cls(getattr(options, "pattern_convention", "headscope"))

    def tl_pattern(self, ids: torch.Tensor, query: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """(batch, block, kv_len) bool: D[i, j] for the queries `query` over keys 0..kv_len-1; ids (batch, kv_len)."""
        raise HeadscopeError(f"{self.name} has no TransformerLens definition: use --pattern-convention headscope")

    def offsets(self, n: int, repeats: int) -> list[int]:
        raise NotImplementedError

    def first(self, n: int) -> int:
        return n  # queries of the repeats r >= 1

    def begin(self, batch: PromptBatch, num_layers: int, num_heads: int) -> None:
        super().begin(batch, num_layers, num_heads)
        shapes = {(s.meta.get("block_length"), s.meta.get("repeats")) for s in batch.samples}
        if len(shapes) != 1 or None in next(iter(shapes)):
            raise HeadscopeError(f"the {self.name} scorer needs the pattern task's samples (block_length, repeats)")
        self.n, self.repeats = next(iter(shapes))
        self.t0 = batch.prompt_len - self.n * self.repeats

    def prefill_queries(self) -> tuple[int, int]:
        if self.convention == "transformerlens":
            return 0, self.batch.prompt_len  # every row (padding rows are zero)
        return self.t0 + self.first(self.n), self.batch.prompt_len

    def prefill_rows(self, layer, query_start, probs) -> None:
        batch, heads, block, kv_len = probs.shape
        query = torch.arange(query_start, query_start + block, device=probs.device)
        if self.convention == "transformerlens":
            ids = self.batch.input_ids[:, :kv_len].to(probs.device)
            pad = (self.batch.pad if self.batch.pad is not None else torch.zeros(batch, dtype=torch.long))
            pattern = self.tl_pattern(ids, query, pad.to(probs.device).view(batch, 1, 1))  # (batch, block, kv_len)
            score = (probs * pattern[:, None]).sum((-1, -2))  # (batch, heads)
            self.total[:, layer] += score.to(self.total.device)
            return
        score = probs.new_zeros(batch, heads, block)
        for d in self.offsets(self.n, self.repeats):  # a few diagonals, each one gather over every head
            key = query - d
            index = key.clamp(min=0).view(1, 1, block, 1).expand(batch, heads, block, 1)
            score += probs.gather(-1, index).squeeze(-1) * (key >= self.t0)
        self.total[:, layer] += score.sum(-1).to(self.total.device)  # the layer may sit on another GPU

    def step(self, view) -> None:  # the score is the prompt's
        pass

    def result(self) -> torch.Tensor:
        if self.convention == "transformerlens":  # divided by the sum of the pattern: one per real row
            pad = self.batch.pad if self.batch.pad is not None else torch.zeros(len(self.total), dtype=torch.long)
            return self.total / (self.batch.prompt_len - pad.to(self.total.device)).view(-1, 1, 1)
        return self.total / (self.batch.prompt_len - self.t0 - self.first(self.n))


def _same_token(ids, query, pad) -> torch.Tensor:
    """(batch, block, kv_len) bool: key j holds the query's token, j < i, and j is not padding."""
    keys = torch.arange(ids.shape[1], device=ids.device)
    same = ids.gather(1, query.view(1, -1).expand(len(ids), -1))[:, :, None] == ids[:, None, :]
    return same & (keys[None, None, :] < query[None, :, None]) & (keys[None, None, :] >= pad)


@register_scorer
class PreviousTokenScorer(PatternScorer):
    """Previous-token score: mean over positions i >= t0 + 1 of A[i, i - 1] (TransformerLens head_detector)."""

    name = "previous_token"

    def offsets(self, n, repeats):
        return [1]

    def first(self, n):
        return 1

    def tl_pattern(self, ids, query, pad):  # D[i, i - 1] = 1 for every i after the first token (BOS included)
        keys = torch.arange(ids.shape[1], device=ids.device)
        return (keys[None, None, :] == query[None, :, None] - 1) & (keys[None, None, :] >= pad)


@register_scorer
class DuplicateTokenScorer(PatternScorer):
    """Duplicate-token score: mean over the repeats r >= 1 of A[i, i - n], the same token one repeat earlier
    (TransformerLens head_detector)."""

    name = "duplicate_token"

    def offsets(self, n, repeats):
        return [n]

    def tl_pattern(self, ids, query, pad):  # D[i, j] = 1 for every earlier occurrence j of token i
        return _same_token(ids, query, pad)


@register_scorer
class InductionScorer(PatternScorer):
    """Induction score: mean over the repeats r >= 1 of A[i, i - n + 1], the token that followed the
    current token's previous occurrence (Olsson et al. 2022; TransformerLens head_detector)."""

    name = "induction"

    def offsets(self, n, repeats):
        if n < 2:
            raise HeadscopeError("induction needs a block length of at least 2")
        return [n - 1]

    def tl_pattern(self, ids, query, pad):  # D[i, j] = 1 where j - 1 is an earlier occurrence of token i
        shifted = torch.nn.functional.pad(_same_token(ids, query, pad)[..., :-1], (1, 0))  # column j <- j - 1
        return shifted & (torch.arange(ids.shape[1], device=ids.device)[None, None, :] <= query[None, :, None])


@register_scorer
class EchoScorer(PatternScorer):
    """Echo score (RazorAttention, Tang et al. 2024): mean over the repeats r >= 1 of
    sum_{r' < r} A[i, i - (r - r') n], the attention on every earlier occurrence of the current token."""

    name = "echo"

    def offsets(self, n, repeats):
        return [m * n for m in range(1, repeats)]
