"""The head-level KV-cache patterns of a (layers, heads) score matrix: pure array arithmetic, no files.

  kv_head_scores   query heads pooled onto the KV head they read (grouped-query attention)
  duo_pattern      DuoAttention's full_attention_heads (keep_best, untied)
  headkv_budgets   HeadKV's per-head KV budgets (largest_remainder)

`HeadScores` (scores.py) applies them to a loaded heads file; `exports` writes them in each method's format and
`headscope kv` replays them. May import: errors only.
"""
from __future__ import annotations

import numpy as np

from ..errors import HeadscopeError, notify


def kv_head_scores(means: np.ndarray, num_kv_heads: int, reduce: str = "max") -> np.ndarray:
    """Aggregate query heads onto the KV head they read, for grouped-query attention.

    With H query heads and G KV heads, each KV head serves H / G consecutive query heads:
    query head h reads KV head h // (H / G) (transformers' `repeat_kv` repeats each KV head
    H / G times in place). score[l, g] = reduce over h in [g * H/G, (g+1) * H/G) of means[l, h],
    with reduce = max (a KV head matters if any of its query heads does) or mean.
    """
    layers, heads = means.shape
    if num_kv_heads < 1 or heads % num_kv_heads:
        raise HeadscopeError(f"{heads} query heads per layer cannot be shared by {num_kv_heads} KV heads "
                             "(the number of KV heads must divide the number of query heads)")
    if reduce not in ("max", "mean"):
        raise HeadscopeError(f"--kv-heads must be max or mean, not {reduce!r}")
    grouped = means.reshape(layers, num_kv_heads, heads // num_kv_heads)
    return grouped.max(axis=2) if reduce == "max" else grouped.mean(axis=2)


def duo_pattern(means: np.ndarray, num_kv_heads: int, threshold: float | None = None,
                sparsity: float | None = None, raw: bool = False) -> np.ndarray:
    """DuoAttention's full_attention_heads: a (layers, KV heads) array in [0, 1], 1 = keep the full KV
    cache (a retrieval head), 0 = streaming (sink + recent window only).

    A KV head's score is the max of its query heads' means (`kv_head_scores`), s[l, g]. Then exactly one of
      threshold T:  1 where s >= T else 0;
      sparsity S:   the round((1 - S) * n) best of the n KV heads are 1, the rest 0 (ties by layer, head;
                    DuoAttention's own `sparsify_attention_heads` breaks ties with random noise instead);
      raw:          s / max(s), so DuoAttention's loader can apply its own --sparsity or threshold -- ties broken
                    (`untied`) so that a consumer's own sort ranks the heads as `keep_best` does.
    """
    if sum(option is not None and option is not False for option in (threshold, sparsity, raw)) != 1:
        raise HeadscopeError("--to duo needs exactly one of --threshold T, --sparsity S or --raw")
    scores = kv_head_scores(means, num_kv_heads, "max")
    if raw:
        if scores.min() < 0:
            raise HeadscopeError("--raw needs non-negative scores")
        return untied(scores / scores.max() if scores.max() > 0 else np.zeros_like(scores))
    if threshold is not None:
        return (scores >= threshold).astype(float)
    if not 0 <= sparsity <= 1:
        raise HeadscopeError(f"--sparsity must be between 0 and 1, not {sparsity}")
    keep = round((1 - sparsity) * scores.size)
    scoring = int((scores > 0).sum())
    if keep > scoring:  # the quota is filled with heads that scored nothing: say so, never silently
        notify(f"--sparsity {sparsity:g} keeps {keep} of {scores.size} KV heads, but only {scoring} score above 0: "
               f"the other {keep - scoring} kept are zero-score heads, taken by layer and head")
    return keep_best(scores, keep)


def keep_best(scores: np.ndarray, keep: int) -> np.ndarray:
    """1.0 for the `keep` best entries of the (layers, KV heads) `scores` (ties by layer, head), 0.0 elsewhere:
    the full-attention heads of a DuoAttention pattern (`headscope kv` replays the same ones)."""
    order = np.argsort(-scores.ravel(), kind="stable")
    pattern = np.zeros(scores.size)
    pattern[order[:keep]] = 1.0
    return pattern.reshape(scores.shape)


def untied(values: np.ndarray) -> np.ndarray:
    """`values` in [0, 1] with every tie broken in keep_best's order (the earlier layer, head ranks higher), by less
    than half the smallest gap between distinct values: kvpress's DuoAttentionPress sorts the exported scores with
    np.argsort, whose order among equal values is unspecified, so untied scores make it stream exactly the heads
    headscope streams at every ratio. A tie at v > 0 steps down from v, a tie at 0 up from 0 (kvpress clips to
    [0, 1]); distinct values and the order between them are unchanged."""
    flat = values.astype(float).ravel()
    distinct = np.unique(flat)
    gaps = list(np.diff(distinct)) + ([distinct[0]] if distinct[0] > 0 else [])  # ... and no tie steps below 0
    step = float(min(gaps, default=1.0)) / (2 * flat.size)
    order = np.argsort(-flat, kind="stable")
    result = flat.copy()
    for value in distinct:
        tied = order[flat[order] == value]  # keep_best's order
        if len(tied) > 1:
            rank = np.arange(len(tied))
            result[tied] = value - step * rank if value > 0 else step * (len(tied) - 1 - rank)
    return result.reshape(values.shape)


def largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    """Integers that sum to exactly `total`, as close as possible to `shares` (which sum to `total`):
    floor every share, then give the units left over to the largest fractional parts (ties: first)."""
    floors = np.floor(shares).astype(np.int64)
    left = int(total - floors.sum())
    order = np.argsort(-(shares - floors), kind="stable")
    floors[order[:left]] += 1
    return floors


def headkv_budgets(means: np.ndarray, budget: int, beta: float = 1.2, temperature: float = 1.0) -> np.ndarray:
    """HeadKV's per-head KV cache budgets (Fu et al. 2025, `ReasonSnapKVCluster` in FYYFU/HeadKV's
    headkv/snapkv_utils.py), for N = layers x heads heads with mean scores s_i:

      p_i   = s_i / sum_j s_j                 importance distribution
      p_i   = p_i^T / sum_j p_j^T             T = temperature, HeadKV's "temp": an exponent (1 keeps p, > 1 sharpens)
      pool  = floor(B / beta) * N             entries pooled, shared out by importance (beta >= 1)
      floor = B - floor(B / beta)             entries every head keeps
      c_i   = floor + p_i * pool

    Larger beta: a smaller pool and a bigger floor (beta = 1 pools everything; HeadKV's README says the
    opposite, but its code is the formula above, and so is this). B is the average budget per head
    (HeadKV's base_capacity, i.e. max_capacity_prompts minus its observation window). HeadKV
    rounds each c_i, so its total can drift by a few entries; here the pooled shares are rounded by
    largest remainder, so sum_i c_i = B * N exactly. Returns the (layers, heads) integer budgets.
    """
    if budget < 1:
        raise HeadscopeError(f"--budget must be at least 1, not {budget}")
    if beta < 1:
        raise HeadscopeError(f"--beta must be at least 1 (the pool is floor(budget / beta)), not {beta}")
    if temperature < 0:
        raise HeadscopeError(f"--temperature must not be negative, not {temperature}")
    if means.min() < 0:
        raise HeadscopeError("HeadKV budgets need non-negative scores")
    if means.sum() <= 0:
        raise HeadscopeError("every head scores 0: there is nothing to allocate the pooled budget by")
    share = (means / means.sum()) ** temperature  # numpy's 0 ** 0 is 1: T = 0 shares equally, as HeadKV's torch.pow
    if not np.isfinite(share).all() or share.sum() <= 0:  # a large T underflows every share to 0: 0 / 0 budgets
        raise HeadscopeError(f"--temperature {temperature:g}: the score shares to that power are all 0 (or not "
                             "finite), so there is nothing to allocate the pool by: give a smaller temperature")
    share = share / share.sum()
    pooled_per_head = int(budget // beta)
    pool = pooled_per_head * means.size
    return (budget - pooled_per_head) + largest_remainder(share.ravel() * pool, pool).reshape(means.shape)
