"""Replay head-level KV cache policies inside headscope's attention function, on every forward pass.

A policy decides which entries each head's cache holds; the attention function then computes that head's
output exactly as if the cache held only those entries: the same keys at the same RoPE positions, fewer of
them. transformers' own cache keeps every entry; a policy reads it, never edits it.

Positions. A batch is laid out as the engine lays it out (`Layout`): every prompt left-padded to the padded
prompt length P, sample b by pad[b] tokens, so it has T[b] = P - pad[b] real prompt tokens and the real position
of padded position p is p - pad[b]. Positions count forward passes, not attention calls (a layer may call
attention twice in a pass on the same query and key: DiffLlama): a pass's queries sit at padded positions
[first, first + q_len) and its keys at [first + q_len - kv_len, first + q_len) (a sliding-window cache holds only
its last kv_len keys). Key j is visible from query i as the model sees it -- j <= i, i - j < the layer's sliding
window, and the mask the call receives (padding, Llama 4's chunks, Qwen4-Exp's token selection) -- and then as
the policy allows.

Share kept: the prompt's entries every cache keeps over the model's own cache (KV heads x tokens, per layer),
for every policy: a cache kept per query head counts group times.

Cut: where each prompt is compressed (Layout.cuts). headscope's convention: the prompt's end. kvpress's: the end
of its context (Layout.context), the question fed after it uncompressed; every query before the cut reads the
full cache.

Policies:
  StreamingHeads   DuoAttention (Xiao et al. 2024): the KV heads of `full` keep every key; every other KV head
                   is a StreamingLLM cache of the first `sink` real tokens and the `recent` last ones, the query's
                   own key included: query i sees key j iff real(j) < sink or i - j < recent. On every pass:
                   the prompt's queries (DuoAttention's streaming-attention mask) and every decoding step.
                   `recent` may depend on the prompt length (the uniform window at another policy's memory).
  ContextWindow    kvpress's DuoAttentionPress and StreamingLLMPress: the window fixed at the cut -- a streaming
                   KV head keeps the context's first `sink` and last `recent` tokens and everything after.
  SnapSelection    SnapKV (Li et al. 2024) with HeadKV's per-head budgets (Fu et al. 2025): the prompt is read
                   with full attention up to the cut; then KV head g keeps, of the prefix [0, cut - window), the
                   budget[g] keys with the highest pooled votes, plus the observation window itself, where
                     votes_h[j] = sum over the window's queries i of A_h[i, j]  (the softmax rows, as recorded)
                     pooled_h   = maxpool or avgpool of votes_h, kernel k, padding k // 2, stride 1
                     pooled_g   = mean of pooled_h over the query heads h that read g (kvpress's SnapKVPress)
                   (ties: the earlier position first); `per_query_head`: each query head h keeps its own
                   budget[h] (HeadKV's code, one cache per query head). A sample whose real prefix is shorter
                   than the average budget B keeps everything (SnapKV's and HeadKV's rule); `ratio` instead of
                   budgets: kvpress's int(C * (1 - ratio)) entries of the context. Every later token is kept.

Cost. A policy's kept entries are fixed arithmetic (streaming) or chosen once per prompt per layer and head
(SnapKV: kept key indices), never rebuilt per step from the full row. A replayed head gathers only the entries
it keeps -- (batch, heads, kept, dim) -- so memory stays linear in the context; SnapKV's votes are one float per
head and prompt position until the selection. Heads whose policy keeps every visible key are left to the
backend's output untouched.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import HeadscopeError
from .recorder import (
    PREFILL_BLOCK, PREFILL_ELEMENTS, Rule, attention_logits, attention_output, capped, row_blocks, rule_softmax)
from .runstate import state_of

POOLINGS = ("max", "avg")


@dataclass(frozen=True)
class Layout:
    """How the engine lays a batch out: prompts left-padded to `prompt_len` tokens, sample b by pad[b]."""

    prompt_len: int
    pad: tuple[int, ...]
    context: tuple[int, ...] | None = None  # kvpress's convention: each prompt's real tokens before its question

    @property
    def real_lengths(self) -> list[int]:
        return [self.prompt_len - pad for pad in self.pad]

    @property
    def context_lengths(self) -> list[int]:
        """Each prompt's real tokens compressed: its context (kvpress), or the whole prompt (headscope)."""
        return list(self.context) if self.context is not None else self.real_lengths

    @property
    def cuts(self) -> list[int]:
        """Each prompt's padded position where compression happens: every query before it reads the full cache."""
        return [pad + length for pad, length in zip(self.pad, self.context_lengths)]


