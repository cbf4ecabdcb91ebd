"""Record each layer's attention row for the current query position, without eager attention.

headscope registers one attention function with transformers' `AttentionInterface`. On a
recorded decoding step (one query position) it computes, for every head, the softmax row of
that query over all cached keys in float32 (q.k taken in float32 whatever the model's dtype) --
with the model's own scaling, mask (causal, sliding window, padding), logit soft-capping,
attention sinks and grouped-query mapping -- and the layer's output from those same
probabilities, so attention runs once. On every other call (the prefill, or when nothing is
being recorded) it hands the call to a fast backend (SDPA or flash-attention), so memory stays
linear in the context; what those backends cannot compute (soft-capping, sinks) runs through
headscope's own block-wise attention, exact and linear in memory too. Any keyword argument
that would change the maths and is not implemented is refused by name (`model_rule`).

A row is never kept: it is reduced on the spot to its top-k (value, position) pairs,
k being the largest any scorer asked for. That is all the retrieval and reasoning scores
need, and it is O(layers x heads x k) per step instead of O(layers x heads x context).
Scorers that need whole rows get them through `row_hooks` as they are computed.

What to record and what to mask is the model's run state (runstate.py), read from the module the
function is called for. Prefill rows: inside `prefilling(model, recorder, targets)`, the (multi-query) prefill pass still runs on
the fast backend, and the attention function also computes, from the same query and key, the rows
of the query positions the targets asked for, PREFILL_BLOCK rows at a time (`query_probs`, the same
maths as the decoding rows), handing each block to the targets' hooks: the T x T matrix is never
built, and no block outlives its hooks.

Models whose attention does not go through the interface fall back to eager attention with
`output_attentions=True` on the decoding steps only (the prefill stays on the fast path):
`Recorder.add_eager_attentions` takes those tensors.

The same function ablates heads when asked to (masking.py), on the prefill and every step, and replays a
KV cache policy (kv.py): the heads it restricts see only the entries their cache would keep.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask, sdpa_mask

from . import masking
from ..errors import HeadscopeError
from .runstate import calling_layer, module_state, state_of
from .ties import top_k
from .visibility import visible_keys

ATTN_SDPA = "headscope"  # no "sdpa" in the name: transformers would then check SDPA support
ATTN_FLASH = "headscope-fa"

PREFILL_BLOCK = 256  # query rows computed at once when a scorer wants prefill rows
PREFILL_ELEMENTS = 2**27  # ... fewer when batch x heads x block x kv_len would pass this (512 MiB of float32)


class Recorder:
    """Reduces each attention layer's current-query row to its top-k positions, for one forward pass.

    `layers` are the real indices of the model's attention layers (layout.py); everything the recorder hands
    on -- the step's (slots, batch, heads, k) view, row hooks, prefill hooks -- is indexed by dense slot, slot i
    being layers[i], so scorers keep (batch, attention layers, heads) totals whatever the model's layout.
    A layer that calls attention twice on the same query and key (DiffLlama) is recorded once per pass.
    """

    def __init__(self, layers, top_k: int):
        self.layers = list(range(layers)) if isinstance(layers, int) else list(layers)
        self.slot = {layer: slot for slot, layer in enumerate(self.layers)}
        self.top_k = top_k
        self.seq_len = 0  # length of the whole sequence, the current query included
        self.values: list[torch.Tensor | None] = [None] * len(self.layers)  # each (batch, heads, k) float32
        self.positions: list[torch.Tensor | None] = [None] * len(self.layers)  # each (batch, heads, k) int64
        self.tied: list[torch.Tensor | None] = [None] * len(self.layers)  # each (batch, heads): a tie in the top k+1
        self.row_hooks: list = []  # callables (slot, probs, offset) for scorers that need whole rows
        self.prefill_targets: list = []  # (start, end, hook): hook(slot, query_start, probs) for prefill rows
        self.prefilling = False  # True inside `prefilling(...)`: multi-query passes deliver prefill rows
        self.prefilled: set = set()  # slots whose prefill rows this pass has delivered

    def prefill(self, layer, query, key, attention_mask, rule: "Rule") -> None:
        """Deliver the wanted prefill rows, block by block, to each target's hook.

        The prefill pass starts from an empty cache, so query t of the pass sits at key index (and
        padded position) kv_len - q_len + t. Each hook gets probs (batch, heads, block, kv_len) for its
        own query positions [a, b) only, a view of the block being computed; no block is kept.
        """
        slot = self.slot[layer]
        if slot in self.prefilled:  # the same query and key again (layout.py): delivered already
            return
        self.prefilled.add(slot)
        lo = min(start for start, _, _ in self.prefill_targets)
        hi = max(end for _, end, _ in self.prefill_targets)
        for block_start, probs in row_blocks(query, key, attention_mask, rule, lo, hi):
            block_end = block_start + probs.shape[2]
            for start, end, hook in self.prefill_targets:
                a, b = max(start, block_start), min(end, block_end)
                if a < b:
                    hook(slot, a, probs[:, :, a - block_start:b - block_start])

    def add(self, layer: int, probs: torch.Tensor) -> None:
        """probs: (batch, heads, kv_len) float32, the softmax row of the current query in (real) layer `layer`."""
        slot = self.slot[layer]
        if self.values[slot] is not None:  # the same query and key again (layout.py): recorded already
            return
        # A sliding-window cache may hold only the most recent kv_len keys: they are the last
        # kv_len positions of the sequence, so positions are counted from there.
        offset = self.seq_len - probs.shape[-1]
        for hook in self.row_hooks:
            hook(slot, probs, offset)
        values, positions, tied = top_k(probs, self.top_k)  # ties settled by ties.py's rule
        self.tied[slot] = tied
        positions = positions + offset
        missing = self.top_k - values.shape[-1]
        if missing > 0:  # fewer keys than k (a short window): pad with zero mass at position -1
            values = torch.nn.functional.pad(values, (0, missing), value=0.0)
            positions = torch.nn.functional.pad(positions, (0, missing), value=-1)
        self.values[slot] = values
        self.positions[slot] = positions

    def add_eager_attentions(self, attentions) -> None:
        """The fallback: `attentions` is the model output's tuple of (batch, heads, q_len, kv_len), one per
        attention layer in order."""
        recorded = [weights for weights in attentions if weights is not None]
        for layer, weights in zip(self.layers, recorded):
            self.add(layer, weights[:, :, -1, :].float())

    def take(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's top-k values and positions, each (attention layers, batch, heads, k), on one device; the
        rows a tie touched stay for `take_ties`."""
        missing = [self.layers[slot] for slot, v in enumerate(self.values) if v is None]
        if missing:
            raise RuntimeError(f"no attention row was recorded for layers {missing}")
        values = torch.stack([v.to(device) for v in self.values])
        positions = torch.stack([p.to(device) for p in self.positions])
        self.values = [None] * len(self.layers)
        self.positions = [None] * len(self.layers)
        return values, positions

    def take_ties(self, device) -> torch.Tensor:
        """(attention layers, batch, heads) bool: the step's rows whose top k + 1 held a tie (ties.top_k)."""
        tied = torch.stack([t.to(device) for t in self.tied])
        self.tied = [None] * len(self.layers)
        return tied


