"""Ties: the rule that settles a tie in a top-k score, and whether a greedy-token divergence was a near tie.

The top-k rule (`top_k`, every top-k score on every backend: the recorder's rows, the sweep's reference and the
tests' references). The published scores take the top k entries of an attention row; when the k-th and (k+1)-th
entries tie, which one counts is up to the backend (its rounding, its topk kernel), and the score with it. So
entries are ranked by value in LEVELS: sorted by value, an entry within 2^-16 of its size (RESOLUTION) of the
entry above it is on that entry's level (a run of such gaps is one level), and within a level the EARLIEST
position ranks first. The resolution is far coarser than the rounding by which two correct backends' float32
rows differ (about 1e-7 of an entry; the same key at two positions gives values an ulp apart), and a gap, unlike
a value rounded to a fixed grid, does not flip at a grid line: both backends see the same ties and settle them
alike unless a gap lies within an ulp of 2^-16 of its entry. Where no two neighbours of a row's top k + 1 are
that close the rule's top k is torch.topk's, in the same order: the papers' scores are unchanged on rows without
ties. Cost: one topk(k + 1) per row, and only on rows with a tie a sort of the row.

Greedy-token divergences (`check`'s token figure):

headscope takes q.k in float32 where eager attention rounds it to the model's dtype, so in bf16/fp16 the two
runs differ by rounding, and rounding decides any choice that is a near tie:
  a logit tie    the reference's two candidate tokens are within the dtype's rounding of the logits at the
                 first step where the tokens differ;
  a routing tie  a mixture-of-experts router picks another expert for some token: at the first (position,
                 layer) where the two runs' expert sets differ, the router's k-th and (k+1)-th logits are
                 within rounding (an exact tie included). Everything after that token differs, legitimately.
Anything else is a real divergence. Router logits are read from the modules transformers records as
`router_logits` (the model's `_can_record_outputs`), through forward hooks.
"""
from __future__ import annotations

import contextlib

import torch

from ..scorers.base import Scorer, StepView

RESOLUTION = 2.0 ** -16  # a gap within this share of an entry is a tie


