"""Which keys a query sees in one attention call, as the model computes it: the recorder's rows and uniform
ablation read the same rule (a module of its own: the recorder imports masking, so neither can hold it for the
other)."""
from __future__ import annotations

import torch


def visible_keys(query_index: torch.Tensor, kv_len: int, attention_mask, sliding_window: int | None, device):
    """(visible, bias) for the queries at key indices `query_index` (q,) over the call's kv_len keys: visible
    (1 or batch, 1, q, kv_len) where key j is seen from the query at key index i -- j <= i (causal), i - j <
    sliding_window, and the model's mask allows it (a 4D mask's rows: padding, chunks, token selection; a 2D
    padding mask) -- and the bias an additive float mask adds to the logits where it does not hide (None
    otherwise)."""
    keys = torch.arange(kv_len, device=device)
    distance = query_index.to(device)[:, None] - keys[None, :]  # (q, kv_len): i - j
    visible = distance >= 0
    if sliding_window is not None:
        visible = visible & (distance < sliding_window)
    visible, bias = visible[None, None], None  # (1, 1, q, kv_len)
    if attention_mask is not None and attention_mask.dim() == 4:  # (batch, 1, rows of this pass, >= kv_len)
        rows = query_index.to(attention_mask.device) - kv_len + attention_mask.shape[-2]
        mask_rows = attention_mask[:, :, rows, -kv_len:].to(device)
        if mask_rows.dtype == torch.bool:
            visible = visible & mask_rows
        else:  # an additive float mask: its minimum means "hidden", anything else is a bias
            hidden = mask_rows <= torch.finfo(mask_rows.dtype).min / 2
            visible = visible & ~hidden
            bias = mask_rows.float().masked_fill(hidden, 0.0)
    elif attention_mask is not None:  # flash-style 2D padding mask (batch, kv_len)
        visible = visible & attention_mask[:, None, None, -kv_len:].bool().to(device)
    return visible, bias