@contextlib.contextmanager
def recording(model, recorder: Recorder, seq_len: int):
    """Record the rows of the model's single-query forward pass run inside this block."""
    state = state_of(model)
    recorder.seq_len = seq_len
    state.recorder = recorder
    try:
        yield recorder
    finally:
        state.recorder = None


@contextlib.contextmanager
def prefilling(model, recorder: Recorder, targets: list):
    """Deliver prefill rows to `targets` [(start, end, hook), ...] from the model's forward pass run inside this
    block (which must start from an empty cache). Outputs still come from the fast backend."""
    state = state_of(model)
    recorder.prefill_targets, recorder.prefilling, recorder.prefilled = list(targets), True, set()
    state.recorder = recorder
    try:
        yield recorder
    finally:
        state.recorder = None
        recorder.prefill_targets, recorder.prefilling = [], False


@dataclass(frozen=True)
class Rule:
    """The model's own attention maths for one layer, as transformers hands it to the attention function."""

    scaling: float
    softcap: float | None = None  # logits -> tanh(logits / softcap) * softcap (Gemma 2)
    sliding_window: int | None = None  # key j visible from query i only when i - j < sliding_window
    sinks: torch.Tensor | None = None  # (q_heads,) one extra logit per head in the softmax's denominator (GPT-OSS)

    @property
    def needs_exact(self) -> bool:
        """SDPA and flash-attention cannot compute this layer: headscope's own block-wise attention does."""
        return self.softcap is not None or self.sinks is not None


# Keyword arguments transformers' models pass to attention functions. Those that change the maths are
# implemented (Rule, plus dropout and is_causal, which must be the inference values); those below do
# not change it; anything else is refused by name, never ignored.
NO_EFFECT = frozenset({"position_ids", "use_cache", "output_attentions", "output_router_logits", "cache_position",
                       "cache", "past_key_values", "layer_idx", "target_dtype", "logits_to_keep"})


