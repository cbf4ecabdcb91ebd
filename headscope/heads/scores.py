"""`HeadScores`: one loaded heads (or summary) file, and everything the commands read from it.

A heads file {"L-H": [scores]} or a summary file {"L-H": {"mean", ...}} is read once into a summary
({"L-H": {"mean", "std", "count", "max"}}, a head with no value keeping mean None); the value then holds what
`show`, `compare`, `export`, `ablate`, `kv`, `specificity` and `report` take from it: the model it was made on
(the run's manifest beside it), its layers (a hybrid model's attention layers by their real indices), the means
matrix and counts, the KV-head pooling of grouped-query attention, the top K, the DuoAttention / HeadKV / Razor
patterns, and the refusal of another model's file. No consumer re-derives any of these from the dict.

May import: errors, schema, outputs, store (and patterns.py beside it) -- never the engine, the experiments,
the command line or the report.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from ..runs import schema, store
from ..errors import HeadscopeError
from ..runs.outputs import head_key, heads_by_layer, parse_head_key, plain, ranked, summarize
from . import patterns

RUN_FILE = re.compile(r"^(?P<prefix>.+)_(?P<kind>heads|summary)(?P<shard>\.shard-\d+-of-\d+)?\.json$")


# ---------------------------------------------------------------------------------------- run files

def companion(path: str | Path, kind: str) -> Path:
    """The file of another `kind` (samples, manifest, heatmap, ...) from the same run as a heads/summary file.

    NAME_TASK_heads.json -> NAME_TASK_samples.jsonl; other names just get `_kind` after their stem."""
    path = Path(path)
    match = RUN_FILE.match(path.name)
    prefix, shard = (match["prefix"], match["shard"] or "") if match else (path.stem, "")
    extension = {"samples": ".jsonl", "manifest": ".json", "summary": ".json"}.get(kind, ".png")
    return path.with_name(f"{prefix}_{kind}{shard}{extension}")


def read_manifest(path: str | Path) -> dict | None:
    """The run's manifest beside a score file (checked), or None when there is none."""
    return store.read_manifest(companion(path, "manifest"))


def read_summary(path: str | Path) -> dict[str, dict]:
    """A heads file ({"L-H": [scores]}) or a summary file ({"L-H": {"mean", ...}}), told apart by its values.
    A head with no value (an empty list, a null mean) keeps mean None: it is never ranked, shown or exported
    as if it had scored 0."""
    data = schema.read_json(path, "score file")
    if not isinstance(data, dict) or not data:
        raise HeadscopeError(f"{path} is not a heads or summary file: expected a non-empty object keyed by LAYER-HEAD")
    for key in data:
        parse_head_key(key)
    values = list(data.values())
    if all(isinstance(v, list) and all(schema.is_number(s) for s in v) for v in values):
        data = summarize(data)
        values = list(data.values())
    if all(isinstance(v, dict) and (schema.is_number(v.get("mean")) or v.get("mean") is None) for v in values):
        return {key: _head_stats(v) for key, v in data.items()}
    raise HeadscopeError(f"{path} is not a heads or summary file: each LAYER-HEAD must map to a list of scores "
                         "or to {\"mean\": ...}")


def _head_stats(stats: dict) -> dict:
    if stats["mean"] is None:
        return {"mean": None, "std": None, "count": 0, "max": None}
    return {"mean": float(stats["mean"]), "std": float(stats.get("std") or 0.0), "count": int(stats.get("count", 0)),
            "max": float(stats.get("max") if stats.get("max") is not None else stats["mean"])}


# ----------------------------------------------------------------------------------------- the grid

def grid_layers(keys) -> tuple[list[int], int]:
    """(the layers, ascending, heads per layer) of a complete LAYER-HEAD grid: every present layer with heads
    0..H-1. The layers are the model's attention layers by their real indices (a hybrid's skip the others); a
    missing or stray head id is an error."""
    pairs = {parse_head_key(key) for key in keys}
    if min(min(pair) for pair in pairs) < 0:
        raise HeadscopeError("head ids must not be negative")
    layers = sorted({layer for layer, _ in pairs})
    heads = 1 + max(head for _, head in pairs)
    if len(pairs) != len(layers) * heads:
        missing = next(head_key(l, h) for l in layers for h in range(heads) if (l, h) not in pairs)
        raise HeadscopeError(f"the head ids do not form a full layers x heads grid: {len(layers)} x {heads} would "
                             f"need {missing}, which is missing (is a head id like 99-0 out of range?)")
    return layers, heads


