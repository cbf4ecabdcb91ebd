"""Record each layer's attention row for the current query position, without eager attention.

headscope registers one attention function with transformers' `AttentionInterface`. On a
recorded decoding step (one query position) it computes, for every head, the softmax row of
that query over all cached keys in float32 -- with the model's own scaling, mask (causal,
sliding window, padding), logit soft-capping and grouped-query mapping -- and the layer's
output from those same probabilities, so attention runs once. On every other call (the
prefill, or when nothing is being recorded) it hands the call to a fast backend (SDPA or
flash-attention), so memory stays linear in the context.

A row is never kept: it is reduced on the spot to its top-k (value, position) pairs,
k being the largest any scorer asked for. That is all the retrieval and reasoning scores
need, and it is O(layers x heads x k) per step instead of O(layers x heads x context).
Scorers that need whole rows get them through `row_hooks` as they are computed.

Prefill rows: inside `prefilling(recorder, targets)`, the (multi-query) prefill pass still runs on
the fast backend, and the attention function also computes, from the same query and key, the rows
of the query positions the targets asked for, PREFILL_BLOCK rows at a time (`query_probs`, the same
maths as the decoding rows), handing each block to the targets' hooks: the T x T matrix is never
built, and no block outlives its hooks.

Models whose attention does not go through the interface fall back to eager attention with
`output_attentions=True` on the decoding steps only (the prefill stays on the fast path):
`Recorder.add_eager_attentions` takes those tensors.

The same function ablates heads when asked to (masking.py), on the prefill and every step.
"""
from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask, sdpa_mask

from . import masking

ATTN_SDPA = "headscope"  # no "sdpa" in the name: transformers would then check SDPA support
ATTN_FLASH = "headscope-fa"

_active: "Recorder | None" = None  # the recorder of the forward pass in flight, if any
PREFILL_BLOCK = 256  # query rows computed at once when a scorer wants prefill rows
PREFILL_ELEMENTS = 2**27  # ... fewer when batch x heads x block x kv_len would pass this (512 MiB of float32)