@dataclass
class AttentionCall:
    """One call of the attention function: one layer's share of a forward pass."""

    layer: int
    query: torch.Tensor  # (batch, q_heads, q_len, dim)
    key: torch.Tensor  # (batch, kv_heads, kv_len, dim): every entry transformers' cache holds
    value: torch.Tensor  # (batch, kv_heads, kv_len, dim)
    attention_mask: torch.Tensor | None
    rule: Rule
    first: int  # padded position of the pass's first query
    repeat: bool = False  # the layer's second call in this pass on the same query and key (DiffLlama)

    @property
    def end(self) -> int:  # one past the last query's position
        return self.first + self.query.shape[2]

    @property
    def key_start(self) -> int:  # padded position of key index 0
        return self.end - self.key.shape[2]

    @property
    def group(self) -> int:  # query heads per KV head (repeat_kv order: query head h reads KV head h // group)
        return self.query.shape[1] // self.key.shape[1]


@contextlib.contextmanager
def replaying(model, policy: "Policy", layout: Layout):
    """Apply `policy` to every forward pass of the model inside the block: one batch, from its first pass."""
    state = state_of(model)
    policy.begin(layout)
    state.kv_policy = policy
    # Passes are counted at the model's forward, not at attention calls: a layer may call attention twice in one
    # pass on the same query and key (DiffLlama's two maps), and both calls see the same positions.
    hook = model.register_forward_pre_hook(lambda module, args: policy.next_pass())
    try:
        yield policy
    finally:
        hook.remove()
        state.kv_policy = None


