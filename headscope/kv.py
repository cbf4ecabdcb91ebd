"""Replay head-level KV cache policies inside headscope's attention function, on every forward pass.

A policy decides which entries each head's cache holds; the attention function then computes that head's
output exactly as if the cache held only those entries: the same keys at the same RoPE positions, fewer of
them. transformers' own cache keeps every entry; a policy reads it, never edits it.

Positions. A batch is laid out as the engine lays it out (`Layout`): every prompt left-padded to the padded
prompt length P, sample b by pad[b] tokens, so it has T[b] = P - pad[b] real prompt tokens and the real position
of padded position p is p - pad[b]. Each layer counts the tokens its passes have fed since the batch began, so
a pass's queries sit at padded positions [first, first + q_len) and its keys at [first + q_len - kv_len,
first + q_len) (a sliding-window cache holds only its last kv_len keys). Key j is visible from query i as the
model sees it -- j <= i, i - j < the layer's sliding window, j not padding -- and then as the policy allows.

Share kept: the prompt's entries every cache keeps over the model's own cache (KV heads x tokens, per layer),
for every policy: a cache kept per query head counts group times.

Policies:
  StreamingHeads   DuoAttention (Xiao et al. 2024): the KV heads of `full` keep every key; every other KV head
                   is a StreamingLLM cache of the first `sink` real tokens and the `recent` last ones, the query's
                   own key included: query i sees key j iff real(j) < sink or i - j < recent. On every pass:
                   the prompt's queries (DuoAttention's streaming-attention mask) and every decoding step.
                   `recent` may depend on the prompt length (the uniform window at another policy's memory).
  SnapSelection    SnapKV (Li et al. 2024) with HeadKV's per-head budgets (Fu et al. 2025): the prompt is read
                   with full attention; then KV head g keeps, of the prompt's prefix [0, P - window), the
                   budget[g] keys with the highest pooled votes, plus the observation window itself, where
                     votes_h[j] = sum over the window's queries i of A_h[i, j]  (the softmax rows, as recorded)
                     pooled_h   = maxpool or avgpool of votes_h, kernel k, padding k // 2, stride 1
                     pooled_g   = mean of pooled_h over the query heads h that read g (kvpress's SnapKVPress)
                   (ties: the earlier position first); `per_query_head`: each query head h keeps its own
                   budget[h] (HeadKV's code, one cache per query head). A sample whose real prefix T - window is shorter than the
                   average budget B keeps everything (SnapKV's and HeadKV's rule). Every generated token is kept.

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

from .recorder import (PREFILL_BLOCK, PREFILL_ELEMENTS, Rule, attention_logits, attention_output, capped, row_blocks,
                       rule_softmax)
from .errors import HeadscopeError
from .runstate import state_of

POOLINGS = ("max", "avg")


@dataclass(frozen=True)
class Layout:
    """How the engine lays a batch out: prompts left-padded to `prompt_len` tokens, sample b by pad[b]."""

    prompt_len: int
    pad: tuple[int, ...]

    @property
    def real_lengths(self) -> list[int]:
        return [self.prompt_len - pad for pad in self.pad]


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
        raise HeadscopeError(f"a per-head attention mask ({tuple(mask.shape)}) is not implemented by the KV cache replay")
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
    those `visible` (batch, 1 or len(heads), q, m), `bias` added to their logits. The model's own maths on those keys: q.k in float32 times the
    model's scaling, soft-capping, sinks, softmax in float32, probabilities cast to the values' dtype."""
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
    that decides whether a prompt is compressed at all."""

    def __init__(self, budgets: torch.Tensor, average: int, window: int, kernel: int, pooling: str = "max",
                 per_query_head: bool = False):
        if kernel % 2 == 0:
            raise ValueError("the pooling kernel must be odd (SnapKV pads it by kernel // 2 on each side)")
        self.budgets, self.average = torch.as_tensor(budgets), average
        self.window, self.kernel, self.pooling = window, kernel, pooling
        self.per_query_head = per_query_head

    def begin(self, layout: Layout) -> None:
        super().begin(layout)
        self.votes: dict[int, torch.Tensor] = {}  # layer -> (batch, q_heads, P) attention mass, until selection
        self.kept: dict[int, tuple] = {}  # layer -> (positions, kept: (batch, n, m) of the n heads replayed, (n,))

    def replay(self, call: AttentionCall, output: torch.Tensor) -> torch.Tensor:
        prompt_len = self.layout.prompt_len
        observed = max(prompt_len - self.window, call.first), min(prompt_len, call.end)
        if observed[0] < observed[1] and not call.repeat:  # a repeated call's rows are the first call's
            self.observe(call, *observed)
        if call.layer not in self.kept and call.end >= prompt_len:
            self.select(call)
        first = max(prompt_len, call.first)
        if first >= call.end or not len(self.kept[call.layer][2]):
            return output  # prompt queries read the full cache; no head dropped anything
        return self.generated(call, output, slice(first - call.first, call.query.shape[2]))

    def observe(self, call: AttentionCall, first: int, end: int) -> None:
        """Add the observation window's rows in this pass (the recorder's rows: the model's own maths) to the votes."""
        prompt_len = self.layout.prompt_len
        if call.layer not in self.votes:
            self.votes[call.layer] = call.query.new_zeros(call.query.shape[0], call.query.shape[1], prompt_len,
                                                          dtype=torch.float32)
        votes = self.votes[call.layer]
        keys = min(call.key.shape[2], prompt_len - call.key_start)  # prompt keys in this pass
        for _, probs in row_blocks(call.query, call.key, call.attention_mask, call.rule,
                                   first - call.key_start, end - call.key_start):
            votes[:, :, call.key_start:call.key_start + keys] += probs[..., :keys].sum(2)

    def select(self, call: AttentionCall) -> None:
        """Choose each unit's kept prefix keys, once per prompt: the top budget[u] pooled votes (SnapKV)."""
        prompt_len, device = self.layout.prompt_len, call.query.device
        prefix = max(prompt_len - self.window, 0)
        votes = self.votes.pop(call.layer, None)
        pad = self.constant("pad", self.layout.pad, device)
        group = 1 if self.per_query_head else call.group
        units = call.query.shape[1] // group
        real_prefix = (prompt_len - pad - self.window).clamp(min=0)  # (batch,)
        if self.budgets.shape[-1] != units:
            raise ValueError(f"{self.budgets.shape[-1]} budgets per layer for {units} caches "
                             f"({'query' if self.per_query_head else 'KV'} heads)")
        budgets = self.budgets[call.layer].to(device)[None]  # (1, units)
        count = torch.where(real_prefix[:, None] >= self.average, budgets.clamp(max=real_prefix[:, None]),
                            real_prefix[:, None].expand(-1, units))  # (batch, units) keys kept of the prefix
        if prefix and votes is not None:
            pool = torch.nn.functional.max_pool1d if self.pooling == "max" else torch.nn.functional.avg_pool1d
            pooled = pool(votes[:, :, :prefix], kernel_size=self.kernel, padding=self.kernel // 2, stride=1)
            pooled = pooled.view(len(pad), units, group, prefix).mean(2)  # a KV head's: its query heads' mean
            padding = torch.arange(prefix, device=device)[None] < pad[:, None]  # (batch, prefix)
            pooled = pooled.masked_fill(padding[:, None], float("-inf"))
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
        kept.scatter_(2, positions, True)  # unchosen slots land in column `prefix` ...
        kept[:, :, prefix:] = True  # ... which is the window's first: the window is kept whole
        self.count(call, kept[:, :, :prompt_len])

    def generated(self, call: AttentionCall, output: torch.Tensor, rows: slice) -> torch.Tensor:
        """The generated queries' outputs over each replayed head's kept prefix, the window and every generated key."""
        positions, kept, heads = self.kept[call.layer]
        device, prompt_len = call.query.device, self.layout.prompt_len
        since = torch.arange(max(prompt_len - self.window, 0), call.end, device=device)  # window + generated
        batch, count = positions.shape[:2]
        positions = torch.cat([positions, since.expand(batch, count, -1)], dim=2)  # (batch, heads, m + since)
        kept = torch.cat([kept, torch.ones(batch, count, len(since), dtype=torch.bool, device=device)], 2)
        visible, bias = call_visible(call, rows, positions)
        output = output.clone()
        output[:, rows, heads] = attend(call, heads, rows, positions, kept[:, :, None] & visible, bias).to(output.dtype)
        return output
