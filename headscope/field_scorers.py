"""The other head scores of the literature, on the same engine: HeadKV's retrieval-reasoning (r2),
QRHead's query-focused retrieval, and the pattern heads of TransformerLens / RazorAttention.

Every formula below reads A[l, h, i, j], the softmax attention of head h in layer l from query
position i to key position j (padded coordinates), and is computed with tensor operations over all
layers' heads at once, from the rows the recorder hands over (decode.py): the top-k of each decoding
step, or blocks of prefill rows -- never the whole T x T matrix.
"""
from __future__ import annotations

import torch

from .errors import HeadscopeError
from .scorers import PromptBatch, Scorer, _in_span, register_scorer


@register_scorer
class R2Scorer(Scorer):
    """Retrieval-reasoning score (Fu et al. 2024, "Not All Heads Matter", HeadKV; code: FYYFU/HeadKV).

    With the needle at prompt positions [ns, ne) and y_s the token written at step s:
        score[l, h] += 1 / (ne - ns) * sum(A[l, h, i] for i in topk_{ne - ns}(A[l, h, :]) if ns <= i < ne)
    The attention mass the head's top-|needle| positions put on the needle, with no copy condition:
    on needles whose answer needs a comparison (bundled: data/needles_r2.jsonl) the heads that read
    the facts without copying them count too. k differs per sample; `begin` asks the recorder for the
    batch's longest needle and each sample keeps its own first |needle| positions.
    """

    name = "r2"
    keep_zeros = True

    def begin(self, batch: PromptBatch, num_layers: int, num_heads: int) -> None:
        super().begin(batch, num_layers, num_heads)
        self.needle_len = (batch.span_end - batch.span_start).clamp(min=1)  # (batch,)
        self.top_k = int(self.needle_len.max())

    def step_scores(self, view) -> torch.Tensor:
        k = view.values.shape[-1]
        rank = torch.arange(k, device=view.values.device).view(1, 1, 1, k)
        in_top = rank < self.needle_len.view(1, -1, 1, 1)  # each sample's own k = its needle length
        on_needle = _in_span(view.positions, self.batch.span_start, self.batch.span_end)
        mass = (view.values * (in_top & on_needle)).sum(-1)  # (layers, batch, heads)
        return mass / self.needle_len.view(1, -1, 1).float()


@register_scorer
class QueryScorer(Scorer):
    """Query-focused retrieval score (Wu et al. 2025, "Query-Focused Retrieval Heads Improve Long-Context
    Reasoning and Re-ranking", QRHead; code: princeton-pli/QRHead).

    With the question at query positions Q, the documents d_1..d_m (key spans) and the gold ones G:
        s(l, h, d)  = 1/|Q|  * sum_{i in Q}  sum_{j in d} A[l, h, i, j]          (query -> document attention)
        s0(l, h, d) = 1/|Q0| * sum_{i in Q0} sum_{j in d} A0[l, h, i, j]         (the same, question -> "N/A")
        score[l, h] = sum_{d in G} s(l, h, d) - s0(l, h, d)
    A0 is the attention of the same prompt with the question replaced by the null question "N/A" (the
    calibration of in-context re-ranking, Chen et al. 2024); as the documents come before the question
    they keep their positions. Only the question's rows are computed (prefill rows); the null prompt is
    the scorer's `calibration_prompt`, prefilled once more by decode.py. Differences from QRHead's code:
    Q is the question's tokens (QRHead's query span also holds the instruction, "Query:" and the chat
    suffix after the documents), and its retriever's outlier masking of calibrated document tokens
    (below mean - 2 std) is left out, so the score is linear in the attention.

    Samples come from the `query` task: meta["documents"] holds each document's [start, end) token span,
    meta["gold"] the gold documents' indices, meta["null_question_ids"] the tokens of the null question
    (the engine's span is the question).
    """

    name = "query"
    keep_zeros = True

    def begin(self, batch: PromptBatch, num_layers: int, num_heads: int) -> None:
        super().begin(batch, num_layers, num_heads)
        device, width = batch.input_ids.device, batch.prompt_len
        pad = batch.pad if batch.pad is not None else torch.zeros_like(batch.span_start)
        for sample in batch.samples:
            if "documents" not in sample.meta or "null_question_ids" not in sample.meta:
                raise HeadscopeError("the query scorer needs the query task's samples (documents, gold, null question)")
        # The null prompt: each prompt with its question tokens swapped for the null question's.
        null_prompts, null_questions = [], []
        for b, sample in enumerate(batch.samples):
            ids = batch.input_ids[b, int(pad[b]):].tolist()
            start, end = int(batch.span_start[b] - pad[b]), int(batch.span_end[b] - pad[b])
            null = sample.meta["null_question_ids"]
            null_prompts.append(ids[:start] + null + ids[end:])
            null_questions.append((start, start + len(null)))
        null_width = max(len(ids) for ids in null_prompts)
        null_ids = torch.full((len(null_prompts), null_width), int(batch.input_ids[0, 0]), dtype=torch.long)
        null_mask = torch.zeros_like(null_ids)
        null_pad = [null_width - len(ids) for ids in null_prompts]
        for b, ids in enumerate(null_prompts):
            null_ids[b, null_pad[b]:] = torch.tensor(ids)
            null_mask[b, null_pad[b]:] = 1
        self.null_ids, self.null_mask = null_ids.to(device), null_mask.to(device)
        self.null_start = torch.tensor([s + p for (s, _), p in zip(null_questions, null_pad)], device=device)
        self.null_end = torch.tensor([e + p for (_, e), p in zip(null_questions, null_pad)], device=device)
        # Gold document keys, in both prompts' padded coordinates.
        self.gold_keys = torch.zeros(len(null_prompts), width, device=device)
        self.null_gold_keys = torch.zeros(len(null_prompts), null_width, device=device)
        for b, sample in enumerate(batch.samples):
            for g in sample.meta["gold"]:
                start, end = sample.meta["documents"][g]
                self.gold_keys[b, int(pad[b]) + start:int(pad[b]) + end] = 1.0
                self.null_gold_keys[b, null_pad[b] + start:null_pad[b] + end] = 1.0
        self.null_total = torch.zeros_like(self.total)

    def prefill_queries(self) -> tuple[int, int]:
        return int(self.batch.span_start.min()), int(self.batch.span_end.max())

    def calibration_prompt(self):
        mask = None if bool(self.null_mask.all()) else self.null_mask
        return self.null_ids, mask, (int(self.null_start.min()), int(self.null_end.max()))

    @staticmethod
    def _gold_mass(probs, query_start, gold_keys, start, end) -> torch.Tensor:
        """(batch, heads): sum over this block's question rows of the attention on the gold documents."""
        kv_len, device = probs.shape[-1], probs.device  # the layer's device (models split over GPUs)
        mass = (probs * gold_keys[:, None, None, :kv_len].to(device)).sum(-1)  # (batch, heads, block)
        query = torch.arange(query_start, query_start + probs.shape[2], device=device)
        start, end = start.to(device)[:, None], end.to(device)[:, None]
        in_question = (query[None, :] >= start) & (query[None, :] < end)  # (batch, block)
        return (mass * in_question[:, None, :]).sum(-1)

    def prefill_rows(self, layer, query_start, probs) -> None:
        mass = self._gold_mass(probs, query_start, self.gold_keys, self.batch.span_start, self.batch.span_end)
        self.total[:, layer] += mass.to(self.total.device)

    def calibration_rows(self, layer, query_start, probs) -> None:
        mass = self._gold_mass(probs, query_start, self.null_gold_keys, self.null_start, self.null_end)
        self.null_total[:, layer] += mass.to(self.null_total.device)

    def step(self, view) -> None:  # the score is the prefill's
        pass

    def result(self) -> torch.Tensor:
        question = (self.batch.span_end - self.batch.span_start).clamp(min=1).float().view(-1, 1, 1)
        null_question = (self.null_end - self.null_start).clamp(min=1).float().view(-1, 1, 1)
        return self.total / question - self.null_total / null_question


