"""Scores of reasoning models' think and answer segments: reasoning focus and receiver heads.

A reasoning model writes a think segment (its chain of thought, between a start marker such as `<think>` --
written by the model, or by a chat template that opens the block -- and an end marker such as `</think>` or
the organism's "so the answer is") and then its answer. Both scorers read the finished sequence: once a
sample has stopped, its prompt plus everything it generated is prefilled once more (decode.py's replay, batch
size 1, the model's own attention rule), and the scorer gets the rows of the query positions it asks for. So
a sample's score depends on its own tokens only: never on the batch it ran in, never on rows produced after
its stop, and sliding windows are applied by position exactly as the model applies them.

Segments (`locate`): markers match token-aligned text -- the text of a run of whole tokens, white space kept,
save for white space the first token carries before the marker (" so" matches "so ...") or that the last
carries after it. The think segment opens after the first start marker (no start marker: at the first
generated token) and closes at the LAST end marker, the one `--answer-from after-think` reads past; its keys
are the tokens strictly between the markers; the answer is every token after the end marker.

reasoning_focus (Zhang et al. 2025, "From Reasoning to Answer"; `microsoft/ACV`,
`misc/R2A/attention_analysis.py`, `get_attention_pattern_by_layer_head`, its a2r):
    a2r[l, h] = mean over answer queries i of  sum over think keys j of  A[l, h, i, j]
with the answer queries [answer start, T - 1) (T: the sequence length; the original leaves the last token out,
and headscope never feeds it) and the think keys strictly between the markers (`--focus-include-marker` adds
the end marker's tokens). A sample whose think block never closed, or with no answer query, has no focus: it
adds nothing and is counted.

receiver (Bogdan et al. 2025, *Thought Anchors*; `interp-reasoning/thought-anchors`,
`whitebox-analyses/attention_analysis/receiver_head_funcs.py` and `attn_funcs.py`): the think segment is split
into sentences (sentences.py); for sentences m and k,
    M[m, k] = mean over query tokens i of m and key tokens j of k of A[l, h, i, j]     (`_compute_averaged_matrix`)
    v[k]    = mean over m >= k + p of M[m, k]                                           (`get_vertical_scores`)
    score   = Fisher kurtosis (population moments) of v over the k that have one     (`get_3d_ar_kurtosis`)
with p = `--receiver-proximity` (4, as every receiver-head entry point passes `proximity_ignore=4`,
`control_depth=False`). A head whose v is constant has no kurtosis (NaN in scipy): no value for that head. A
chain with fewer than p + 2 sentences has no kurtosis at all: the sample adds nothing and is counted.
`--receiver-reduce sum` takes M[m, k] as the mean over m's queries of the SUM over k's keys (headscope's
earlier convention); `--receiver-sentences tokens` splits at tokens instead of Thought Anchors' chunks. Each
scored sample's row records `most_received`: per head, the index of the sentence with the largest v[k] (the one
its later sentences read most; -1 where the head has no value), so a user can check it against known anchors.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import HeadscopeError
from .base import PromptBatch, Scorer, register_scorer
from .sentences import SENTENCE_RULES, original_sentences, token_rule_sentences

PIECE_CONTEXT = 4  # tokens of left context when decoding one token's text
CONTEXT_TOKENS = 4  # tokens before the think segment that its sentence boundaries are tokenized after


@lru_cache(maxsize=64)
def token_texts(tokenizer, ids: tuple[int, ...]) -> tuple[str, ...]:
    """Each token's share of the decoded text (special tokens kept as text): the text of a few tokens up to and
    including it, minus the text without it -- so byte-level pieces and the decoder's spacing come out right."""
    windows = [list(ids[max(0, t - PIECE_CONTEXT):t + 1]) for t in range(len(ids))]
    options = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    with_token = tokenizer.batch_decode(windows, **options)
    without = tokenizer.batch_decode([window[:-1] for window in windows], **options)
    return tuple(full[len(before):] for full, before in zip(with_token, without))


def find_marker(pieces, marker: str, start: int, end: int, last: bool) -> tuple[int, int] | None:
    """The first (or last) token-aligned match of `marker` among tokens [start, end): (first token, end token)."""
    starts = [0]  # character offset of each token's text, and the end
    for piece in pieces[start:end]:
        starts.append(starts[-1] + len(piece))
    text = "".join(pieces[start:end])
    found = None
    at = text.find(marker)
    while at >= 0:
        span = _aligned(text, starts, at, at + len(marker))
        if span is not None:
            found = (start + span[0], start + span[1])
            if not last:
                return found
        at = text.find(marker, at + 1)
    return found


