"""What a decoding pass is handed: the KV cache of the kind the model expects, and positions under padding."""
from __future__ import annotations

import inspect

from transformers import DynamicCache


def positions_of(mask):
    """Left padding: positions count real tokens only, as generate() does. mask: (batch, length) of 0/1."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def cache_argument(model) -> str:
    # transformers 5 renames `past_key_values` to `cache`; accept whichever this version has.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def fresh_cache(model) -> dict:
    """The forward keyword arguments of a new, empty KV cache: a DynamicCache laid out from the config (hybrid
    layers included) or, for a family with a cache class of its own (MiniMax), none yet: the model makes its own
    on the first pass and `carry_cache` keeps it."""
    if not model._supports_default_dynamic_cache():
        return {cache_argument(model): None, "use_cache": True}
    return {cache_argument(model): DynamicCache(config=model.config), "use_cache": True}


def carry_cache(cache_kw: dict, output) -> None:
    """Keep the cache a pass returned (the one the model made itself, when it was handed none)."""
    name = next(iter(cache_kw))
    if cache_kw[name] is None:
        cache_kw[name] = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