def top_k(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rule's top k of each row (the last dimension, entries >= 0): (values, positions) in rank order, each
    (..., min(k, length)), and (...) bool: True where two of the row's top k + 1 entries tie at the rule's
    resolution (the head-steps a tie touched)."""
    take = min(k + 1, rows.shape[-1])
    values, positions = rows.topk(take, dim=-1)
    tied = tied_rows(values)
    values, positions = values[..., :k], positions[..., :k]
    if bool(tied.any()):  # only these rows: a pass over each of them
        picked = rule_order(rows[tied], values.shape[-1])
        positions[tied] = picked
        values[tied] = rows[tied].gather(-1, picked)
    return values, positions, tied


def tied_rows(ranked: torch.Tensor) -> torch.Tensor:
    """(...) True where two neighbours of the descending (..., n) entries are on one level (a tie)."""
    return (ranked[..., :-1] - ranked[..., 1:] <= RESOLUTION * ranked[..., :-1]).any(-1)


def rule_order(rows: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the rule's top k of (n, length) rows: by level (sorted by value, a new level where the gap to
    the entry above exceeds RESOLUTION of it), then by earliest position."""
    length = rows.shape[-1]
    values, order = rows.float().clamp(min=0).sort(dim=-1, descending=True, stable=True)
    new_level = values[..., :-1] - values[..., 1:] > RESOLUTION * values[..., :-1]
    level = torch.nn.functional.pad(new_level.cumsum(-1), (1, 0))
    return (level * length + order).topk(k, dim=-1, largest=False).values % length


# A tie: a gap within ROUNDING[dtype] x the dtype's epsilon x the largest logit. In bf16/fp16 the logits are the
# LM head's output rounded to the dtype, so a gap between two of them is known to one ulp of the largest
# (eps x largest) from that rounding alone, and headscope's float32 q.k moves the hidden states by rounding of the
# same order: measured on the check's prompt (256 tokens, dense Llama, Qwen2, Mistral, Gemma 2 with 4 layers), the
# gap between eager's two best tokens moved by at most 2.5 eps x largest (p99 2.0) in bf16 and fp16; 4 leaves a
# margin of 1.6. In float32 both runs compute in float32 and differ only by summation order (SDPA against eager
# matmuls), which moved that gap by up to 7.4 eps x largest: 16 (1.9e-6 x largest) leaves the same margin, and a
# gap that small is a tie for any purpose. Other dtypes get 4.
ROUNDING = {torch.float32: 16, torch.bfloat16: 4, torch.float16: 4}


def rounding(dtype: torch.dtype) -> int:
    """How many of the dtype's epsilons (times the largest logit) a gap may move by rounding alone."""
    return ROUNDING.get(dtype, 4)


def tolerance(logits: torch.Tensor, dtype: torch.dtype) -> float:
    return float(logits.abs().max()) * torch.finfo(dtype).eps * rounding(dtype)


def router_modules(model) -> list:
    """The modules whose output transformers records as router logits, in model order, with the output index."""
    specs = []
    for module in model.modules():
        recorded = (getattr(type(module), "_can_record_outputs", None) or {}).get("router_logits")
        for spec in recorded if isinstance(recorded, list) else [recorded] if recorded else []:
            target = getattr(spec, "target_class", spec)
            specs.append((target, getattr(spec, "index", 0), getattr(spec, "layer_name", None)))
    found = []
    for name, module in model.named_modules():
        for target, index, layer_name in specs:
            if isinstance(target, type) and isinstance(module, target) and (layer_name is None or name.endswith(
                    layer_name)):
                found.append((module, index))
                break
    return found


@contextlib.contextmanager
def logging_routers(model, batch: int):
    """Yield a list per router module (layer order) that fills with each call's router logits (batch, T, experts)."""
    routers = router_modules(model)
    logs = [[] for _ in routers]
    handles = []
    for (module, index), log in zip(routers, logs):
        def hook(module, args, output, log=log, index=index):
            logits = output[index] if isinstance(output, (tuple, list)) else output
            log.append(logits.detach().float().reshape(batch, -1, logits.shape[-1]))
        handles.append(module.register_forward_hook(hook))
    try:
        yield logs
    finally:
        for handle in handles:
            handle.remove()


def experts_per_token(config) -> int:
    config = config.get_text_config(decoder=True)
    for name in ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k_experts"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1


def routing_tie(ours: list, eager: list, k: int, real: torch.Tensor, upto: int, dtype) -> str | None:
    """At the first (position < upto, router) where the two runs pick different experts: "a routing near tie in
    router R at position P (gap G)" when the choice is within rounding, else "a routing split ..." ; None when
    every choice agrees. ours/eager: per router, the calls' logits; real: (batch, T) True for real tokens."""
    splits = []  # (position, router, gap, tol)
    for router, (a_calls, b_calls) in enumerate(zip(ours, eager)):
        if not a_calls or not b_calls:
            continue
        a, b = torch.cat(a_calls, 1), torch.cat(b_calls, 1)
        length = min(a.shape[1], b.shape[1], upto, real.shape[1])
        a, b = a[:, :length], b[:, :length]
        picked_a = a.topk(k, -1).indices.sort(-1).values
        picked_b = b.topk(k, -1).indices.sort(-1).values
        differ = (picked_a != picked_b).any(-1) & real[:, :length].to(a.device)  # (batch, T)
        if bool(differ.any()):
            position = int(differ.any(0).nonzero()[0])
            sample = int(differ[:, position].nonzero()[0])
            gaps = [float(x[sample, position].topk(k + 1).values[k - 1] - x[sample, position].topk(k + 1).values[k])
                    for x in (a, b)]
            splits.append((position, router, min(gaps), tolerance(b[sample, position], dtype)))
    if not splits:
        return None
    position, router, gap, tol = min(splits)
    kind = "a routing near tie" if gap <= tol else "a routing split (not a tie)"
    return f"{kind} in router {router} at position {position} (gap {gap:.1e}, tie <= {tol:.1e})"


class TieCount(Scorer):
    """Counts, per sample, the head-steps whose row had a tie in its top k + 1 (settled by the rule): written into
    each samples row and the manifest (`tied_head_steps`), so a user sees how much of a score rests on ties."""

    name = "tied_head_steps"

    def step_scores(self, view: StepView) -> torch.Tensor:
        return view.tied.float()

    def per_sample(self) -> list[int]:
        return [int(count) for count in self.total.sum((1, 2)).round().tolist()]
