"""Scores of reasoning models' think and answer segments: reasoning focus and receiver heads.

A reasoning model writes a think segment (its chain of thought, up to a `think_end` marker such as
`</think>`, or the organism's "so the answer is") and then its answer. `Segments` finds, online and for each
sample, where the think segment starts and ends in the sequence as the tokens are produced (a marker is
text: it is found by decoding the last few tokens), and where its sentences end.

reasoning_focus (Zhang et al. 2025, reasoning-focus heads): for each answer-segment query i,
    focus[l, h] += sum_{j in think} A[l, h, i, j];   score = focus / (number of answer queries)
the share of attention the answer puts on the reasoning trace.

receiver (Bogdan et al. 2025, *Thought Anchors*, receiver heads): the think segment is split into sentences.
For a query sentence m and an earlier sentence k, M[m, k] = mean over the query tokens of m of
sum_{j in k} A[l, h, i, j]; sentence k's received attention is v[k] = mean over m > k of M[m, k]; the head's
score is the (Fisher, population) kurtosis of v over the sentences that receive any: a head that concentrates
what later sentences attend to onto a few earlier sentences scores high. A chain with fewer than
MIN_SENTENCES receiving sentences has no kurtosis: the sample adds nothing to the head's list.
"""
from __future__ import annotations

import torch

from ..errors import HeadscopeError
from .base import PromptBatch, Scorer, register_scorer

SENTENCE_ENDS = (".", "!", "?")
MIN_SENTENCES = 3  # receiving sentences needed for a kurtosis


class Segments:
    """Think and answer segments of each sample's generation, found as the tokens are produced.

    Positions are the sequence positions the generated tokens are fed at: the token produced at step s sits at
    prompt_len + s. The think segment is [think_start, think_end] (the end marker's last token included); the
    answer queries are the positions after it. Sentences of the think segment end at a token whose text ends
    with . ! ? or holds a newline."""

    def __init__(self, tokenizer, prompt_ids: list[list[int]], think_start: str | None, think_end: str):
        """prompt_ids: each sample's (left-padded) prompt; a prompt that ends with the start marker (a chat
        template that opens the think block) starts the think segment at the first generated token."""
        self.tokenizer, self.prompt_len = tokenizer, len(prompt_ids[0])
        self.markers = (think_start, think_end)
        self.generated = [[] for _ in prompt_ids]
        opened = [think_start is None or self._decoded_tail(ids, think_start).endswith(think_start)
                  for ids in prompt_ids]
        self.start = [self.prompt_len if is_open else None for is_open in opened]  # None: not yet
        self.end = [None] * len(prompt_ids)
        self.sentence_starts = [[] for _ in prompt_ids]  # within the think segment

    def update(self, tokens: list[int], step: int) -> None:
        """The tokens produced at `step` (one per sample)."""
        for b, token in enumerate(tokens):
            self.generated[b].append(token)
            position = self.prompt_len + step
            if self.end[b] is not None:
                continue
            if self.start[b] is None:
                if self._ends_with(b, self.markers[0]):
                    self.start[b] = position + 1  # the segment starts after the start marker
                continue
            if not self.sentence_starts[b]:
                self.sentence_starts[b].append(self.start[b])
            if self._ends_with(b, self.markers[1]):
                self.end[b] = position
            elif self._ends_sentence(token):
                self.sentence_starts[b].append(position + 1)

    def _ends_with(self, b: int, marker: str) -> bool:
        return self._decoded_tail(self.generated[b], marker).endswith(marker)

    def _decoded_tail(self, ids: list[int], marker: str) -> str:
        """The text of the last few tokens: enough to hold the marker (a token is at least one character)."""
        return self.tokenizer.decode(ids[-(len(marker) + 2):], skip_special_tokens=False).rstrip()

    def _ends_sentence(self, token: int) -> bool:
        text = self.tokenizer.decode([token])
        return "\n" in text or text.strip().endswith(SENTENCE_ENDS)

    def sentences(self, b: int, before: int) -> list[tuple[int, int]]:
        """The think segment's sentences [start, end) that end at or before position `before`."""
        starts = self.sentence_starts[b]
        closed = [(starts[i], starts[i + 1]) for i in range(len(starts) - 1)]
        return [(s, e) for s, e in closed if e <= before]


class SegmentScorer(Scorer):
    """Full decoding rows, and the think segment of every sample tracked as tokens come."""

    full_rows = True
    keep_zeros = True

    def __init__(self, think_start: str | None = None, think_end: str | None = None):
        self.think_start, self.think_end = think_start, think_end

    @classmethod
    def from_options(cls, options) -> "SegmentScorer":
        return cls(getattr(options, "think_start", None), getattr(options, "think_end", None))

    def begin(self, batch: PromptBatch, num_layers: int, num_heads: int) -> None:
        super().begin(batch, num_layers, num_heads)
        if batch.tokenizer is None:
            raise HeadscopeError(f"the {self.name} scorer needs the tokenizer (run it through detect)")
        start, end = think_markers(batch.tokenizer, self.think_start, self.think_end)
        self.segments = Segments(batch.tokenizer, batch.input_ids.tolist(), start, end)
        self.step_index = 0

    def query_position(self) -> int:
        return self.batch.prompt_len + self.step_index - 1  # the token fed at this step

    def step(self, view) -> None:
        self.segments.update(view.tokens.tolist(), self.step_index)
        self.step_index += 1


