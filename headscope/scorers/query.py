"""QRHead's query-focused retrieval score: question-to-gold-document attention against a null question's."""
from __future__ import annotations

import torch

from ..errors import HeadscopeError
from .base import PromptBatch, Scorer, register_scorer


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