class Policy:
    """What every policy shares: the pass bookkeeping and the count of the entries kept."""

    def begin(self, layout: Layout) -> None:
        self.layout = layout
        self.passes = 0  # forward passes begun
        self.seen: dict[int, int] = {}  # layer -> tokens fed so far, its current pass included
        self.last_pass: dict[int, tuple[int, int]] = {}  # layer -> (its last pass, that pass's first position)
        self.counted: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (kept, full) entries, (batch,)
        self.constants: dict[tuple, torch.Tensor] = {}

    def constant(self, name: str, values, device) -> torch.Tensor:
        """A per-batch constant on a layer's device, copied there once (not on every layer and step: a blocking
        host-to-device copy each time)."""
        key = (name, str(device))
        if key not in self.constants:
            self.constants[key] = torch.tensor(values, device=device)
        return self.constants[key]

    def apply(self, layer, output, query, key, value, attention_mask, rule: Rule) -> torch.Tensor:
        """The attention function's hook. output: (batch, q_len, q_heads, dim), the backend's; returns the output
        with every replayed head's rows recomputed over its kept entries."""
        seen_pass, first = self.last_pass.get(layer, (None, 0))
        repeat = seen_pass == self.passes
        if not repeat:
            first = self.seen.get(layer, 0)
            if first == 0 and key.shape[2] != query.shape[2]:
                raise RuntimeError("a KV cache policy must see its batch from the first forward pass (an empty cache)")
            self.seen[layer] = first + query.shape[2]
            self.last_pass[layer] = self.passes, first
        return self.replay(AttentionCall(layer, query, key, value, attention_mask, rule, first, repeat), output)

    def next_pass(self) -> None:
        self.passes += 1

    def replay(self, call: AttentionCall, output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def shares(self) -> list[float]:
        """Per sample: the prompt's KV cache entries kept over all layers / the entries of the model's full cache
        (KV heads x prompt tokens per layer): one unit for every policy."""
        if not self.counted:
            raise RuntimeError("no layer has read the whole prompt yet: nothing is counted")
        kept = sum(counts[0].double().cpu() for counts in self.counted.values())
        full = sum(counts[1].double().cpu() for counts in self.counted.values())
        return (kept / full.clamp(min=1)).tolist()

    def count(self, call: AttentionCall, kept: torch.Tensor) -> None:
        """Count, once per layer, the prompt entries kept: `kept` (batch, caches, P) marks the prompt positions each
        cache holds once the prompt is read -- one cache per KV head, or per query head where a policy keeps one
        per query head (HeadKV's repeated KV) -- over the model's own cache, one per KV head. Both counts are taken
        within what the layer's own cache holds then: the real tokens, and only the last `sliding_window` of them."""
        stored = prompt_store(self.layout, self.constant("pad", self.layout.pad, kept.device), call.rule)  # (batch, P)
        self.counted[call.layer] = ((kept & stored[:, None]).sum((1, 2)), stored.sum(1) * call.key.shape[1])


def prompt_store(layout: Layout, pad: torch.Tensor, rule: Rule) -> torch.Tensor:
    """(batch, P) the prompt positions a layer's full cache holds after the prompt: real, within its window."""
    positions = torch.arange(layout.prompt_len, device=pad.device)
    stored = positions[None] >= pad[:, None]
    if rule.sliding_window is not None:
        stored = stored & (layout.prompt_len - 1 - positions < rule.sliding_window)[None]
    return stored


def call_visible(call: AttentionCall, rows: slice, positions: torch.Tensor):
    """Which keys the model lets each query of the call see, and the bias its mask adds, at the keys at padded
    `positions` (batch, X, m) from the pass's query rows `rows`: (visible (batch, X, q, m), bias or None).

    The keys the call's cache holds, causal order and the sliding window, then the model's own mask -- padding,
    chunked attention (Llama 4), token selection (Qwen4-Exp) -- read at those rows and keys, as the recorder
    reads it (recorder.hide): never rebuilt from the layout. An additive float mask hides where it is at its
    minimum and adds its other values to the logits."""
    device, kv_len, q_len = positions.device, call.key.shape[2], call.query.shape[2]
    query_pos = torch.arange(call.first + rows.start, call.first + rows.stop, device=device)
    index = positions - call.key_start  # (batch, X, m) key indices; outside [0, kv_len): not in the cache
    distance = query_pos[None, None, :, None] - positions[:, :, None, :]
    visible = (distance >= 0) & ((index >= 0) & (index < kv_len))[:, :, None, :]
    if call.rule.sliding_window is not None:
        visible = visible & (distance < call.rule.sliding_window)
    mask, bias = call.attention_mask, None
    if mask is None:
        return visible, bias
    mask = mask.to(device)
    columns = (index - kv_len + mask.shape[-1]).clamp(0, mask.shape[-1] - 1)  # the mask's last kv_len columns
    samples = torch.arange(positions.shape[0], device=device)[:, None, None] % mask.shape[0]  # a batch of 1 broadcasts
    if mask.dim() == 2:  # flash-style padding mask (batch, kv_len)
        return visible & mask[samples, columns].bool()[:, :, None, :], bias
    if mask.shape[1] != 1:
        raise HeadscopeError(f"a per-head attention mask ({tuple(mask.shape)}) is not implemented by the KV cache "
                             "replay")
    mask_rows = torch.arange(rows.start, rows.stop, device=device) - q_len + mask.shape[-2]
    seen = mask[:, 0][samples[..., None], mask_rows.clamp(min=0)[None, None, :, None], columns[:, :, None, :]]
    if seen.dtype == torch.bool:
        return visible & seen, bias
    hidden = seen <= torch.finfo(seen.dtype).min / 2
    return visible & ~hidden, seen.float().masked_fill(hidden, 0.0)


def attend(call: AttentionCall, heads: torch.Tensor, rows: slice, positions: torch.Tensor,
           visible: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The output (batch, q, len(heads), dim) of query heads `heads` at the pass's query rows `rows`, over the keys
    at padded `positions` (batch, 1 or len(heads), m) only -- a reduced cache, gathered -- of which each query sees
    those `visible` (batch, 1 or len(heads), q, m), `bias` added to their logits. The model's own maths on those
    keys: q.k in float32 times the model's scaling, soft-capping, sinks, softmax in float32, probabilities cast to
    the values' dtype."""
    rule, batch = call.rule, call.query.shape[0]
    index = (positions - call.key_start).clamp(0, call.key.shape[2] - 1)  # key indices; hidden ones clamped
    samples = torch.arange(batch, device=index.device)[:, None, None]
    kv_heads = (heads // call.group)[None, :, None]
    keys, values = call.key[samples, kv_heads, index], call.value[samples, kv_heads, index]  # (batch, heads, m, dim)
    logits = capped(attention_logits(call.query[:, heads, rows], keys, rule.scaling), rule)  # (batch, heads, q, m)
    if bias is not None:
        logits = logits + bias
    probs = rule_softmax(logits.masked_fill(~visible, float("-inf")), rule, heads)
    return attention_output(probs.nan_to_num(0.0), values)  # a query that sees nothing (padding) gets 0


def query_blocks(call: AttentionCall, width: int, heads: int):
    """Slices of the pass's query rows, few enough at a time that batch x heads x rows x keys stays bounded;
    `width`: keys per row beyond the block's own rows."""
    batch, q_len = call.query.shape[0], call.query.shape[2]
    size = max(1, min(PREFILL_BLOCK, PREFILL_ELEMENTS // max(batch * heads * (width + PREFILL_BLOCK), 1)))
    for start in range(0, q_len, size):
        yield slice(start, min(start + size, q_len))


class StreamingHeads(Policy):
    """DuoAttention: the KV heads in `full` ({layer: KV heads}) keep every key; the others keep `sink` + `recent`."""

    def __init__(self, full: dict[int, list[int]], sink: int, recent: int | Callable[[int], int]):
        self.full = full
        self.sink = sink
        self.recent = recent  # an int, or T -> recent for a prompt of T real tokens

    def begin(self, layout: Layout) -> None:
        super().begin(layout)
        lengths = layout.real_lengths
        self.recent_of = [self.recent(length) if callable(self.recent) else self.recent for length in lengths]
        self.reach = max(self.recent_of)  # the farthest any query of the batch reaches back
        # Query i (real position r) sees every earlier key when r < sink + recent: nothing to replay before this.
        self.first_replayed = min(layout.pad) + self.sink + min(self.recent_of)
        self.streams: dict[int, tuple[list[int], list[int]]] = {}  # layer -> (streaming KV heads, their query heads)

    def streaming(self, call: AttentionCall) -> tuple[list[int], list[int]]:
        """The layer's streaming KV heads and the query heads that read them (worked out once per layer)."""
        if call.layer not in self.streams:
            kv = [g for g in range(call.key.shape[1]) if g not in self.full.get(call.layer, set())]
            self.streams[call.layer] = kv, [h for h in range(call.query.shape[1]) if h // call.group in kv]
        return self.streams[call.layer]

    def replay(self, call: AttentionCall, output: torch.Tensor) -> torch.Tensor:
        device = call.query.device
        pad, recent = self.constant("pad", self.layout.pad, device), self.constant("recent", self.recent_of, device)
        streaming_kv, heads = self.streaming(call)
        if call.layer not in self.counted and call.end >= self.layout.prompt_len:
            self.count(call, self.kept_after_prompt(streaming_kv, call.key.shape[1], pad, recent))
        if not heads or call.end - 1 < self.first_replayed:
            return output
        output, reach = output.clone(), self.reach
        head_index = self.constant(f"heads {call.layer}", heads, device)
        for rows in query_blocks(call, self.sink + reach, len(heads)):
            first, end = call.first + rows.start, call.first + rows.stop
            # Candidate keys: the sinks, then every position a query of the block may reach back to.
            sinks = pad[:, None] + torch.arange(self.sink, device=device)[None]  # (batch, sink)
            local = torch.arange(first - reach + 1, end, device=device).expand(len(pad), -1)  # (batch, m_local)
            positions = torch.cat([sinks, local], dim=1)
            candidate = torch.cat([sinks < first - reach + 1, torch.ones_like(local, dtype=torch.bool)],
                                  dim=1)  # each key once
            positions = positions[:, None]  # (batch, 1, m): the same keys for every streaming head
            query_pos = torch.arange(first, end, device=device)
            distance = query_pos[None, None, :, None] - positions[:, :, None, :]
            allowed = ((positions - pad[:, None, None] < self.sink)[:, :, None, :]
                       | (distance < recent[:, None, None, None]))
            visible, bias = call_visible(call, rows, positions)
            visible = visible & candidate[:, None, None, :] & allowed
            output[:, rows, head_index] = attend(call, head_index, rows, positions, visible, bias).to(output.dtype)
        return output

    def kept_after_prompt(self, streaming_kv: list[int], kv_heads: int, pad, recent) -> torch.Tensor:
        """(batch, KV heads, P): full heads hold the whole prompt; streaming heads its sinks and last `recent`."""
        prompt_len = self.layout.prompt_len
        positions = torch.arange(prompt_len, device=pad.device)
        window = ((positions[None] - pad[:, None] < self.sink)
                  | (prompt_len - 1 - positions[None] < recent[:, None]))  # (batch, P)
        streams = torch.zeros(kv_heads, dtype=torch.bool, device=pad.device)
        streams[streaming_kv] = True
        return window[:, None] | ~streams[None, :, None]


class ContextWindow(StreamingHeads):
    """kvpress's DuoAttentionPress and StreamingLLMPress: each prompt is read with the full cache up to its cut
    (Layout.cuts: the end of its context); then a streaming KV head keeps the context's first `sink` tokens and its
    last `recent` -- a window fixed at the cut, not sliding -- and every token from the cut on; the KV heads of
    `full` keep every key. `recent` may depend on the context's length C (StreamingLLMPress at a compression
    ratio: int(C * (1 - ratio)) - sink)."""

    def begin(self, layout: Layout) -> None:
        super().begin(layout)
        lengths = layout.context_lengths
        self.recent_of = [self.recent(length) if callable(self.recent) else self.recent for length in lengths]
        self.reach = max(self.recent_of)
        self.first_cut = min(layout.cuts)

    def replay(self, call: AttentionCall, output: torch.Tensor) -> torch.Tensor:
        device = call.query.device
        pad, recent = self.constant("pad", self.layout.pad, device), self.constant("recent", self.recent_of, device)
        cut = self.constant("cut", self.layout.cuts, device)
        streaming_kv, heads = self.streaming(call)
        if call.layer not in self.counted and call.end >= self.layout.prompt_len:
            self.count(call, self.kept_after_prompt(streaming_kv, call.key.shape[1], pad, recent))
        first = max(self.first_cut, call.first)
        if not heads or first >= call.end:
            return output  # queries before the cut read the full cache
        output = output.clone()
        head_index = self.constant(f"heads {call.layer}", heads, device)
        for rows in query_blocks(call, self.sink + self.reach, len(heads)):
            if call.first + rows.stop <= first:
                continue
            # Candidate keys: the sinks, the window before each cut, and every key from the first cut on.
            sinks = pad[:, None] + torch.arange(self.sink, device=device)[None]  # (batch, sink)
            tail = cut[:, None] - self.reach + torch.arange(self.reach, device=device)[None]  # (batch, reach)
            since = torch.arange(self.first_cut, call.first + rows.stop, device=device).expand(len(pad), -1)
            positions = torch.cat([sinks, tail, since], dim=1)
            candidate = torch.cat([sinks < cut[:, None],
                                   (tail >= cut[:, None] - recent[:, None]) & (tail - pad[:, None] >= self.sink),
                                   since >= cut[:, None]], dim=1)  # (batch, m): each key once
            visible, bias = call_visible(call, rows, positions[:, None])
            replayed = attend(call, head_index, rows, positions[:, None], visible & candidate[:, None, None, :], bias)
            query_pos = torch.arange(call.first + rows.start, call.first + rows.stop, device=device)
            past_cut = (query_pos[None] >= cut[:, None])[:, :, None, None]  # (batch, q, 1, 1)
            output[:, rows, head_index] = torch.where(past_cut, replayed.to(output.dtype), output[:, rows, head_index])
        return output

    def kept_after_prompt(self, streaming_kv: list[int], kv_heads: int, pad, recent) -> torch.Tensor:
        """(batch, KV heads, P): full heads hold the whole prompt; streaming heads the context's sinks and last
        `recent`, and everything from the cut on."""
        positions = torch.arange(self.layout.prompt_len, device=pad.device)[None]
        cut = self.constant("cut", self.layout.cuts, pad.device)[:, None]
        window = (positions - pad[:, None] < self.sink) | (positions >= cut - recent[:, None])  # (batch, P)
        streams = torch.zeros(kv_heads, dtype=torch.bool, device=pad.device)
        streams[streaming_kv] = True
        return window[:, None] | ~streams[None, :, None]


def matched_recent(total_kv_heads: int, full_heads: int, sink: int, recent: int) -> Callable[[int], int]:
    """The uniform window at DuoAttention's memory: for a prompt of T tokens, duo with `full_heads` of the
    `total_kv_heads` KV heads full keeps E = full_heads * T + (total - full_heads) * min(T, sink + recent) entries;
    every head streaming with `sink` sinks and the returned `recent` keeps sink + recent = E / total (rounded)."""
    def recent_for(length: int) -> int:
        entries = full_heads * length + (total_kv_heads - full_heads) * min(length, sink + recent)
        return max((2 * entries + total_kv_heads) // (2 * total_kv_heads) - sink, 1)

    return recent_for


class SnapSelection(Policy):
    """SnapKV's selection with a budget per cache (HeadKV): budgets (layers, units) entries of the prefix, a unit
    being a KV head (default: one set per KV head, its query heads' pooled votes averaged, as kvpress's SnapKVPress
    and a GQA deployment keep one cache per KV head) or a query head (`per_query_head`: HeadKV's code, which
    repeats the KV heads and keeps one cache per query head, group times the entries). `average` is the budget B
    that decides whether a prompt is compressed at all. `ratio` instead of budgets: kvpress's ScorerPress, which
    keeps int(C * (1 - ratio)) entries of a context of C tokens, the window included (and keeps the window whole
    where that is fewer).

    Each prompt is compressed at its cut (Layout.cuts): the end of the prompt, or of its context (kvpress's
    convention, the question fed after it). The window is the cut's last `window` tokens; every query at or past
    the cut reads the kept prefix, the window and every key from the cut on."""

    def __init__(self, budgets: torch.Tensor | None, average: int, window: int, kernel: int, pooling: str = "max",
                 per_query_head: bool = False, ratio: float | None = None):
        if kernel % 2 == 0:
            raise ValueError("the pooling kernel must be odd (SnapKV pads it by kernel // 2 on each side)")
        self.budgets = None if budgets is None else torch.as_tensor(budgets)
        self.average, self.ratio = average, ratio
        self.window, self.kernel, self.pooling = window, kernel, pooling
        self.per_query_head = per_query_head

    def begin(self, layout: Layout) -> None:
        super().begin(layout)
        self.votes: dict[int, torch.Tensor] = {}  # layer -> (batch, q_heads, P) attention mass, until selection
        self.kept: dict[int, tuple] = {}  # layer -> (positions, kept: (batch, n, m) of the n heads replayed, (n,))
        self.first_cut, self.last_cut = min(layout.cuts), max(layout.cuts)

    def replay(self, call: AttentionCall, output: torch.Tensor) -> torch.Tensor:
        observed = max(self.first_cut - self.window, call.first), min(self.last_cut, call.end)
        if observed[0] < observed[1] and not call.repeat:  # a repeated call's rows are the first call's
            self.observe(call, *observed)
        if call.layer not in self.kept and call.end >= self.last_cut:
            self.select(call)
        first = max(self.first_cut, call.first)
        if first >= call.end:
            return output  # queries before the cut read the full cache
        if call.layer not in self.kept:
            raise RuntimeError("a query past one prompt's cut came before the batch's last cut was read: the batch's "
                               "contexts must be read in one pass")
        if not len(self.kept[call.layer][2]):
            return output  # no head dropped anything
        return self.compressed(call, output, slice(first - call.first, call.query.shape[2]))

    def observe(self, call: AttentionCall, first: int, end: int) -> None:
        """Add the observation window's rows in this pass (the recorder's rows: the model's own maths) to the votes:
        each prompt's rows in [cut - window, cut)."""
        if call.layer not in self.votes:
            self.votes[call.layer] = call.query.new_zeros(call.query.shape[0], call.query.shape[1],
                                                          self.layout.prompt_len, dtype=torch.float32)
        votes, cut = self.votes[call.layer], self.constant("cut", self.layout.cuts, call.query.device)
        keys = min(call.key.shape[2], self.layout.prompt_len - call.key_start)  # prompt keys in this pass
        for start, probs in row_blocks(call.query, call.key, call.attention_mask, call.rule,
                                       first - call.key_start, end - call.key_start):
            rows = call.key_start + start + torch.arange(probs.shape[2], device=cut.device)  # their positions
            voting = ((rows[None] >= cut[:, None] - self.window) & (rows[None] < cut[:, None])).float()
            votes[:, :, call.key_start:call.key_start + keys] += (probs[..., :keys] * voting[:, None, :, None]).sum(2)

    def prefix_counts(self, real_prefix: torch.Tensor, units: int, layer: int) -> torch.Tensor:
        """(batch, units) the prefix keys each cache keeps, for prefixes of `real_prefix` (batch,) real tokens."""
        if self.ratio is not None:  # kvpress: int(C * (1 - ratio)) entries of the context, its window included
            kept = [int(length * (1 - self.ratio)) - self.window for length in self.layout.context_lengths]
            kept = self.constant("kept by ratio", kept, real_prefix.device)  # in Python's float64, as kvpress
            return torch.minimum(kept.clamp(min=0), real_prefix)[:, None].expand(-1, units)
        if self.budgets.shape[-1] != units:
            raise ValueError(f"{self.budgets.shape[-1]} budgets per layer for {units} caches "
                             f"({'query' if self.per_query_head else 'KV'} heads)")
        budgets = self.budgets[layer].to(real_prefix.device)[None]  # (1, units)
        return torch.where(real_prefix[:, None] >= self.average, budgets.clamp(max=real_prefix[:, None]),
                           real_prefix[:, None].expand(-1, units))

    def select(self, call: AttentionCall) -> None:
        """Choose each unit's kept prefix keys, once per prompt: the top budget[u] pooled votes (SnapKV)."""
        prompt_len, device = self.layout.prompt_len, call.query.device
        pad, cut = self.constant("pad", self.layout.pad, device), self.constant("cut", self.layout.cuts, device)
        prefix_end = (cut - self.window).clamp(min=0)  # (batch,) padded position of each window's first token
        prefix = max(self.last_cut - self.window, 0)  # the widest prefix of the batch
        votes = self.votes.pop(call.layer, None)
        group = 1 if self.per_query_head else call.group
        units = call.query.shape[1] // group
        real_prefix = (prefix_end - pad).clamp(min=0)  # (batch,)
        count = self.prefix_counts(real_prefix, units, call.layer)  # (batch, units) keys kept of the prefix
        if prefix and votes is not None:
            positions = torch.arange(prefix, device=device)[None]
            outside = (positions < pad[:, None]) | (positions >= prefix_end[:, None])  # padding, past its prefix
            # outside a prompt's own prefix the pooling sees what it pads with, as for that prompt alone
            max_pooling = self.pooling == "max"
            votes = votes[:, :, :prefix].masked_fill(outside[:, None], float("-inf") if max_pooling else 0.0)
            pool = torch.nn.functional.max_pool1d if max_pooling else torch.nn.functional.avg_pool1d
            pooled = pool(votes, kernel_size=self.kernel, padding=self.kernel // 2, stride=1)
            pooled = pooled.view(len(pad), units, group, prefix).mean(2)  # a KV head's: its query heads' mean
            pooled = pooled.masked_fill(outside[:, None], float("-inf"))
            order = pooled.sort(dim=-1, descending=True, stable=True).indices  # ties: the earlier position first
        else:
            order = torch.zeros(len(pad), units, 0, dtype=torch.long, device=device)
        most = int(count.max()) if count.numel() else 0
        chosen = torch.arange(most, device=device)[None, None] < count[..., None]  # (batch, units, m)
        positions = torch.where(chosen, order[..., :most], prefix).sort(dim=-1).values  # position order
        replayed = (count < real_prefix[:, None]).any(0).nonzero().flatten()  # units that drop a key of some prompt
        # the query heads of the replayed units, their kept prefix positions and which are real (not the filler
        # `prefix`): (batch, n, m)
        heads = (replayed[:, None] * group + torch.arange(group, device=device)[None]).flatten()
        unit_of_head = replayed.repeat_interleave(group)
        self.kept[call.layer] = (positions[:, unit_of_head], (positions < prefix)[:, unit_of_head], heads)
        kept = torch.zeros(len(pad), units, prompt_len + 1, dtype=torch.bool, device=device)
        kept.scatter_(2, positions, True)  # unchosen slots land in column `prefix`, at or past every window's start:
        kept |= (torch.arange(prompt_len + 1, device=device)[None] >= prefix_end[:, None])[:, None]  # kept whole
        self.count(call, kept[:, :, :prompt_len])

    def compressed(self, call: AttentionCall, output: torch.Tensor, rows: slice) -> torch.Tensor:
        """The outputs of the queries at `rows` (at or past the first cut) over each replayed head's kept prefix, the
        window and every key since; a query before its own prompt's cut keeps the backend's output."""
        positions, kept, heads = self.kept[call.layer]
        device = call.query.device
        cut = self.constant("cut", self.layout.cuts, device)
        prefix_end = (cut - self.window).clamp(min=0)
        since = torch.arange(max(self.first_cut - self.window, 0), call.end, device=device)  # windows + later keys
        batch, count = positions.shape[:2]
        positions = torch.cat([positions, since.expand(batch, count, -1)], dim=2)  # (batch, heads, m + since)
        kept = torch.cat([kept, (since[None] >= prefix_end[:, None])[:, None].expand(-1, count, -1)], 2)
        visible, bias = call_visible(call, rows, positions)
        replayed = attend(call, heads, rows, positions, kept[:, :, None] & visible, bias).to(output.dtype)
        query_pos = torch.arange(call.first + rows.start, call.first + rows.stop, device=device)
        past_cut = (query_pos[None] >= cut[:, None])[:, :, None, None]  # (batch, q, 1, 1)
        output = output.clone()
        output[:, rows, heads] = torch.where(past_cut, replayed, output[:, rows, heads])
        return output