def model_rule(module, scaling, dropout, kwargs) -> Rule:
    """The layer's Rule from the attention function's arguments; refuse what headscope does not implement."""
    for name, value in kwargs.items():
        if value is None or name in NO_EFFECT or name in ("softcap", "sliding_window", "s_aux"):
            continue
        if name == "is_causal" and value:
            continue
        raise HeadscopeError(f"{type(module).__name__} passes `{name}` to its attention function, which headscope "
                             "does not implement: its rows would be wrong, so it refuses this model")
    if dropout:
        raise HeadscopeError(f"{type(module).__name__} applies attention dropout ({dropout}): call model.eval()")
    sinks = kwargs.get("s_aux")
    return Rule(float(scaling), kwargs.get("softcap"), kwargs.get("sliding_window"),
                None if sinks is None else sinks.detach())


def attention_logits(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """q.k * scaling in float32, however the model stores q and k: (batch, kv_heads, rows, dim) x
    (batch, kv_heads, kv_len, dim) -> (batch, kv_heads, rows, kv_len). bf16/fp16 products are never
    rounded (argmaxes near ties would flip) nor overflow (fp16)."""
    return torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling


def capped(logits: torch.Tensor, rule: Rule) -> torch.Tensor:
    """The rule's soft-capping (Gemma 2): tanh(logits / softcap) * softcap; the logits as they are without one."""
    return logits if rule.softcap is None else torch.tanh(logits / rule.softcap) * rule.softcap


def rule_softmax(logits: torch.Tensor, rule: Rule, heads: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the keys of (batch, heads, q, kv_len) masked logits, with the rule's sinks: one more logit per
    head in the denominator (GPT-OSS). `heads`: which query heads the rows are (default: all, in order)."""
    if rule.sinks is None:
        return torch.softmax(logits, dim=-1)
    sinks = rule.sinks.float().to(logits.device)
    sink = (sinks if heads is None else sinks[heads]).view(1, -1, 1, 1).expand(*logits.shape[:3], 1)
    return torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]


def query_probs(
    query: torch.Tensor,  # (batch, q_heads, q, dim): some (or all) of this forward pass's queries
    key: torch.Tensor,  # (batch, kv_heads, kv_len, dim)
    attention_mask: torch.Tensor | None,
    rule: Rule,
    query_index: torch.Tensor | None = None,  # (q,) each query's index on the key axis; default: the last q keys
) -> torch.Tensor:
    """Softmax rows of the queries over all keys, float32, shape (batch, q_heads, q, kv_len).

    The model's own rule: logits = q.k * scaling in float32, soft-capped, then key j is visible from the
    query at key index i when j <= i (causal; a missing mask means causal), i - j < sliding_window, and the
    model's mask allows it (padding). With sinks s_h the softmax is exp(l_j) / (sum_visible exp(l) + exp(s_h)),
    so a row sums to less than 1. Query head h reads KV head h // group (transformers' repeat_kv order),
    without copying keys. A query that sees no key at all (a padding row) gets a row of zeros.
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    # A decoding step with no mask whose window (if any) holds the whole cache sees every key: nothing to hide
    # (the common case, spared the O(context) mask passes).
    sees_every_key = (query_index is None and q_len == 1 and attention_mask is None
                      and (rule.sliding_window is None or kv_len <= rule.sliding_window))
    if query_index is None:
        query_index = torch.arange(kv_len - q_len, kv_len, device=query.device)
    grouped_query = query.reshape(batch, kv_heads, group * q_len, dim)
    logits = capped(attention_logits(grouped_query, key, rule.scaling), rule)  # (batch, kv_heads, group*q, kv_len)
    logits = logits.reshape(batch, q_heads, q_len, kv_len)
    if not sees_every_key:
        logits = hide(logits, query_index, attention_mask, rule)
    probs = rule_softmax(logits, rule)
    return probs if sees_every_key or rule.sinks is not None else probs.nan_to_num(0.0)  # a sink: never 0/0


def hide(logits, query_index, attention_mask, rule: Rule) -> torch.Tensor:
    """-inf where key j is not visible from the query at key index i: j > i (causal), i - j >= window, or the
    model's mask hides it (padding); an additive float mask's other values are added as a bias."""
    visible, bias = visible_keys(query_index, logits.shape[-1], attention_mask, rule.sliding_window, logits.device)
    return (logits if bias is None else logits + bias).masked_fill(~visible, float("-inf"))


def row_blocks(query, key, attention_mask, rule: Rule, start: int, end: int):
    """Yield (first query position, probs (batch, q_heads, block, kv_len)) for the queries at key indices
    [start, end) of a pass whose queries are the last q_len keys, PREFILL_BLOCK rows (or fewer) at a time."""
    q_len, kv_len = query.shape[2], key.shape[2]
    first = kv_len - q_len  # key index of this pass's first query
    start, end = max(start, first), min(end, kv_len)
    block = max(1, min(PREFILL_BLOCK, PREFILL_ELEMENTS // (query.shape[0] * query.shape[1] * kv_len)))
    key = key.float()  # once for all blocks, not once per block
    for block_start in range(start, end, block):
        block_end = min(block_start + block, end)
        index = torch.arange(block_start, block_end, device=query.device)
        yield block_start, query_probs(query[:, :, block_start - first:block_end - first], key, attention_mask,
                                       rule, index)


def attention_output(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """probs (batch, q_heads, q, kv_len) float32, value (batch, kv_heads, kv_len, dim) ->
    (batch, q, q_heads, dim) in value's dtype, the layout attention functions return."""
    batch, q_heads, q_len, kv_len = probs.shape
    kv_heads = value.shape[1]
    grouped = probs.to(value.dtype).reshape(batch, kv_heads, (q_heads // kv_heads) * q_len, kv_len)
    output = torch.matmul(grouped, value)  # (batch, kv_heads, group * q, dim)
    return output.reshape(batch, q_heads, q_len, value.shape[-1]).transpose(1, 2)


def exact_attention(query, key, value, attention_mask, rule: Rule) -> torch.Tensor:
    """Attention computed block-wise from query_probs: exact for every Rule, memory linear in the context.
    For what SDPA and flash-attention cannot compute (soft-capping, sinks)."""
    blocks = [attention_output(probs, value) for _, probs in
              row_blocks(query, key, attention_mask, rule, 0, key.shape[2])]
    return torch.cat(blocks, dim=1)


def _make_attention(backend):
    def headscope_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        rule = model_rule(module, query.shape[-1] ** -0.5 if scaling is None else scaling, dropout, kwargs)
        state = module_state(module)
        layer = calling_layer(module, state)
        if state is not None and state.probe is not None:
            state.probe.saw(layer, module, query, key, rule.sliding_window)
        active = state.recorder if state is not None else None
        if active is None or active.prefilling or query.shape[2] != 1:
            if rule.needs_exact:
                output = exact_attention(query, key, value, attention_mask, rule)
            else:
                # headscope's attention is causal (a missing mask means causal, as in query_probs): say so, since a
                # decoder module may leave is_causal False for the backend to read (BigBird-Pegasus).
                kwargs["is_causal"] = True  # this call's own keyword arguments, read once already (model_rule)
                output, _ = backend(module, query, key, value, attention_mask, scaling=rule.scaling, **kwargs)
            if active is not None and active.prefilling:
                active.prefill(layer, query, key, attention_mask, rule)
        else:
            probs = query_probs(query, key, attention_mask, rule)  # (batch, q_heads, 1, kv_len)
            active.add(layer, probs[:, :, 0])
            output = attention_output(probs, value)
        if state is not None and state.kv_policy is not None:  # kv.py: heads see only the entries their cache keeps
            output = state.kv_policy.apply(layer, output, query, key, value, attention_mask, rule)
        if state is not None and state.ablation is not None:
            output = masking.apply(state.ablation, layer, output, value, attention_mask, rule.sliding_window)
        return output, None

    return headscope_attention


def _flash_backend(*args, **kwargs):
    from transformers.integrations.flash_attention import flash_attention_forward

    return flash_attention_forward(*args, **kwargs)


AttentionInterface.register(ATTN_SDPA, _make_attention(sdpa_attention_forward))
AttentionMaskInterface.register(ATTN_SDPA, sdpa_mask)
AttentionInterface.register(ATTN_FLASH, _make_attention(_flash_backend))
AttentionMaskInterface.register(ATTN_FLASH, flash_attention_mask)


def on_interface(model) -> bool:
    """The model's attention runs through headscope's function now."""
    return model.config._attn_implementation in (ATTN_SDPA, ATTN_FLASH)


def install(model, attn: str = "sdpa") -> bool:
    """Route the model's attention through headscope. False when the model cannot switch its attention function
    (whether its attention modules really call it, the probe of layout.py tells)."""
    name = {"sdpa": ATTN_SDPA, "flash_attention_2": ATTN_FLASH}[attn]
    try:
        model.set_attn_implementation(name)
    except (ValueError, ImportError, KeyError):
        return False
    return on_interface(model)
