"""headscope's rows next to the model's own eager rows, on the very same attention calls (for `check`).

`Spying` routes the model's attention through a spy that notes each call's module, values and arguments, then
calls headscope's function. `EagerRowsRecorder` is a Recorder that, whenever headscope's function hands it
rows -- a decoding step's row, or the prefill rows its targets asked for -- computes the eager rows of the
same queries (reference.effective_rows: the modeling file's eager code on the same query, key, value and
mask, upcast to float32), notes the largest difference, and passes the EAGER rows on. So one decode with
this recorder both measures headscope's rows and feeds the scorers the eager rows; a decode with the plain
Recorder feeds them headscope's. Only real (non-padding) query rows are compared.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .recorder import Recorder, row_blocks
from .reference import eager_output_and_rows
from .runstate import state_of

ROW_LIMIT = 1e-5  # a row this close to eager's, in mass moved (`mass_moved`), is equal (check's row figures)
ENTRY_LIMIT = 1e-5  # an entry this close to eager's is fed to the scorers as headscope's (`as_fed`)


def mass_moved(ours: torch.Tensor, eager: torch.Tensor) -> torch.Tensor:
    """Per row (the last dimension), the attention mass that differs between the two rows: half the L1 distance,
    the total variation between them. It judges a row by the mass it moves, whatever its length: a correct row's
    entries each carry float32 rounding relative to their size, so its total stays ~1e-7 at 256 keys or at 128K,
    while a wrong row of a diffuse head at 100K keys (every entry near 1e-5) moves a whole share of its mass --
    which a limit on the largest entry's difference (1e-5) never sees."""
    return (ours - eager).abs().sum(-1) / 2


def as_fed(ours: torch.Tensor, eager: torch.Tensor) -> torch.Tensor:
    """The eager rows the scorers are fed: each entry within ROW_LIMIT of headscope's taken as headscope's. A real
    difference still reaches the scorers; rounding does not flip a top-k choice between two keys whose weights
    tie (exactly, in a row of repeated tokens) or differ by an ulp, which would move a score while every entry
    agrees."""
    return torch.where((ours - eager).abs() <= ENTRY_LIMIT, ours, eager)

SPY = "headscope-check"


@dataclass
class Differences:
    """The largest difference of each compared row kind (rows: `mass_moved`); NaN where the model has no eager
    code."""

    decode: list = field(default_factory=list)  # one per (step, attention layer)
    prefill: list = field(default_factory=list)  # one per (layer, compared block)
    prefill_rows: int = 0  # real query rows compared in the prefill
    outputs: list = field(default_factory=list)  # |output - eager output| / max(1, |eager output|), per compared call

    @staticmethod
    def worst(values: list) -> float:
        return max(values) if values and not any(math.isnan(v) for v in values) else math.nan


@dataclass
class Call:
    """The attention call in flight, as the spy saw it."""

    module: object
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attention_mask: torch.Tensor | None
    kwargs: dict


