"""Ablate attention heads inside headscope's attention function, on every forward pass.

Modes, for each masked head h of a layer (its output o_h at query position i, keys j <= i visible):
  uniform  the head attends uniformly over the visible keys:  o_h[i] = mean_{j visible from i} v_h[j]
           (the retrieval-head paper's masking)
  zero     the head's output is zero:                         o_h[i] = 0
  mean     the head's output is its mean over the prompt:     o_h[i] = mean_{t in prompt} o_h[t]
           (the mean is taken on the prefill and reused on every decoding step)

Uniform outputs are computed in blocks of query positions, so memory stays
O(block x context) per masked head whatever the context length.
"""
from __future__ import annotations

import contextlib

import torch

MODES = ("uniform", "zero", "mean")
QUERY_BLOCK = 512

_ablation: "Ablation | None" = None


class Ablation:
    def __init__(self, heads: dict[int, list[int]], mode: str = "uniform"):
        self.heads = {layer: sorted(set(hs)) for layer, hs in heads.items() if hs}  # layer -> masked query heads
        self.mode = mode
        self.means: dict[int, torch.Tensor] = {}  # layer -> (batch, masked heads, dim), mode "mean"


@contextlib.contextmanager
def ablating(heads: dict[int, list[int]], mode: str = "uniform"):
    """Mask these heads ({layer: [head, ...]}) in every forward pass run inside the block."""
    global _ablation
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    _ablation = Ablation(heads, mode)
    try:
        yield _ablation
    finally:
        _ablation = None


def apply(layer: int, output: torch.Tensor, value: torch.Tensor, attention_mask, sliding_window) -> torch.Tensor:
    """output: (batch, q_len, q_heads, dim) from the attention backend; value: (batch, kv_heads, kv_len, dim)."""
    if _ablation is None or layer not in _ablation.heads:
        return output
    heads = _ablation.heads[layer]
    output = output.clone()
    if _ablation.mode == "zero":
        output[:, :, heads] = 0
    elif _ablation.mode == "uniform":
        output[:, :, heads] = uniform_output(value, heads, output.shape[2], output.shape[1], attention_mask,
                                             sliding_window).to(output.dtype)
    else:  # mean
        if output.shape[1] > 1 or layer not in _ablation.means:  # the prefill: take this prompt's mean
            valid = _query_validity(attention_mask, output, value.shape[2])  # (batch, q_len)
            summed = (output[:, :, heads] * valid[:, :, None, None]).sum(1)
            _ablation.means[layer] = summed / valid.sum(1).clamp(min=1)[:, None, None]
        output[:, :, heads] = _ablation.means[layer][:, None].to(output.dtype)
    return output


def uniform_output(value, heads, q_heads, q_len, attention_mask, sliding_window) -> torch.Tensor:
    """(batch, q_len, len(heads), dim): each masked head's mean of the values visible from each query."""
    batch, kv_heads, kv_len, dim = value.shape
    kv_of_head = torch.tensor(heads, device=value.device) // (q_heads // kv_heads)  # repeat_kv order
    head_values = value[:, kv_of_head].float()  # (batch, masked heads, kv_len, dim)
    key_positions = torch.arange(kv_len, device=value.device)
    blocks = []
    for start in range(0, q_len, QUERY_BLOCK):
        end = min(start + QUERY_BLOCK, q_len)
        query_positions = torch.arange(start, end, device=value.device) + (kv_len - q_len)  # queries are the last
        visible = _visible(attention_mask, query_positions, key_positions, start, end, sliding_window)
        weights = visible.float() / visible.sum(-1, keepdim=True).clamp(min=1)  # (batch or 1, 1, block, kv_len)
        blocks.append(torch.matmul(weights, head_values))  # (batch, masked heads, block, dim)
    return torch.cat(blocks, dim=2).transpose(1, 2)


def _visible(attention_mask, query_positions, key_positions, start, end, sliding_window) -> torch.Tensor:
    if attention_mask is not None and attention_mask.dim() == 4:  # a materialised mask already says it all
        mask = attention_mask[:, :, start:end, -len(key_positions):]
        return mask if mask.dtype == torch.bool else mask == 0
    visible = key_positions[None, :] <= query_positions[:, None]
    if sliding_window is not None:
        visible &= query_positions[:, None] - key_positions[None, :] < sliding_window
    visible = visible[None, None]
    if attention_mask is not None:  # a 2D padding mask (batch, kv_len)
        visible = visible & attention_mask[:, None, None, -len(key_positions):].bool()
    return visible


def _query_validity(attention_mask, output, kv_len) -> torch.Tensor:
    """(batch, q_len) 1.0 for real (non-padding) query positions."""
    batch, q_len = output.shape[:2]
    if attention_mask is None:
        return torch.ones(batch, q_len, device=output.device)
    if attention_mask.dim() == 2:
        return attention_mask[:, -q_len:].float()
    mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    return mask[:, 0, -q_len:, -kv_len:].any(-1).float()  # a padded query sees nothing (or only itself)
