"""The reference headscope is measured against: the model's own eager attention (the `eager_attention_forward`
of its modeling file), as the rows it actually applies to the values.

Most families return those rows as their attention weights. Some do not: Granite-SWA scales each row's
output by a post-softmax sink factor and returns the unscaled weights. So the reference row is the weights
rescaled to what the layer applies: the eager output for all-ones values, head by head, is each row's total
weight, and the weights are scaled to it (a factor of exactly 1 where weights are the effective attention).
headscope's rows (which take the sink into the softmax) are compared with that.
"""
from __future__ import annotations

import contextlib
import sys

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .runstate import calling_layer, module_state, state_of

EAGER_ROWS = "headscope-eager-rows"


def model_eager_attention(module):
    """The reference attention function of the module's modeling file (None for code that has none)."""
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)


def float_mask(attention_mask, device):
    """Eager code adds its mask: a boolean mask becomes 0 / -inf, a float mask float32."""
    if attention_mask is None or attention_mask.dtype != torch.bool:
        return None if attention_mask is None else attention_mask.float()
    return torch.zeros(attention_mask.shape, device=device).masked_fill(~attention_mask.to(device), float("-inf"))


def eager_output_and_rows(module, query, key, value, attention_mask, kwargs):
    """(output (batch, q, heads, value dim), rows (batch, heads, q, kv_len)), both float32: the eager code's output
    and rows for these queries, keys, values and mask (upcast to float32), the rows scaled to the weight each
    applies to the values. None when the module's file has no eager attention function."""
    eager = model_eager_attention(module)
    if eager is None:
        return None
    mask = float_mask(attention_mask, query.device)
    arguments = {name: value for name, value in kwargs.items() if name != "dropout"}
    query, key, value = query.float(), key.float(), value.float()
    with torch.no_grad():
        output, weights = eager(module, query, key, value, mask, dropout=0.0, **arguments)
        applied, _ = eager(module, query, key, torch.ones_like(value), mask, dropout=0.0, **arguments)
    weights = weights.float()
    applied = applied[..., 0].transpose(1, 2).float()  # (batch, heads, q): each row's total weight on the values
    total = weights.sum(-1)
    scale = torch.where(total > 0, applied / total.clamp(min=1e-30), torch.ones_like(total))
    return output.float(), (weights * scale[..., None]).nan_to_num(0.0)


def effective_rows(module, query, key, value, attention_mask, kwargs) -> torch.Tensor | None:
    """The rows of `eager_output_and_rows` (None when the module's file has no eager attention function)."""
    found = eager_output_and_rows(module, query, key, value, attention_mask, kwargs)
    return None if found is None else found[1]


@contextlib.contextmanager
def recording_eager_rows(model, keep):
    """Run the model on its own eager attention, handing `keep(layer, rows)` every call's effective rows
    (batch, heads, q, kv_len) float32, `layer` the call's real layer index (the first call per layer and pass
    counts: DiffLlama's second call has the same rows)."""
    state = state_of(model)
    previous = model.config._attn_implementation

    def eager_and_keep(module, query, key, value, attention_mask, **kwargs):
        eager = model_eager_attention(module)
        output, weights = eager(module, query, key, value, attention_mask, **kwargs)
        keep(calling_layer(module, module_state(module)), effective_rows(module, query, key, value, attention_mask,
                                                                         kwargs))
        return output, weights

    ALL_ATTENTION_FUNCTIONS.register(EAGER_ROWS, eager_and_keep)
    ALL_MASK_ATTENTION_FUNCTIONS.register(EAGER_ROWS, ALL_MASK_ATTENTION_FUNCTIONS.get("eager", sdpa_mask))
    model.set_attn_implementation(EAGER_ROWS)
    try:
        yield state
    finally:
        model.set_attn_implementation(previous)