class EagerRowsRecorder(Recorder):
    """A Recorder that hands on the eager rows of every row headscope computes, noting the differences."""

    def __init__(self, layers, top_k: int, pad: torch.Tensor | None = None):
        super().__init__(layers, top_k)
        self.pad = pad  # (batch,) left padding: query rows before it are padding, not compared
        self.call: Call | None = None
        self.differences = Differences()
        self.expected_outputs: list = []  # (query indices of this call, real (batch, rows), eager output rows)

    def eager(self, query, key, attention_mask, rows: torch.Tensor) -> torch.Tensor | None:
        """(batch, heads, len(rows), kv_len) eager rows of the queries at key indices `rows` of this call; their
        eager outputs are kept for `compare_output`."""
        first = key.shape[2] - query.shape[2]  # this call's queries are the last q_len keys
        picked = rows - first
        mask = attention_mask
        if mask is not None and mask.dim() == 4:
            mask = mask[:, :, mask.shape[2] - query.shape[2] + picked]
        elif mask is None:  # a causal pass (or a step) the fast backend runs without a mask: eager code wants one
            mask = causal_mask(rows, key.shape[2], self.call.kwargs.get("sliding_window"), query.device)
        found = eager_output_and_rows(self.call.module, query[:, :, picked], key, self.call.value, mask,
                                      self.call.kwargs)
        if found is None:
            return None
        output, reference = found
        self.expected_outputs.append((picked, self.real_rows(rows, query.shape[0]), output))
        return reference

    def compare_output(self, output: torch.Tensor) -> None:
        """headscope's attention output of the call (batch, q, heads, value dim) against the eager outputs of the
        rows compared: a wrong output (a non-causal prefill, say) changes the cache and every later layer, even
        where each layer's rows are right."""
        for picked, real, expected in self.expected_outputs:
            ours = output[:, picked.to(output.device)].float()
            gap = (ours - expected.to(ours.device)).abs().amax((-1, -2)) * real.to(ours.device)  # (batch, rows)
            self.differences.outputs.append(float(gap.max()) / max(1.0, float(expected.abs().max())))
        self.expected_outputs = []

    def add(self, layer, probs):
        slot = self.slot[layer]
        if self.values[slot] is not None:  # recorded already this pass (the same query again)
            return
        query, key, attention_mask = self.call.query, self.call.key, self.call.attention_mask
        reference = self.eager(query, key, attention_mask, torch.tensor([key.shape[2] - 1], device=query.device))
        if reference is None:
            self.differences.decode.append(math.nan)
            return super().add(layer, probs)
        reference = reference[:, :, 0, -probs.shape[-1]:].to(probs.device)  # a window's cache keeps its last keys
        self.differences.decode.append(float(mass_moved(probs, reference).max()))
        super().add(layer, as_fed(probs, reference))

    def prefill(self, layer, query, key, attention_mask, rule) -> None:
        slot = self.slot[layer]
        if slot in self.prefilled:
            return
        self.prefilled.add(slot)
        for start, end, hook in self.prefill_targets:  # each target's own rows: never the whole prompt's
            for block_start, probs in row_blocks(query, key, attention_mask, rule, start, end):
                rows = torch.arange(block_start, block_start + probs.shape[2], device=query.device)
                reference = self.eager(query, key, attention_mask, rows)
                if reference is None:
                    self.differences.prefill.append(math.nan)
                    hook(slot, block_start, probs)
                    continue
                reference = reference.to(probs.device)
                real = self.real_rows(rows, probs.shape[0]).to(probs.device)  # (batch, block)
                if bool(real.any()):
                    gap = mass_moved(probs, reference) * real[:, None, :]  # (batch, heads, block)
                    self.differences.prefill.append(float(gap.max()))
                    self.differences.prefill_rows += int(real.sum())
                hook(slot, block_start, as_fed(probs, reference))

    def real_rows(self, rows: torch.Tensor, batch: int) -> torch.Tensor:
        """(batch, len(rows)) True for query rows that are real tokens (at or after the sample's padding)."""
        padded = self.pad is not None and len(self.pad) == batch  # a replay pass is one unpadded sequence
        pad = self.pad if padded else torch.zeros(batch, dtype=torch.long)
        return rows.cpu()[None, :] >= pad.cpu()[:, None]


def causal_mask(rows: torch.Tensor, kv_len: int, window: int | None, device) -> torch.Tensor:
    """(1, 1, len(rows), kv_len) additive mask: key j visible from the query at key index i when j <= i (and
    i - j < window), written out for the eager reference."""
    distance = rows.to(device)[:, None] - torch.arange(kv_len, device=device)[None, :]
    visible = (distance >= 0) & ((distance < window) if window else True)
    return torch.zeros(visible.shape, device=device).masked_fill(~visible, float("-inf"))[None, None]


class Spying:
    """Route the model's attention through a spy that calls headscope's function, then `watch(module, output)` if
    given. With `pad` (the batch's left padding), the decodes run inside the block record with an
    EagerRowsRecorder (`self.recorder`) that the spy tells about each call."""

    def __init__(self, model, watch=None, enabled: bool = True, pad: torch.Tensor | None = None,
                 eager_rows: bool = False):
        self.model, self.watch, self.enabled, self.pad, self.eager_rows = model, watch, enabled, pad, eager_rows
        self.recorder: EagerRowsRecorder | None = None

    def make_recorder(self, layers, top_k: int) -> EagerRowsRecorder:
        self.recorder = EagerRowsRecorder(layers, top_k, self.pad)
        return self.recorder

    def __enter__(self):
        if not self.enabled:
            return self
        if self.eager_rows:
            state_of(self.model).make_recorder = self.make_recorder
        self.previous = self.model.config._attn_implementation
        inner = ALL_ATTENTION_FUNCTIONS[self.previous]

        def spy(module, query, key, value, attention_mask, **kwargs):
            if self.recorder is not None:
                self.recorder.call = Call(module, query, key, value, attention_mask, kwargs)
            output, _ = inner(module, query, key, value, attention_mask, **kwargs)
            if self.recorder is not None:
                self.recorder.compare_output(output)
            if self.watch is not None:
                self.watch(module, output)
            return output, None

        ALL_ATTENTION_FUNCTIONS.register(SPY, spy)
        ALL_MASK_ATTENTION_FUNCTIONS.register(SPY, ALL_MASK_ATTENTION_FUNCTIONS[self.previous])
        self.model.set_attn_implementation(SPY)
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.model.set_attn_implementation(self.previous)
            state_of(self.model).make_recorder = None
        return False
