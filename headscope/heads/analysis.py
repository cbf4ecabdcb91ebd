"""Asking how much to trust score files: agreement of two, stability under resampling, GQA configs, samples.

A score file itself is a `HeadScores` (heads/scores.py: its grid, means, top K, KV pooling); the functions here
take those, or numpy arrays of shape (samples, layers * heads).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..runs import store
from ..errors import HeadscopeError, loading_reason
from . import HeadScores
from .patterns import kv_head_scores  # noqa: F401 -- the README's name for it: headscope.heads.analysis.kv_head_scores
from .scores import check_top, grid_shape
from ..runs.outputs import parse_head_key


# ---------------------------------------------------------------------------------------------- files

def existing_samples(path: str | Path) -> Path:
    """The samples file `path`, refused in one line when it is missing."""
    if not Path(path).exists():
        raise HeadscopeError(f"no samples file {path}: it is written next to the heads file by `detect`")
    return Path(path)


def read_samples(path: str | Path) -> list[dict]:
    """NAME_TASK_samples.jsonl, checked row by row (store.read_rows: every reader alike)."""
    return store.read_rows(existing_samples(path))


# The NIAH grid's context length is the setting (the haystack is cut to it minus --length-buffer); the prompts the
# model read are shorter: the axis gives both.
LENGTH_AXIS = "context length setting (mean prompt tokens)"


def length_labels(rows: list[dict], lengths: list) -> list[str]:
    """"300 (125)": each context length setting with the mean length of its prompts in tokens, when recorded."""
    labels = []
    for length in lengths:
        tokens = [row["prompt_tokens"] for row in rows
                  if row.get("context_length") == length and row.get("prompt_tokens") is not None]
        labels.append(f"{length} ({sum(tokens) / len(tokens):.0f})" if tokens else str(length))
    return labels


# ------------------------------------------------------------------------------------------------ GQA

def num_kv_heads_from_config(model: str, local_only: bool = False, trust_remote_code: bool = False) -> tuple[int, int]:
    """(num_attention_heads, num_key_value_heads) from a model's config.json (MHA: the two are equal). A config
    that needs custom code (an auto_map) is refused unless the user passed --trust-remote-code: a model named
    by a file (a run's manifest) is not trusted."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, local_files_only=local_only, trust_remote_code=trust_remote_code)
    except Exception as error:  # transformers raises many types; the user needs one line
        raise HeadscopeError(f"cannot read the config of {model!r}: {loading_reason(error)}") from None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(config, "num_attention_heads", None)
    if heads is None:
        raise HeadscopeError(f"the config of {model!r} has no num_attention_heads")
    return heads, getattr(config, "num_key_value_heads", None) or heads


def layers_line(layers: list[int], total: int | None) -> str | None:
    """"attention layers 1, 3 of 4" when the heads' layers are not every layer 0..n-1 (a hybrid model); None
    otherwise. `total`: the model's layer count, from the run's manifest (None: unknown)."""
    if layers == list(range(len(layers))) and (total is None or total == len(layers)):
        return None
    return f"attention layers {', '.join(map(str, layers))}" + (f" of {total}" if total else "") + \
        " (the other layers have no attention heads)"


# ------------------------------------------------------------------------------------------ agreement

def overlap(a: list[str], b: list[str]) -> tuple[int, float]:
    """|A ∩ B| and Jaccard |A ∩ B| / |A ∪ B| of two sets of head ids."""
    a, b = set(a), set(b)
    shared = len(a & b)
    return shared, shared / len(a | b) if a | b else 1.0


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of `values`, tied values sharing the mean of the ranks they span."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    # Tie groups: starts where the sorted value changes.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    group_rank = (starts + ends + 1) / 2  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks of x and y (ties handled).

    rho = cov(rank x, rank y) / (std(rank x) std(rank y)); nan if either is constant."""
    rx, ry = average_ranks(np.asarray(x, float)), average_ranks(np.asarray(y, float))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    norm = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    return float((rx * ry).sum() / norm) if norm > 0 else float("nan")


def compare(a: HeadScores, b: HeadScores, ks: list[int]) -> dict:
    """Overlap and Jaccard of the top-K sets for each K, Spearman over all heads, and the
    heads in only one top-K for the largest K. The two files must score the same heads."""
    if set(a.summary) != set(b.summary):
        only = sorted(set(a.summary) ^ set(b.summary), key=parse_head_key)
        ga, gb = grid_shape(a.summary), grid_shape(b.summary)
        raise HeadscopeError(f"the files score different heads ({ga[0]}x{ga[1]} vs {gb[0]}x{gb[1]}, "
                             f"e.g. {only[0]} is in one only): were they made with the same model?")
    if not ks:
        raise HeadscopeError("--top needs at least one K")
    per_k = []
    for k in ks:
        shared, jaccard = overlap(a.top(k), b.top(k))
        per_k.append({"k": k, "overlap": shared, "jaccard": jaccard})
    largest = max(ks)
    top_a, top_b = a.top(largest), b.top(largest)
    return {"per_k": per_k, "num_heads": len(a.keys),
            "spearman": spearman(a.means.ravel(), b.means.ravel()),  # both in grid order, a head with no value 0
            "largest_k": largest,
            "only_a": [k for k in top_a if k not in top_b], "only_b": [k for k in top_b if k not in top_a]}


# ------------------------------------------------------------------------------------------ stability

def sample_contributions(rows: list[dict], keys: list[str]) -> np.ndarray:
    """(passing samples, heads) array of what each passing sample contributed to each head,
    columns in the order of `keys` (LAYER-HEAD ids); NaN where a sample gave a head no value (null). A row's
    head_scores are (attention layers, heads), row i being the i-th attention layer (grid_layers: a hybrid
    model's real layer indices skip the others)."""
    pairs = [parse_head_key(key) for key in keys]
    slot = {layer: index for index, layer in enumerate(sorted({layer for layer, _ in pairs}))}
    layers = np.array([slot[layer] for layer, _ in pairs])
    heads = np.array([head for _, head in pairs])
    matrix = []
    for row in rows:
        if not row.get("passed") or row.get("head_scores") is None:
            continue
        scores = np.array([[np.nan if value is None else value for value in layer] for layer in row["head_scores"]],
                          dtype=float)
        if scores.ndim != 2 or scores.shape[0] <= layers.max() or scores.shape[1] <= heads.max():
            raise HeadscopeError(f"sample {row.get('id')!r}: head_scores of shape {scores.shape} do not match "
                                 "the heads file")
        matrix.append(scores[layers, heads])
    return np.array(matrix).reshape(len(matrix), len(keys))


def head_means(weights: np.ndarray, contributions: np.ndarray, keep_zeros: bool) -> np.ndarray:
    """Each head's mean under sample weights (how many times each sample is drawn), under the accumulation
    rule of `store.joins_list`; NaN for a head with no value (never 0: nothing was measured).

    weights (draws, samples), contributions X (samples, heads), NaN where a sample has no value for a head:
      mean[d, j] = sum_i w[d, i] X[i, j] J[i, j] / sum_i w[d, i] J[i, j]   (NaN if the head has no value)
    with J[i, j] = 1 where X[i, j] joins the head's list: a value, and non-zero unless keep_zeros.
    """
    joins = ~np.isnan(contributions)
    values = np.where(joins, contributions, 0.0)
    if not keep_zeros:
        joins &= values != 0
    totals, counts = weights @ values, weights @ joins
    return np.divide(totals, counts, out=np.full_like(totals, np.nan), where=counts > 0)


def top_k_frequency(means: np.ndarray, k: int) -> np.ndarray:
    """For each head, the fraction of rows of `means` (draws, heads) in which it is among the K best.

    Ties share: with v the K-th largest value of a row, a head above v scores 1, and the heads equal
    to v split the slots left, (K - #above) / #equal each, so that a block of tied heads (e.g. all
    zero) is not called stable just because of the order they are listed in. A head with no value (NaN)
    is never in the top K."""
    means = np.where(np.isnan(means), -np.inf, means)
    cutoff = -np.partition(-means, k - 1, axis=1)[:, k - 1:k]  # (draws, 1): the K-th largest value
    above = means > cutoff
    tied = (means == cutoff) & np.isfinite(means)
    share = (k - above.sum(axis=1, keepdims=True)) / np.maximum(tied.sum(axis=1, keepdims=True), 1)
    return np.where(above, 1.0, np.where(tied, share, 0.0)).mean(axis=0)


def bootstrap(contributions: np.ndarray, keep_zeros: bool, num_resamples: int, k: int, seed: int = 0) -> dict:
    """Resample the passing samples with replacement and see how much each head's mean moves.

    Draw `num_resamples` sets of S samples from the S passing ones (multinomial counts w, seeded),
    recompute every head's mean under the task's accumulation rule (`head_means`), and report per head
    the full-data mean, the 2.5 and 97.5 percentiles of the resampled means (a 95% percentile
    confidence interval), and P(top K): the fraction of resamples in which the head ranks in the top K.
    """
    num_samples, num_heads = contributions.shape
    if num_samples < 2:
        raise HeadscopeError(f"--bootstrap needs at least 2 passing samples with head scores, found {num_samples}")
    if num_resamples < 1:
        raise HeadscopeError("--bootstrap must be at least 1")
    check_top(k, num_heads)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(num_samples, np.full(num_samples, 1 / num_samples), size=num_resamples).astype(float)
    resampled = head_means(weights, contributions, keep_zeros)
    with warnings.catch_warnings():  # a head with no value in any draw has no interval (NaN), said by the table
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanpercentile(resampled, [2.5, 97.5], axis=0)
    return {"mean": head_means(np.ones((1, num_samples)), contributions, keep_zeros)[0],
            "ci_low": low, "ci_high": high, "p_top_k": top_k_frequency(resampled, k),
            "num_samples": num_samples, "num_resamples": num_resamples, "k": k}


def stability_table(keys: list[str], result: dict, top: int) -> tuple[str, int]:
    """The ranked table with CI and P(top K), '*' marking a top-K head with P(top K) < 0.5 and '-' a head with
    no value; returns the text and how many of the top K are stable."""
    k = result["k"]
    order = np.argsort(-result["mean"], kind="stable")  # NaN (no value) last
    lines = [f"{'layer':>5} {'head':>4} {'mean':>8} {'ci95_low':>9} {'ci95_high':>9} {f'P(top{k})':>9}"]
    for rank, index in enumerate(order[:max(top, 0)]):
        layer, head = parse_head_key(keys[index])
        p = result["p_top_k"][index]
        flag = " *" if rank < k and p < 0.5 else ""
        figures = [_figure(result["mean"][index], 8), _figure(result["ci_low"][index], 9),
                   _figure(result["ci_high"][index], 9)]
        lines.append(f"{layer:>5} {head:>4} {' '.join(figures)} {p:>9.3f}{flag}")
    stable = int((result["p_top_k"][order[:k]] >= 0.5).sum())
    return "\n".join(lines), stable


def _figure(value: float, width: int) -> str:
    return f"{'-':>{width}}" if np.isnan(value) else f"{value:>{width}.4f}"