def _aligned(text, starts, begin: int, stop: int) -> tuple[int, int] | None:
    """The tokens [i, j) of the match text[begin:stop], if it is token-aligned (see module), else None."""
    if begin == stop:
        return None
    first = bisect.bisect_right(starts, begin) - 1  # the token whose text holds character `begin`
    if text[starts[first]:begin].strip():  # the match starts inside a word of its first token
        return None
    last = bisect.bisect_right(starts, stop - 1) - 1
    if stop == starts[last + 1]:
        return first, last + 1
    if not text[starts[last]:stop].strip():  # the marker's trailing white space opens the next token
        return first, last
    return None


@dataclass(frozen=True)
class Segments:
    """Where a finished sequence's think and answer segments lie (positions of its own, unpadded sequence)."""

    think: tuple[int, int] | None  # the keys strictly between the markers; None: no think segment
    end_marker: tuple[int, int] | None  # the end marker's tokens; None: the think block never closed
    length: int  # T, the sequence length

    @property
    def answer(self) -> tuple[int, int] | None:
        return None if self.end_marker is None else (self.end_marker[1], self.length)

    def spans(self) -> dict:
        """The samples row's fields."""
        return {"think_span": None if self.think is None else list(self.think),
                "answer_span": None if self.answer is None else list(self.answer)}


def locate(tokenizer, sequence: list[int], prompt_len: int, think_start: str | None, think_end: str) -> Segments:
    """The think segment and the answer of a finished sequence (prompt + generated tokens)."""
    pieces = token_texts(tokenizer, tuple(sequence))
    length = len(sequence)
    if think_start is None:
        opened = prompt_len
    else:
        start_marker = find_marker(pieces, think_start, 0, length, last=False)
        if start_marker is None:
            return Segments(None, None, length)
        opened = start_marker[1]
    end_marker = find_marker(pieces, think_end, opened, length, last=True)
    closed = end_marker[0] if end_marker is not None else length
    return Segments((opened, closed), end_marker, length)


def think_markers(tokenizer, think_start: str | None, think_end: str | None) -> tuple[str | None, str]:
    """The markers given, or <think> / </think> when the tokenizer's chat template has a thinking block."""
    if think_end:
        return think_start, think_end
    if "</think>" in (getattr(tokenizer, "chat_template", None) or ""):
        return think_start or "<think>", "</think>"
    raise HeadscopeError("segments need --think-end (the chat template has no thinking block)")


class SegmentScorer(Scorer):
    """Reads each finished sequence's rows through the replay (see module): nothing while decoding."""

    reads_top_k = False  # its score never reads the step's top-k view (no tie of it to count)
    replays = True
    keep_zeros = True

    def __init__(self, think_start: str | None = None, think_end: str | None = None):
        self.think_start, self.think_end = think_start, think_end

    @staticmethod
    def marker_options(options) -> tuple:
        """(think_start, think_end) from a task's options (None where it has no such field)."""
        return getattr(options, "think_start", None), getattr(options, "think_end", None)

    def begin(self, batch: PromptBatch, num_layers: int, num_heads: int) -> None:
        super().begin(batch, num_layers, num_heads)
        if batch.tokenizer is None:
            raise HeadscopeError(f"the {self.name} scorer needs the tokenizer (run it through detect)")
        self.markers = think_markers(batch.tokenizer, self.think_start, self.think_end)

    def segments(self, sequence: list[int], prompt_len: int) -> Segments:
        return locate(self.batch.tokenizer, sequence, prompt_len, *self.markers)

    def step(self, view) -> None:  # the score comes from the replay
        pass