class Recorder:
    """Reduces each layer's current-query attention row to its top-k positions, for one forward pass."""

    def __init__(self, num_layers: int, top_k: int):
        self.num_layers = num_layers
        self.top_k = top_k
        self.seq_len = 0  # length of the whole sequence, the current query included
        self.values: list[torch.Tensor | None] = [None] * num_layers  # each (batch, heads, k) float32
        self.positions: list[torch.Tensor | None] = [None] * num_layers  # each (batch, heads, k) int64
        self.row_hooks: list = []  # callables (layer, probs, offset) for scorers that need whole rows
        self.prefill_targets: list = []  # (start, end, hook): hook(layer, query_start, probs) for prefill rows
        self.prefilling = False  # True inside `prefilling(...)`: multi-query passes deliver prefill rows

    def prefill(self, layer, query, key, attention_mask, scaling, softcap, sliding_window) -> None:
        """Deliver the wanted prefill rows, block by block, to each target's hook.

        The prefill pass starts from an empty cache, so query t of the pass sits at key index (and
        padded position) kv_len - q_len + t. Each hook gets probs (batch, heads, block, kv_len) for its
        own query positions [a, b) only, a view of the block being computed; no block is kept.
        """
        q_len, kv_len = query.shape[2], key.shape[2]
        first = kv_len - q_len  # position of this pass's first query
        lo = max(min(start for start, _, _ in self.prefill_targets), first)
        hi = min(max(end for _, end, _ in self.prefill_targets), kv_len)
        block = max(1, min(PREFILL_BLOCK, PREFILL_ELEMENTS // (query.shape[0] * query.shape[1] * kv_len)))
        for block_start in range(lo, hi, block):
            block_end = min(block_start + block, hi)
            index = torch.arange(block_start, block_end, device=query.device)
            probs = query_probs(query[:, :, block_start - first:block_end - first], key, attention_mask, scaling,
                                softcap, sliding_window, index)
            for start, end, hook in self.prefill_targets:
                a, b = max(start, block_start), min(end, block_end)
                if a < b:
                    hook(layer, a, probs[:, :, a - block_start:b - block_start])

    def add(self, layer: int, probs: torch.Tensor) -> None:
        """probs: (batch, heads, kv_len) float32, the softmax row of the current query."""
        # A sliding-window cache may hold only the most recent kv_len keys: they are the last
        # kv_len positions of the sequence, so positions are counted from there.
        offset = self.seq_len - probs.shape[-1]
        for hook in self.row_hooks:
            hook(layer, probs, offset)
        values, positions = probs.topk(min(self.top_k, probs.shape[-1]), dim=-1)
        positions = positions + offset
        missing = self.top_k - values.shape[-1]
        if missing > 0:  # fewer keys than k (a short window): pad with zero mass at position -1
            values = torch.nn.functional.pad(values, (0, missing), value=0.0)
            positions = torch.nn.functional.pad(positions, (0, missing), value=-1)
        self.values[layer] = values
        self.positions[layer] = positions

    def add_eager_attentions(self, attentions) -> None:
        """The fallback: `attentions` is the model output's tuple of (batch, heads, q_len, kv_len)."""
        for layer, weights in enumerate(attentions):
            self.add(layer, weights[:, :, -1, :].float())

    def take(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's top-k values and positions, each (layers, batch, heads, k), on one device."""
        missing = [layer for layer, v in enumerate(self.values) if v is None]
        if missing:
            raise RuntimeError(f"no attention row was recorded for layers {missing}")
        values = torch.stack([v.to(device) for v in self.values])
        positions = torch.stack([p.to(device) for p in self.positions])
        self.values = [None] * self.num_layers
        self.positions = [None] * self.num_layers
        return values, positions


@contextlib.contextmanager
def recording(recorder: Recorder, seq_len: int):
    """Record the rows of the single-query forward pass run inside this block."""
    global _active
    recorder.seq_len = seq_len
    _active = recorder
    try:
        yield recorder
    finally:
        _active = None


@contextlib.contextmanager
def prefilling(recorder: Recorder, targets: list):
    """Deliver prefill rows to `targets` [(start, end, hook), ...] from the forward pass run inside this block
    (which must start from an empty cache). Outputs still come from the fast backend."""
    global _active
    recorder.prefill_targets, recorder.prefilling = list(targets), True
    _active = recorder
    try:
        yield recorder
    finally:
        _active = None
        recorder.prefill_targets, recorder.prefilling = [], False


def query_probs(
    query: torch.Tensor,  # (batch, q_heads, q, dim): some (or all) of this forward pass's queries
    key: torch.Tensor,  # (batch, kv_heads, kv_len, dim)
    attention_mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    sliding_window: int | None = None,
    query_index: torch.Tensor | None = None,  # (q,) each query's index on the key axis; default: the last q keys
) -> torch.Tensor:
    """Softmax rows of the queries over all keys, float32, shape (batch, q_heads, q, kv_len).

    The model's own rule: logits = q.k * scaling, soft-capped, then key j is visible from the query at
    key index i when j <= i (causal), i - j < sliding_window, and the model's mask allows it (padding).
    Query head h reads KV head h // group (transformers' repeat_kv order), without copying keys.
    A query that sees no key at all (a padding row) gets a row of zeros.
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    if query_index is None:
        query_index = torch.arange(kv_len - q_len, kv_len, device=query.device)
    grouped_query = query.reshape(batch, kv_heads, group * q_len, dim)
    logits = torch.matmul(grouped_query, key.transpose(-1, -2)).float() * scaling  # (batch, kv_heads, group*q, kv_len)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.reshape(batch, q_heads, q_len, kv_len)

    keys = torch.arange(kv_len, device=logits.device)
    distance = query_index.to(logits.device)[:, None] - keys[None, :]  # (q, kv_len): i - j
    visible = distance >= 0
    if sliding_window is not None:
        visible = visible & (distance < sliding_window)
    visible = visible[None, None]  # (1, 1, q, kv_len)
    if attention_mask is not None and attention_mask.dim() == 4:  # (batch, 1, rows of this pass, >= kv_len)
        rows = query_index.to(attention_mask.device) - kv_len + attention_mask.shape[-2]
        mask_rows = attention_mask[:, :, rows, -kv_len:]
        if mask_rows.dtype == torch.bool:
            visible = visible & mask_rows.to(logits.device)
        else:  # an additive float mask
            logits = logits + mask_rows.to(logits.device).float()
    elif attention_mask is not None:  # flash-style 2D padding mask (batch, kv_len)
        visible = visible & attention_mask[:, None, None, -kv_len:].bool().to(logits.device)
    logits = logits.masked_fill(~visible, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def last_row_probs(query, key, attention_mask, scaling, softcap=None, sliding_window=None) -> torch.Tensor:
    """Softmax row of the single (last) query over all keys, float32, shape (batch, q_heads, kv_len)."""
    return query_probs(query, key, attention_mask, scaling, softcap, sliding_window)[:, :, 0]


def eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """Plain attention for what SDPA cannot serve (logit soft-capping): memory quadratic in the prompt."""
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    logits = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attention_mask[..., -key.shape[2] :], float("-inf"))
        else:
            logits = logits + attention_mask[..., -key.shape[2] :]
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def _make_attention(backend):
    def headscope_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        softcap, sliding_window = kwargs.get("softcap"), kwargs.get("sliding_window")
        if _active is None or _active.prefilling or query.shape[2] != 1:
            fast = eager_attention if softcap is not None else backend
            output, _ = fast(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
            if _active is not None and _active.prefilling:
                _active.prefill(module.layer_idx, query, key, attention_mask, scaling, softcap, sliding_window)
        else:
            probs = last_row_probs(query, key, attention_mask, scaling, softcap, sliding_window)
            _active.add(module.layer_idx, probs)
            batch, q_heads, kv_len = probs.shape
            kv_heads = value.shape[1]
            grouped_probs = probs.to(value.dtype).reshape(batch, kv_heads, q_heads // kv_heads, kv_len)
            output = torch.matmul(grouped_probs, value)  # (batch, kv_heads, group, dim)
            output = output.reshape(batch, 1, q_heads, value.shape[-1])
        return masking.apply(module.layer_idx, output, value, attention_mask, sliding_window), None

    return headscope_attention


def _flash_backend(*args, **kwargs):
    from transformers.integrations.flash_attention import flash_attention_forward

    return flash_attention_forward(*args, **kwargs)


AttentionInterface.register(ATTN_SDPA, _make_attention(sdpa_attention_forward))
AttentionMaskInterface.register(ATTN_SDPA, sdpa_mask)
AttentionInterface.register(ATTN_FLASH, _make_attention(_flash_backend))
AttentionMaskInterface.register(ATTN_FLASH, flash_attention_mask)


def install(model, attn: str = "sdpa") -> bool:
    """Route the model's attention through headscope. False when the model cannot use the interface."""
    if not getattr(model, "_supports_attention_backend", False):
        return False
    name = {"sdpa": ATTN_SDPA, "flash_attention_2": ATTN_FLASH}[attn]
    try:
        model.set_attn_implementation(name)
    except (ValueError, ImportError, KeyError):
        return False
    return True
