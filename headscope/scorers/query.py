"""QRHead's query-focused retrieval score: query-to-gold-document attention against a null query's."""
from __future__ import annotations

import torch

from ..errors import HeadscopeError
from .base import PromptBatch, Scorer, register_scorer

SPANS = ("qrhead", "question")


@register_scorer
class QueryScorer(Scorer):
    """Query-focused retrieval score (Wuwei Zhang et al. 2025, "Query-Focused Retrieval Heads Improve
    Long-Context Reasoning and Re-ranking", QRHead; code `princeton-pli/QRHead`: `src/qrretriever/
    attn_retriever.py`, `score_docs_per_head_for_detection`, and `exp_scripts/detection/detect_qrhead_lme.py`,
    `lme_eval`).

    With the query rows Q, the gold documents G and, for every key token j,
        c(l, h, j) = 1/|Q| sum_{i in Q} A[l, h, i, j]  -  1/|Q0| sum_{i in Q0} A0[l, h, i, j]
    (A0: the same prompt with the question replaced by the null question "N/A", Q0 its query rows; the
    documents come before the question and keep their positions), the score is
        score[l, h] = sum_{d in G} sum_{j in d, c(l, h, j) > mean_d - 2 std_d} c(l, h, j)
    with mean_d and std_d (N - 1) the mean and standard deviation of c over document d's tokens: QRHead's
    detection drops each document's outlying low tokens (`--no-query-outlier-mask` sums them all, and the
    score is then linear in the attention; a one-token document has no std, so with the mask it adds 0, as in
    QRHead). Q is QRHead's query span by default (`--query-span qrhead`: from the words introducing the question
    -- its "Query:", our "Question:" -- to the prompt's last token, chat suffix included); `question` takes the
    question's tokens only.

    Only the query rows are computed (prefill rows); the null prompt is the scorer's `calibration_prompt`.
    Samples come from the `query` task: meta["documents"] holds each document's [start, end) token span,
    meta["gold"] the gold documents' indices, meta["null_question_ids"] the null question's tokens and
    meta["qrhead_span"] / meta["null_qrhead_span"] the QRHead query spans of both prompts.
    """

    reads_top_k = False  # its score never reads the step's top-k view (no tie of it to count)
    name = "query"
    keep_zeros = True

    def __init__(self, span: str = "qrhead", outlier_mask: bool = True):
        if span not in SPANS:
            raise HeadscopeError(f"--query-span must be one of {', '.join(SPANS)}")
        self.span, self.outlier_mask = span, outlier_mask

    @classmethod
    def from_options(cls, options) -> "QueryScorer":
        return cls(getattr(options, "query_span", "qrhead"), getattr(options, "query_outlier_mask", True))

    def begin(self, batch: PromptBatch, num_layers: int, num_heads: int) -> None:
        super().begin(batch, num_layers, num_heads)
        device = batch.input_ids.device
        pad = (batch.pad if batch.pad is not None else torch.zeros_like(batch.span_start)).tolist()
        for sample in batch.samples:
            if "documents" not in sample.meta or "null_question_ids" not in sample.meta:
                raise HeadscopeError("the query scorer needs the query task's samples (documents, gold, null question)")
        # The null prompt: each prompt with its question tokens swapped for the null question's.
        null_prompts, queries, null_queries = [], [], []
        for b, sample in enumerate(batch.samples):
            ids = batch.input_ids[b, pad[b]:].tolist()
            start, end = int(batch.span_start[b]) - pad[b], int(batch.span_end[b]) - pad[b]
            null = sample.meta["null_question_ids"]
            null_prompts.append(ids[:start] + null + ids[end:])
            if self.span == "qrhead":
                queries.append(sample.meta["qrhead_span"])
                null_queries.append(sample.meta["null_qrhead_span"])
            else:
                queries.append([start, end])
                null_queries.append([start, start + len(null)])
        null_width = max(len(ids) for ids in null_prompts)
        null_pad = [null_width - len(ids) for ids in null_prompts]
        null_ids = torch.full((len(null_prompts), null_width), int(batch.input_ids[0, 0]), dtype=torch.long)
        null_mask = torch.zeros_like(null_ids)
        for b, ids in enumerate(null_prompts):
            null_ids[b, null_pad[b]:] = torch.tensor(ids)
            null_mask[b, null_pad[b]:] = 1
        self.null_ids, self.null_mask = null_ids.to(device), null_mask.to(device)
        # Query rows [start, end) and gold document tokens, in each prompt's padded coordinates.
        self.queries = torch.tensor([[s + p, e + p] for (s, e), p in zip(queries, pad)], device=device)
        self.null_queries = torch.tensor([[s + p, e + p] for (s, e), p in zip(null_queries, null_pad)], device=device)
        self.documents = [[sample.meta["documents"][g] for g in sample.meta["gold"]] for sample in batch.samples]
        self.gold_keys = self._gold_positions(pad, device)  # (batch, gold tokens), -1 where padded
        self.null_gold_keys = self._gold_positions(null_pad, device)
        # per gold token: the summed attention of the query rows (real and null prompt)
        shape = (len(null_prompts), num_layers, num_heads, self.gold_keys.shape[1])
        self.on_gold, self.null_on_gold = torch.zeros(shape, device=device), torch.zeros(shape, device=device)

    def _gold_positions(self, pad: list[int], device) -> torch.Tensor:
        """(batch, most gold tokens) the positions of each sample's gold document tokens, in document order."""
        positions = [[p + j for start, end in documents for j in range(start, end)]
                     for documents, p in zip(self.documents, pad)]
        most = max(len(keys) for keys in positions)
        return torch.tensor([keys + [-1] * (most - len(keys)) for keys in positions], device=device)

    def prefill_queries(self) -> tuple[int, int]:
        return int(self.queries[:, 0].min()), int(self.queries[:, 1].max())

    def calibration_prompt(self):
        mask = None if bool(self.null_mask.all()) else self.null_mask
        return self.null_ids, mask, (int(self.null_queries[:, 0].min()), int(self.null_queries[:, 1].max()))

    @staticmethod
    def _query_mass(probs, query_start, keys, queries) -> torch.Tensor:
        """(batch, heads, gold tokens): this block's query rows' attention on each gold token, summed."""
        batch, heads, block, kv_len = probs.shape
        device = probs.device  # the layer's device (models split over GPUs)
        keys = keys.to(device)
        index = keys.clamp(0, kv_len - 1)[:, None, None, :].expand(batch, heads, block, keys.shape[1])
        on_keys = probs.gather(-1, index) * (keys >= 0)[:, None, None, :]  # (batch, heads, block, gold tokens)
        query = torch.arange(query_start, query_start + block, device=device)
        queries = queries.to(device)
        in_query = (query[None, :] >= queries[:, :1]) & (query[None, :] < queries[:, 1:])  # (batch, block)
        return (on_keys * in_query[:, None, :, None]).sum(2)

    def prefill_rows(self, layer, query_start, probs) -> None:
        mass = self._query_mass(probs, query_start, self.gold_keys, self.queries)
        self.on_gold[:, layer] += mass.to(self.on_gold.device)

    def calibration_rows(self, layer, query_start, probs) -> None:
        mass = self._query_mass(probs, query_start, self.null_gold_keys, self.null_queries)
        self.null_on_gold[:, layer] += mass.to(self.null_on_gold.device)

    def step(self, view) -> None:  # the score is the prefill's
        pass

    def result(self) -> torch.Tensor:
        calibrated = self.on_gold / _lengths(self.queries) - self.null_on_gold / _lengths(self.null_queries)
        for b, documents in enumerate(self.documents):
            first = 0
            for start, end in documents:
                tokens = calibrated[b, ..., first:first + end - start]  # (layers, heads, document tokens)
                first += end - start
                self.total[b] += self._document_score(tokens)
        return self.with_unscored(self.total)

    def _document_score(self, tokens: torch.Tensor) -> torch.Tensor:
        """(layers, heads): the document's calibrated token scores summed, the low outliers dropped (QRHead)."""
        if not self.outlier_mask:
            return tokens.sum(-1)
        mean = tokens.mean(-1, keepdim=True)
        std = (((tokens - mean) ** 2).sum(-1, keepdim=True) / (tokens.shape[-1] - 1)).sqrt()  # NaN for one token
        return (tokens * (tokens > mean - 2 * std)).sum(-1)


def _lengths(spans: torch.Tensor) -> torch.Tensor:
    """(batch, 1, 1, 1) the number of query rows of each sample's [start, end) span."""
    return (spans[:, 1] - spans[:, 0]).clamp(min=1).float().view(-1, 1, 1, 1)