@register_scorer
class ReasoningFocusScorer(SegmentScorer):
    """Reasoning focus: mean over answer queries of the attention mass on the think keys (see module)."""

    name = "reasoning_focus"

    def __init__(self, think_start=None, think_end=None, include_marker: bool = False):
        super().__init__(think_start, think_end)
        self.include_marker = include_marker

    @classmethod
    def from_options(cls, options) -> "ReasoningFocusScorer":
        return cls(*cls.marker_options(options), getattr(options, "focus_include_marker", False))

    def begin(self, batch: PromptBatch, num_layers: int, num_heads: int) -> None:
        super().begin(batch, num_layers, num_heads)
        self.keys, self.queries = {}, {}  # sample -> [start, end) of its think keys / answer queries

    def replay_queries(self, sample: int, sequence: list[int], prompt_len: int) -> tuple[int, int] | None:
        segments = self.segments(sequence, prompt_len)
        if segments.think is None or segments.end_marker is None:
            self.unscored[sample] = "no answer segment: the think block never closed"
            return None
        queries = (segments.end_marker[1], len(sequence) - 1)
        if queries[0] >= queries[1]:
            self.unscored[sample] = "no answer segment: nothing after the end marker but the last token"
            return None
        self.keys[sample] = (segments.think[0], segments.end_marker[1] if self.include_marker else segments.think[1])
        self.queries[sample] = queries
        return queries

    def replay_rows(self, sample, layer, query_start, probs) -> None:  # probs (1, heads, block, kv_len)
        start, end = self.keys[sample]
        mass = probs[0, :, :, start:end].sum((-1, -2))  # (heads,): summed over the keys and the block's queries
        self.total[sample, layer] += mass.to(self.total.device)

    def result(self) -> torch.Tensor:
        counts = torch.ones(len(self.total), device=self.total.device)
        for sample, (start, end) in self.queries.items():
            counts[sample] = end - start
        return self.with_unscored(self.total / counts.view(-1, 1, 1))