class PatternScorer(Scorer):
    """Base of the pattern-head scores, on the `pattern` task's prompts: a block of n random tokens
    repeated R times at the end of the prompt (after BOS), the sequence starting at position t0.

    For query position i, the score of a head is sum_{d in offsets} A[i, i - d] (keys i - d >= t0 only),
    averaged over the query positions i >= t0 + first; a subclass gives `offsets(n, R)` and `first(n)`.
    The rows come from the prefill, block by block; the last position's is decoding step 0's.
    """

    keep_zeros = True

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
        return self.t0 + self.first(self.n), self.batch.prompt_len

    def prefill_rows(self, layer, query_start, probs) -> None:
        batch, heads, block, _ = probs.shape
        query = torch.arange(query_start, query_start + block, device=probs.device)
        score = probs.new_zeros(batch, heads, block)
        for d in self.offsets(self.n, self.repeats):  # a few diagonals, each one gather over every head
            key = query - d
            index = key.clamp(min=0).view(1, 1, block, 1).expand(batch, heads, block, 1)
            score += probs.gather(-1, index).squeeze(-1) * (key >= self.t0)
        self.total[:, layer] += score.sum(-1).to(self.total.device)  # the layer may sit on another GPU

    def step(self, view) -> None:  # the score is the prompt's
        pass

    def result(self) -> torch.Tensor:
        return self.total / (self.batch.prompt_len - self.t0 - self.first(self.n))


@register_scorer
class PreviousTokenScorer(PatternScorer):
    """Previous-token score: mean over positions i >= t0 + 1 of A[i, i - 1] (TransformerLens head_detector)."""

    name = "previous_token"

    def offsets(self, n, repeats):
        return [1]

    def first(self, n):
        return 1


@register_scorer
class DuplicateTokenScorer(PatternScorer):
    """Duplicate-token score: mean over the repeats r >= 1 of A[i, i - n], the same token one repeat earlier
    (TransformerLens head_detector)."""

    name = "duplicate_token"

    def offsets(self, n, repeats):
        return [n]


@register_scorer
class InductionScorer(PatternScorer):
    """Induction score: mean over the repeats r >= 1 of A[i, i - n + 1], the token that followed the
    current token's previous occurrence (Olsson et al. 2022; TransformerLens head_detector)."""

    name = "induction"

    def offsets(self, n, repeats):
        if n < 2:
            raise HeadscopeError("induction needs a block length of at least 2")
        return [n - 1]


@register_scorer
class EchoScorer(PatternScorer):
    """Echo score (RazorAttention, Tang et al. 2024): mean over the repeats r >= 1 of
    sum_{r' < r} A[i, i - (r - r') n], the attention on every earlier occurrence of the current token."""

    name = "echo"

    def offsets(self, n, repeats):
        return [m * n for m in range(1, repeats)]


def kv_head_max(scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Scores (..., heads) -> (..., kv_heads): the max over the query heads that share a KV head
    (RazorAttention keeps a KV head whole if any of its query heads is an echo or induction head).
    Query head h reads KV head h // (heads / kv_heads), transformers' repeat_kv order."""
    heads = scores.shape[-1]
    if heads % num_kv_heads:
        raise HeadscopeError(f"{heads} heads do not split into {num_kv_heads} KV heads")
    return scores.reshape(*scores.shape[:-1], num_kv_heads, heads // num_kv_heads).amax(-1)