def grid_shape(keys) -> tuple[int, int]:
    """(layers, heads) of a complete LAYER-HEAD grid (see grid_layers)."""
    layers, heads = grid_layers(keys)
    return len(layers), heads


def shape_of(keys) -> str:
    """"6 layers x 8 heads" (each side of a mismatch says its own), or "N heads" when they are not a full grid."""
    try:
        layers, heads = grid_shape(keys)
    except HeadscopeError:
        return f"{len(keys)} heads"
    return f"{layers} layers x {heads} heads"


def check_top(k: int, num_heads: int) -> None:
    if k < 1:
        raise HeadscopeError(f"K must be at least 1, not {k}")
    if k > num_heads:
        raise HeadscopeError(f"K = {k} is larger than the number of heads ({num_heads})")


# ---------------------------------------------------------------------------------------- the value

@dataclass(frozen=True)
class HeadScores:
    """One score file's heads. `summary`: {"L-H": {"mean", "std", "count", "max"}} (mean None: no value);
    `path`: the file, as refusals name it (None: scores made in memory); `given_manifest`: the run's manifest when
    the caller holds it. Otherwise the manifest beside the file is read when first asked for, so that a consumer
    that never asks reads no more files than before."""

    summary: dict[str, dict]
    path: str | None = None
    given_manifest: dict | None = None

    @classmethod
    def load(cls, path: str | Path) -> HeadScores:
        """A heads or summary file, checked (one line for anything else)."""
        return cls(read_summary(path), str(path))

    @classmethod
    def from_summary(cls, summary: dict[str, dict], manifest: dict | None = None) -> HeadScores:
        """Scores already in memory (a run's summary derived from its rows, a rescored one)."""
        return cls(summary, None, manifest)

    def plain(self) -> HeadScores:
        """The same heads with a head that has no value counting as 0 (`outputs.plain`: ranking, comparing)."""
        return HeadScores(plain(self.summary), self.path, self.given_manifest)

    # ------------------------------------------------------------------------------ the model it is for

    @cached_property
    def manifest(self) -> dict:
        """The run's manifest ({} when there is none beside the file)."""
        if self.given_manifest is not None or self.path is None:
            return self.given_manifest or {}
        return read_manifest(self.path) or {}

    @property
    def model_path(self) -> str | None:
        """The model the run scored, as its manifest records it."""
        return self.manifest.get("model_path")

    @property
    def model_layers(self) -> int | None:
        """The model's layer count (its attention layers and any others), from the manifest."""
        return self.manifest.get("layers")

    def refuse_other_model(self, keys: list[str]) -> None:
        """The file must score exactly the model's heads (`keys`): a file of another model (another shape) is
        refused."""
        if set(self.summary) != set(keys):
            extra = sorted(set(self.summary) - set(keys), key=parse_head_key)
            missing = sorted(set(keys) - set(self.summary), key=parse_head_key)
            detail = f"it has head {extra[0]}, which the model does not have" if extra else f"it lacks head {missing[0]}"
            raise HeadscopeError(f"{self.path} scores {shape_of(self.summary)}, and the model being run has "
                                 f"{shape_of(keys)} ({detail}): the score file is for another model")

    def checked(self) -> HeadScores:
        """Itself, once its heads are the heads of its run's model when a manifest lies beside the file (a head the
        model cannot have, e.g. 99-0 in a 6-layer model, is refused) and a full layers x heads grid."""
        if self.manifest:
            self.refuse_other_model(self.manifest["heads"])
        self.refuse_partial_grid()
        return self

    def refuse_partial_grid(self) -> None:
        """One line when the head ids are not a full layers x heads grid (a missing or stray id, e.g. 99-0)."""
        grid_layers(self.summary)

    @cached_property
    def named_attention_layers(self) -> list[int]:
        """The layers the file says are its model's attention layers (a hybrid's config does not say which are):
        its layers when they are not 0..n-1, or when its manifest names them as the attention layers; [] when
        nothing says so. Read from the head ids alone (not yet a checked grid)."""
        named = sorted({parse_head_key(key)[0] for key in self.summary})
        if named != list(range(len(named))) or self.manifest.get("attention_layers") == named:
            return named
        return []

    # ------------------------------------------------------------------------------------------ the grid

    @cached_property
    def _grid(self) -> tuple[list[int], int]:
        return grid_layers(self.summary)

    @property
    def layers(self) -> list[int]:
        """The attention layers, ascending, by their real indices (a hybrid model's skip its other layers); row i
        of every matrix is layer layers[i]."""
        return self._grid[0]

    @property
    def heads_per_layer(self) -> int:
        return self._grid[1]

    @cached_property
    def keys(self) -> list[str]:
        """The head ids in grid order (layer, then head)."""
        return sorted(self.summary, key=parse_head_key)

    @cached_property
    def means(self) -> np.ndarray:
        """The (layers, heads) array of mean scores; a head with no value counts as 0 in a matrix (heatmaps,
        KV-cache policies). Read-only: it is shared by every reader."""
        return self._matrix("mean")

    @cached_property
    def counts(self) -> np.ndarray:
        """The (layers, heads) array of how many samples gave each head a value."""
        return self._matrix("count").astype(int)

    def _matrix(self, field: str) -> np.ndarray:
        row = {layer: index for index, layer in enumerate(self.layers)}
        matrix = np.zeros((len(self.layers), self.heads_per_layer))
        for key, stats in self.summary.items():
            layer, head = parse_head_key(key)
            matrix[row[layer], head] = stats.get(field) or 0
        matrix.setflags(write=False)
        return matrix

    @cached_property
    def valued(self) -> int:
        """How many heads have a value (at least one passing sample scored them)."""
        return sum(stats["mean"] is not None for stats in self.summary.values())

    def at_least(self, min_score: float) -> int:
        """How many heads have a mean of at least `min_score`."""
        return sum(stats["mean"] is not None and stats["mean"] >= min_score for stats in self.summary.values())

    # ------------------------------------------------------------------------------------------- top K

    def top(self, k: int) -> list[str]:
        """The K best heads by mean (ties by layer then head, as `outputs.ranked`); a head with no value is never
        among them, so K larger than the heads with a value is refused."""
        check_top(k, len(self.summary))
        if k > self.valued:
            raise HeadscopeError(f"K = {k}, but only {self.valued} of the {len(self.summary)} heads have a value (no "
                                 "passing sample scored the others)")
        return [key for key, _ in ranked(self.summary)[:k]]

    def top_k_list(self, k: int) -> list[list]:
        """[[layer, head, mean score], ...] of the K best heads, best first (`export --to topk`)."""
        return [[*parse_head_key(key), self.summary[key]["mean"]] for key in self.top(k)]

    def razor(self, k: int) -> dict[str, list[int]]:
        """RazorAttention-style {"layer": [head, ...]} of the K best heads: string layer keys in layer order, heads
        sorted (`export --to razor`)."""
        return {str(layer): heads for layer, heads in sorted(heads_by_layer(self.top(k)).items())}

    # ------------------------------------------------------------------------------------ KV heads (GQA)

    def kv_scores(self, num_kv_heads: int, reduce: str = "max") -> np.ndarray:
        """(layers, KV heads): each KV head's query heads pooled by `reduce` (patterns.kv_head_scores)."""
        return patterns.kv_head_scores(self.means, num_kv_heads, reduce)

    def kv_keys(self, num_kv_heads: int) -> list[str]:
        """The KV heads' ids "L-G" (L the real layer), in the row-major order of `kv_scores`."""
        return [head_key(layer, group) for layer in self.layers for group in range(num_kv_heads)]

    def top_kv(self, num_kv_heads: int, k: int) -> list[str]:
        """The K KV heads DuoAttention's pattern keeps full (`keep_best` of the max-pooled scores), in layer order:
        what `export --to duo` marks and `headscope kv` replays."""
        kept = patterns.keep_best(self.kv_scores(num_kv_heads), k).ravel()
        return [key for key, full in zip(self.kv_keys(num_kv_heads), kept) if full]

    # ---------------------------------------------------------------------------------------- patterns

    def duo(self, num_kv_heads: int, threshold: float | None = None, sparsity: float | None = None,
            raw: bool | None = None) -> np.ndarray:
        """DuoAttention's full_attention_heads, (layers, KV heads) in [0, 1] (patterns.duo_pattern)."""
        return patterns.duo_pattern(self.means, num_kv_heads, threshold, sparsity, raw)

    def headkv(self, budget: int, beta: float = 1.2, temperature: float = 1.0,
               num_kv_heads: int | None = None) -> np.ndarray:
        """HeadKV's integer budgets (patterns.headkv_budgets): per query head, (layers, heads); or with
        `num_kv_heads`, per KV head, each scoring the mean of its query heads, (layers, KV heads)."""
        scores = self.means if num_kv_heads is None else self.kv_scores(num_kv_heads, "mean")
        return patterns.headkv_budgets(scores, budget, beta, temperature)