@register_scorer
class ReceiverScorer(SegmentScorer):
    """Receiver heads: kurtosis over the think segment's sentences of the attention each receives from the
    sentences at least `proximity` later (see module)."""

    name = "receiver"
    REDUCTIONS = ("mean", "sum")

    def __init__(self, think_start=None, think_end=None, proximity: int = 4, reduce: str = "mean",
                 sentences: str = "original"):
        super().__init__(think_start, think_end)
        if reduce not in self.REDUCTIONS:
            raise HeadscopeError(f"--receiver-reduce must be one of {', '.join(self.REDUCTIONS)}")
        if sentences not in SENTENCE_RULES:
            raise HeadscopeError(f"--receiver-sentences must be one of {', '.join(SENTENCE_RULES)}")
        if proximity < 1:
            raise HeadscopeError("--receiver-proximity must be at least 1")
        self.proximity, self.reduce, self.sentence_rule = proximity, reduce, sentences

    @classmethod
    def from_options(cls, options) -> "ReceiverScorer":
        return cls(*cls.marker_options(options), getattr(options, "receiver_proximity", 4), getattr(options, "receiver_reduce", "mean"),
                   getattr(options, "receiver_sentences", "original"))

    def begin(self, batch: PromptBatch, num_layers: int, num_heads: int) -> None:
        super().begin(batch, num_layers, num_heads)
        self.plans = {}  # sample -> its sentences' bookkeeping (see _plan)
        self.received = {}  # sample -> (layers, heads, sentences) sum over m >= k + p of M[m, k] (times |k|)
        self.most_received = {}  # sample -> (layers, heads) argmax of v[k] over k (sample_fields)

    def replay_queries(self, sample: int, sequence: list[int], prompt_len: int) -> tuple[int, int] | None:
        segments = self.segments(sequence, prompt_len)
        if segments.think is None:
            self.unscored[sample] = "no think segment: the start marker never appeared"
            return None
        sentences = self.sentences(sequence, segments)
        if len(sentences) < self.proximity + 2:
            count = len(sentences)
            self.unscored[sample] = (f"the chain has {count} sentence{'' if count == 1 else 's'}; receiver needs "
                                     f"at least {self.proximity + 2} (--receiver-proximity {self.proximity})")
            return None
        self.plans[sample] = self._plan(sentences, len(sequence))
        self.received[sample] = torch.zeros(*self.total.shape[1:], len(sentences), device=self.total.device)
        rows = [(a, b) for a, b in sentences if a < b]
        return (rows[0][0], rows[-1][1]) if rows else None

    def sentences(self, sequence: list[int], segments: Segments) -> list[tuple[int, int]]:
        """Token ranges [start, end) of the think segment's sentences, clipped as `_compute_averaged_matrix`
        clips them to the matrix (T - 1: the last token is never a row or a column)."""
        tokenizer, (start, end) = self.batch.tokenizer, segments.think
        pieces = token_texts(tokenizer, tuple(sequence))
        if self.sentence_rule == "tokens":
            found = token_rule_sentences(pieces, start, end)
        else:
            found = original_sentences(tokenizer, "".join(pieces[start:end]), start, sum(map(len, pieces[end:])),
                                       "".join(pieces[max(start - CONTEXT_TOKENS, 0):start]))
        last = len(sequence) - 1
        return [(min(a, last), min(b, last)) for a, b in found]

    def _plan(self, sentences, length: int) -> dict:
        """Once per sequence, on the scorer's device: per position its sentence (or `count`, a bucket for positions
        in none) and 1/|its sentence| (a query's weight in its sentence's mean); per sentence its size."""
        count, device = len(sentences), self.total.device
        index = torch.full((length,), count, dtype=torch.long, device=device)
        for k, (a, b) in enumerate(sentences):
            index[a:b] = k
        sizes = torch.tensor([max(b - a, 0) for a, b in sentences], dtype=torch.float32, device=device)
        weight = (1.0 / torch.cat([sizes, sizes.new_ones(1)]).clamp(min=1))[index]  # (length,)
        return {"index": index, "sizes": sizes, "weight": weight, "sentence": torch.arange(count + 1, device=device)}

    def replay_rows(self, sample, layer, query_start, probs) -> None:  # probs (1, heads, block, kv_len)
        plan, device = self.plans[sample], probs.device
        heads, block, kv_len = probs.shape[1:]
        count, queries = len(plan["sizes"]), slice(query_start, query_start + block)
        key_sentence = plan["index"][:kv_len].to(device)
        query_sentence = plan["index"][queries].to(device)  # (block,)
        per_row = probs.new_zeros(heads, block, count + 1).index_add_(2, key_sentence, probs[0])  # mass per sentence
        # Row i of sentence m counts towards v[k] for k <= m - p, weighted 1/|m| (a mean over m's queries)
        weight = plan["weight"][queries].to(device)  # (block,)
        k = plan["sentence"].to(device)
        later = (query_sentence[:, None] - k[None, :] >= self.proximity) & (query_sentence[:, None] < count)
        contribution = (per_row * (weight[:, None] * later)[None]).sum(1)[:, :count]  # (heads, sentences)
        self.received[sample][layer] += contribution.to(self.received[sample].device)

    def result(self) -> torch.Tensor:
        out = torch.full_like(self.total, float("nan"))
        for sample, received in self.received.items():
            plan = self.plans[sample]
            sizes = plan["sizes"].to(received.device)
            count = len(sizes)
            later = (count - torch.arange(count, device=received.device) - self.proximity).clamp(min=0)  # m >= k + p
            columns = sizes if self.reduce == "mean" else torch.ones_like(sizes)
            vertical = received.double() / (later * columns).clamp(min=1).double()  # v[k]; 0 for an empty k
            out[sample] = kurtosis(vertical[..., later > 0]).to(out.dtype)
            self.most_received[sample] = vertical[..., later > 0].argmax(-1).where(~out[sample].isnan(), -1)
        return self.with_unscored(out)

    def sample_fields(self) -> dict[int, dict]:
        """`most_received`: per head, the index (among the think segment's sentences, from 0) of the sentence with
        the largest v[k] -- the sentence that head's later sentences read most; -1 where the head has no value."""
        return {sample: {"most_received": received.tolist()} for sample, received in self.most_received.items()
                if sample not in self.unscored}


def kurtosis(values: torch.Tensor) -> torch.Tensor:
    """Fisher kurtosis with population moments over the last dimension, m4 / m2^2 - 3, as scipy.stats.kurtosis
    (fisher=True, bias=True); NaN where the values are constant (scipy's test: m2 <= (eps * mean)^2)."""
    values = values.double()
    mean = values.mean(-1, keepdim=True)
    centred = values - mean
    m2, m4 = (centred ** 2).mean(-1), (centred ** 4).mean(-1)
    constant = m2 <= (torch.finfo(torch.float64).eps * mean.squeeze(-1)) ** 2
    return torch.where(constant, torch.full_like(m2, float("nan")), m4 / m2.clamp(min=1e-300) ** 2 - 3)
