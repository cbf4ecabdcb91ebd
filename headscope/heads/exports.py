"""Head scores written in the formats of the KV-cache methods that consume them.

  topk    [[layer, head, score], ...] of the K best heads          (HeadScores.top_k_list, written as JSON)
  duo     DuoAttention's pattern folder: full_attention_heads.tsv (layers x KV heads, in [0, 1]) + config.json
                                                                   (HeadScores.duo, written by write_duo)
  razor   RazorAttention-style {"layer": [heads]} of the K best heads (HeadScores.razor, written as JSON)
  headkv  HeadKV's per-head KV budgets                             (HeadScores.headkv, laid out by headkv_json)

What each pattern is lives in heads/ (the value and patterns.py); this module only lays them out on disk.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import HeadscopeError
from ..runs.outputs import atomic_write_json, atomic_write_text, head_key


def write_duo(pattern: np.ndarray, folder: str | Path, sink_size: int, recent_size: int) -> list[Path]:
    """A folder DuoAttention's `load_attn_pattern(folder)` reads: full_attention_heads.tsv (one line per
    layer, one tab-separated value per KV head) and config.json ({"sink_size", "recent_size"}); returns both."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise HeadscopeError(f"--to duo writes a folder, but {folder} is a file")
    lines = ["\t".join(repr(float(value)) for value in row) for row in pattern]  # exact: raw ties stay broken
    atomic_write_text(folder / "full_attention_heads.tsv", "\n".join(lines) + "\n")
    atomic_write_json(folder / "config.json", {"sink_size": sink_size, "recent_size": recent_size})
    return [folder / "full_attention_heads.tsv", folder / "config.json"]


def headkv_json(budgets: np.ndarray, layout: str = "keys", layers: list[int] | None = None):
    """{"L-H": budget} (layout "keys") or the layers x heads nested list (layout "matrix"). Row i of `budgets` is
    layer layers[i] (a hybrid model's attention layers; default: row i is layer i)."""
    if layout == "matrix":
        return budgets.tolist()
    layers = list(range(budgets.shape[0])) if layers is None else layers
    return {head_key(layer, head): int(budgets[row, head])
            for row, layer in enumerate(layers) for head in range(budgets.shape[1])}