def segment_spans(tokenizer, prompt_ids: list[int], generated: list[int], markers: tuple) -> dict:
    """{"think_span": [start, end) or None, "answer_span": [start, end) or None} of one finished sample, in
    positions of its own (unpadded) sequence."""
    segments = Segments(tokenizer, [prompt_ids], *markers)
    for step, token in enumerate(generated):
        segments.update([token], step)
    start, end, stop = segments.start[0], segments.end[0], len(prompt_ids) + len(generated)
    return {"think_span": None if start is None else [start, (end + 1) if end is not None else stop],
            "answer_span": None if end is None else [end + 1, stop]}


def think_markers(tokenizer, think_start: str | None, think_end: str | None) -> tuple[str | None, str]:
    """The markers given, or <think> / </think> when the tokenizer's chat template has a thinking block."""
    if think_end:
        return think_start, think_end
    if "</think>" in (getattr(tokenizer, "chat_template", None) or ""):
        return think_start or "<think>", "</think>"
    raise HeadscopeError("segments need --think-end (the chat template has no thinking block)")


@register_scorer
class ReasoningFocusScorer(SegmentScorer):
    """Reasoning focus: mean over answer queries of the attention mass on the think segment (see module)."""

    name = "reasoning_focus"

    def begin(self, batch: PromptBatch, num_layers: int, num_heads: int) -> None:
        super().begin(batch, num_layers, num_heads)
        self.answer_steps = torch.zeros(len(batch.input_ids), device=self.total.device)

    def step_rows(self, layer, probs, offset) -> None:  # probs (batch, heads, kv_len), key j at offset + j
        query = self.query_position()
        for b in range(probs.shape[0]):
            start, end = self.segments.start[b], self.segments.end[b]
            if end is not None and query > end and start is not None:
                on_think = probs[b, :, max(start - offset, 0):end + 1 - offset].sum(-1)
                self.total[b, layer] += on_think.to(self.total.device)
                if layer == 0:
                    self.answer_steps[b] += 1

    def result(self) -> torch.Tensor:
        return self.total / self.answer_steps.clamp(min=1).view(-1, 1, 1)


@register_scorer
class ReceiverScorer(SegmentScorer):
    """Receiver heads: kurtosis over the think segment's sentences of the attention each receives from
    later sentences (see module)."""

    name = "receiver"
    keep_zeros = False  # a sample whose chain is too short for a kurtosis adds no value

    def begin(self, batch: PromptBatch, num_layers: int, num_heads: int) -> None:
        super().begin(batch, num_layers, num_heads)
        self.layers_heads = (num_layers, num_heads)
        self.current = [{} for _ in batch.input_ids]  # b -> {layer: (heads, sentences) sums of the open sentence}
        self.tokens_in_current = [0] * len(batch.input_ids)
        self.received = [[] for _ in batch.input_ids]  # b -> [(layers, heads, m) M[m, :m]] per closed sentence m
        self.sums = {}  # b -> (layers, heads, m) summed masses of the open sentence's query tokens

    def step_rows(self, layer, probs, offset) -> None:
        query = self.query_position()
        for b in range(probs.shape[0]):
            start, end = self.segments.start[b], self.segments.end[b]
            if start is None or query < start or (end is not None and query > end):
                continue  # receiver heads read the think segment's own queries
            earlier = self.segments.sentences(b, query)
            if not earlier:
                continue
            masses = torch.stack([probs[b, :, max(s - offset, 0):e - offset].sum(-1) for s, e in earlier], -1)
            self.current[b][layer] = masses  # (heads, earlier sentences); summed over the sentence's queries below
            if layer == self.layers_heads[0] - 1:
                self._add_query(b)

    def _add_query(self, b: int) -> None:
        """A query token of the open sentence m: add its masses; when m closes, M[m, k] is their mean."""
        stacked = torch.stack([self.current[b][layer] for layer in range(self.layers_heads[0])])  # (L, H, m)
        previous = self.sums.get(b)
        if previous is not None and previous.shape[-1] == stacked.shape[-1]:
            stacked = stacked + previous
        else:  # one more closed sentence before this query: a new sentence m has begun
            self._close_sentence(b)
        self.sums[b] = stacked
        self.tokens_in_current[b] += 1

    def _close_sentence(self, b: int) -> None:
        if b in self.sums and self.tokens_in_current[b]:
            self.received[b].append(self.sums[b] / self.tokens_in_current[b])  # M[m, k] for every k < m
        self.sums.pop(b, None)
        self.tokens_in_current[b] = 0

    def result(self) -> torch.Tensor:
        for b in range(len(self.received)):
            self._close_sentence(b)
        layers, heads = self.layers_heads
        out = torch.zeros(len(self.received), layers, heads, device=self.total.device)
        for b, rows in enumerate(self.received):
            if not rows:
                continue
            sentences = max(row.shape[-1] for row in rows)
            total = torch.zeros(layers, heads, sentences, device=rows[0].device)
            count = torch.zeros(sentences, device=rows[0].device)
            for row in rows:  # M[m, k] for k < m
                total[..., : row.shape[-1]] += row
                count[: row.shape[-1]] += 1
            if sentences >= MIN_SENTENCES:
                out[b] = kurtosis(total / count).to(out.device)  # v[k]: mean over the later sentences m
        return out


def kurtosis(values: torch.Tensor) -> torch.Tensor:
    """Fisher kurtosis (population moments) over the last dimension: m4 / m2^2 - 3; 0 where constant."""
    centred = values - values.mean(-1, keepdim=True)
    m2, m4 = (centred ** 2).mean(-1), (centred ** 4).mean(-1)
    return torch.where(m2 > 0, m4 / m2.clamp(min=1e-30) ** 2 - 3, torch.zeros_like(m2))
