"""Ablate attention heads inside headscope's attention function, on every forward pass.

Modes, for each masked head h of a layer (its output o_h at query position i, keys j <= i visible):
  uniform  the head attends uniformly over the visible keys:  o_h[i] = mean_{j visible from i} v_h[j]
           (the retrieval-head paper's masking)
  zero     the head's output is zero:                         o_h[i] = 0
  mean     the head's output is its mean over the prompt:     o_h[i] = mean_{t in prompt} o_h[t]
           (the mean is taken on the prefill and reused on every decoding step)

Visible keys are those the model's own attention sees: causal order, its sliding window, and its mask (padding,
Llama 4's chunks, Qwen4-Exp's token selection). Uniform outputs come from prefix sums over the keys, O(context)
time and memory per masked head, where the call has no mask or flash's 2D padding mask; from the 4D mask's rows,
block by block (the cost of one attention pass), where it has one: such a mask may hide any key.
"""
from __future__ import annotations

import contextlib

import torch

from .runstate import state_of
from .visibility import visible_keys

MODES = ("uniform", "zero", "mean")
ROWS = 256  # query rows whose uniform weights over the keys are built at once (a 4D mask)


class Ablation:
    def __init__(self, heads: dict[int, list[int]], mode: str = "uniform"):
        self.heads = {layer: sorted(set(hs)) for layer, hs in heads.items() if hs}  # layer -> masked query heads
        self.mode = mode
        self.means: dict[int, torch.Tensor] = {}  # layer -> (batch, masked heads, dim), mode "mean"


@contextlib.contextmanager
def ablating(model, heads: dict[int, list[int]], mode: str = "uniform"):
    """Mask these heads ({layer: [head, ...]}) in every forward pass of the model run inside the block."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    state = state_of(model)
    state.ablation = Ablation(heads, mode)
    try:
        yield state.ablation
    finally:
        state.ablation = None


def apply(ablation: Ablation, layer: int, output: torch.Tensor, value: torch.Tensor, attention_mask,
          sliding_window) -> torch.Tensor:
    """output: (batch, q_len, q_heads, dim) from the attention backend; value: (batch, kv_heads, kv_len, dim)."""
    if layer not in ablation.heads:
        return output
    heads = ablation.heads[layer]
    output = output.clone()
    if ablation.mode == "zero":
        output[:, :, heads] = 0
    elif ablation.mode == "uniform":
        output[:, :, heads] = uniform_output(value, heads, output.shape[2], output.shape[1], attention_mask,
                                             sliding_window).to(output.dtype)
    else:  # mean
        if output.shape[1] > 1 or layer not in ablation.means:  # the prefill: take this prompt's mean
            valid = _query_validity(attention_mask, output, value.shape[2])  # (batch, q_len)
            summed = (output[:, :, heads] * valid[:, :, None, None]).sum(1)
            ablation.means[layer] = summed / valid.sum(1).clamp(min=1)[:, None, None]
        output[:, :, heads] = ablation.means[layer][:, None].to(output.dtype)
    return output


def uniform_output(value, heads, q_heads, q_len, attention_mask, sliding_window) -> torch.Tensor:
    """(batch, q_len, len(heads), dim): each masked head's mean of the values visible from each query.

    With a 4D mask: `masked_uniform_output`. Otherwise the keys a query at key index i sees are the real
    (non-padding) ones among [max(0, i - window + 1), i], so
    with prefix sums S[j] = sum_{t < j} valid[t] v[t] and N[j] = sum_{t < j} valid[t] the mean is
    (S[i + 1] - S[lo]) / (N[i + 1] - N[lo]): O(kv_len) per head whatever the number of queries.
    Sums are float64: a difference of two long prefix sums keeps its precision.
    """
    batch, kv_heads, kv_len, dim = value.shape
    kv_of_head = torch.tensor(heads, device=value.device) // (q_heads // kv_heads)  # repeat_kv order
    if attention_mask is not None and attention_mask.dim() == 4:
        per_head = attention_mask.shape[1]  # 1, or a mask per query head (Doge) or per KV head
        group = q_heads // kv_heads
        mask_heads = None if per_head == 1 else list(heads) if per_head == q_heads else [h // group for h in heads]
        mask = attention_mask if mask_heads is None else attention_mask[:, mask_heads]
        return masked_uniform_output(value[:, kv_of_head], q_len, mask, sliding_window)
    valid = _key_validity(attention_mask, batch, kv_len, value.device)  # (batch, kv_len) float64
    head_values = value[:, kv_of_head].double() * valid[:, None, :, None]  # (batch, masked heads, kv_len, dim)
    sums = torch.nn.functional.pad(head_values.cumsum(2), (0, 0, 1, 0))  # (batch, masked heads, kv_len + 1, dim)
    counts = torch.nn.functional.pad(valid.cumsum(1), (1, 0))  # (batch, kv_len + 1)
    end = torch.arange(kv_len - q_len + 1, kv_len + 1, device=value.device)  # queries are the last q_len keys
    start = (end - sliding_window).clamp(min=0) if sliding_window is not None else torch.zeros_like(end)
    totals = sums[:, :, end] - sums[:, :, start]  # (batch, masked heads, q_len, dim)
    count = (counts[:, end] - counts[:, start]).clamp(min=1)  # (batch, q_len); a padding query sees nothing: 0
    return (totals / count[:, None, :, None]).transpose(1, 2)


def masked_uniform_output(head_values, q_len, attention_mask, sliding_window) -> torch.Tensor:
    """(batch, q_len, heads, dim): the mean of `head_values` (batch, heads, kv_len, dim) over the keys each query
    sees as the recorder's rows see them (visibility.visible_keys: causal, window, the 4D mask), a block of rows at
    a time."""
    batch, heads, kv_len, dim = head_values.shape
    blocks = []
    for start in range(kv_len - q_len, kv_len, ROWS):
        query_index = torch.arange(start, min(start + ROWS, kv_len), device=head_values.device)
        visible, _ = visible_keys(query_index, kv_len, attention_mask, sliding_window, head_values.device)
        weights = visible.float()  # a bias is not a weight
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=1)  # a query that sees nothing: 0
        blocks.append(torch.matmul(weights.expand(batch, -1, -1, -1), head_values.float()))  # (batch, heads, q, dim)
    return torch.cat(blocks, dim=2).transpose(1, 2)


def _key_validity(attention_mask, batch, kv_len, device) -> torch.Tensor:
    """(batch, kv_len) 1.0 for real keys, 0.0 for padding, from no mask or a 2D padding mask (a 4D one is read
    row by row: `masked_uniform_output`)."""
    if attention_mask is None:
        return torch.ones(batch, kv_len, dtype=torch.float64, device=device)
    return attention_mask[:, -kv_len:].to(device, torch.float64)


def _query_validity(attention_mask, output, kv_len) -> torch.Tensor:
    """(batch, q_len) 1.0 for real (non-padding) query positions."""
    batch, q_len = output.shape[:2]
    if attention_mask is None:
        return torch.ones(batch, q_len, device=output.device)
    if attention_mask.dim() == 2:
        return attention_mask[:, -q_len:].float()
    if attention_mask.dtype == torch.bool:
        seen = attention_mask
    else:  # an additive mask hides at its minimum; elsewhere it may add a bias (Doge's dynamic mask)
        seen = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    return seen[:, :, -q_len:, -kv_len:].any(-1).any(1).float()  # a padded query sees nothing (or only itself)
