"""`headscope kv`: what a head list buys when it compresses the KV cache by head.

Each point of the curve runs the task's samples (the grid `detect` and `ablate` build, through the same engine)
with a head-level KV cache policy replayed inside the attention function (kv.py), and measures the success rate,
the mean metric and the share of the KV cache kept. What --budgets means depends on the policy:

  duo        K  the top-K KV heads of the heads file keep every key -- exactly those `export --to duo` marks (a KV
                head scores the max of its query heads; --threshold T or --sparsity S instead of K, as export
                takes them); every other KV head streams: --sink first tokens and --recent last ones
  random     K  K KV heads drawn from those outside the top K keep every key, the rest stream (--repeats draws,
                seed + r, as `ablate` draws its random heads; mean and std over the draws)
  streaming  K  every head streams, its window as large as gives duo-K's memory on each prompt (the uniform
                StreamingLLM baseline at the same memory)
  headkv     B  `export --to headkv`'s allocation (--beta, --temperature) over the KV heads, B entries per KV
                head on average (--selection query-head: export's own per-query-head budgets), each KV
                head's entries chosen by SnapKV (--window, --kernel, --pooling) from its query heads' mean votes
                (kvpress's SnapKVPress; a KV head's score for the budgets: the mean of its query heads')
  snapkv     B  the same selection with B entries for every KV head (HeadKV's uniform baseline)
  (--selection query-head: one selection and budget per query head instead, as HeadKV's code does, repeating
  each KV head's cache for every query head that reads it: group times the entries)

and `full`, the unrestricted cache. Policies of the two families (K or B) are run by separate commands; into the
same --out, one curve holds both (with --ratios, every policy but headkv takes a ratio: one command).

Conventions (--convention). headscope's: each prompt is compressed whole, its question with it; streaming heads
apply their window to every query, the prompt's own included (DuoAttention's streaming mask: a sliding window);
SnapKV as HeadKV's code scores it (--window 32, --kernel 7, --pooling max). kvpress's (NVIDIA/kvpress, what its
pipeline does): each prompt's context -- what comes before the question the task marks (Sample.question_char) --
is read with the full cache and compressed after it; the question is fed after it, uncompressed, and every token
from the question on is kept; a streaming head's window is fixed at the context's end (DuoAttentionPress,
StreamingLLMPress); SnapKV as SnapKVPress (--window 64, --kernel 5, --pooling avg, the votes' mean); and
--ratios instead of --budgets, kvpress's compression ratios: for duo and random the share of KV heads streaming
(round(heads x ratio), DuoAttentionPress's head_compression_ratio), for streaming and snapkv the share of each
context's entries pruned (int(C x (1 - ratio)) kept, the sinks or the window included).

Share of the KV cache kept: per sample, the prompt's entries every layer's caches keep once the prompt is read
over those of the model's full cache (KV heads x prompt tokens per layer), one unit for every policy (a cache per
query head counts once per query head); a point's share is the mean over its samples. Generated tokens are not
counted.

Files in --out: NAME_TASK_kv_samples.jsonl (every finished sample of every point and draw, appended and flushed:
a run resumes where it stopped, and a later run with the same settings adds its points), NAME_TASK_kv.json
(every finished point of that file) and NAME_TASK_kv.png (the curve).
"""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ..runs import identity, outputs, schema, store
from ..attention import kv
from .ablation import ArmLog, arm_result, random_heads, settings_and_options, unlogged_batches
from ..detection.decode import num_layers_and_heads
from ..detection.engine import (
    Run, all_items, decodable, head_ids_before_loading, kept_threads, model_name_of, run_batch, run_identity,
    start_run)
from ..errors import HeadscopeError, notify
from ..heads import HeadScores
from ..runs.lock import writer_lock
from ..options import option

BY_HEADS = ("duo", "random", "streaming")  # --budgets: K, KV heads kept full
BY_ENTRIES = ("headkv", "snapkv")  # --budgets: B, entries per head
POLICIES = BY_HEADS + BY_ENTRIES
SELECTIONS = ("kv-head", "query-head")  # SnapKV's unit: one set of entries per KV head, or per query head


CONVENTIONS = ("headscope", "kvpress")
# SnapKV's settings each convention defaults to: HeadKV's code (headscope) and kvpress's SnapKVPress
CONVENTION_DEFAULTS = {"headscope": {"window": 32, "kernel": 7, "pooling": "max"},
                       "kvpress": {"window": 64, "kernel": 5, "pooling": "avg"}}


def parse_policies(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in POLICIES]
    if unknown or not names:
        raise HeadscopeError(f"--policy: {unknown[0] if unknown else 'none given'}: choose from {', '.join(POLICIES)}")
    return names


def check_ratios(ratios: list[float]) -> None:
    bad = next((ratio for ratio in ratios if not 0 <= ratio < 1), None)  # NaN fails too
    if bad is not None:
        raise HeadscopeError(f"--ratios: {bad} is not a compression ratio in [0, 1) (kvpress's share pruned)")


@dataclass
class KVSettings:
    """What `kv` adds to the task's options; the flags have the same names."""

    scores: str | None = option(None, "a heads or summary file (NAME_TASK_heads.json)", group="kv cache",
                                required=True)
    convention: str = option("headscope", "headscope: the whole prompt compressed, the question with it, every "
                                          "query under its policy, a sliding streaming window; kvpress: as kvpress's "
                                          "pipeline -- the context read with the full cache and compressed after "
                                          "it, the question fed after it uncompressed, a window fixed at the "
                                          "context's end, SnapKV as SnapKVPress", group="kv cache",
                             choices=CONVENTIONS)
    ratios: list[float] | None = option(None, "--convention kvpress, instead of --budgets: kvpress's compression "
                                              "ratios (the share pruned): duo, random: of the KV heads "
                                              "(DuoAttentionPress's head_compression_ratio); streaming, snapkv: of "
                                              "each context's entries (StreamingLLMPress, SnapKVPress)",
                                        group="kv cache", check=check_ratios)
    policy: str = option("duo,random,streaming", "comma-separated: duo, random, streaming (--budgets K: KV heads "
                                                 "kept full) or headkv, snapkv (--budgets B: entries per head)",
                         group="kv cache", check=parse_policies)
    budgets: list[int] | None = option(None, "the curve's points: K values (duo, random, streaming) or B values "
                                             "(headkv, snapkv), e.g. 0,2,4,8", group="kv cache", minimum=0)
    threshold: float | None = option(None, "duo instead of --budgets: the KV heads scoring at least T keep every "
                                           "key (as export --to duo)", group="duo")
    sparsity: float | None = option(None, "duo instead of --budgets: the best (1 - S) of the KV heads keep every "
                                          "key (as export --to duo)", group="duo", minimum=0, maximum=1)
    sink: int = option(64, "a streaming head keeps the first SINK tokens", group="duo", minimum=0)
    recent: int = option(256, "... and the last RECENT tokens (the query's own included)", group="duo", minimum=1)
    repeats: int = option(3, "random draws (mean and std are reported)", group="duo", minimum=1)
    window: int | None = option(None, "SnapKV's observation window: the last WINDOW prompt queries vote, and are "
                                      "kept (default 32; --convention kvpress: 64)", group="headkv", minimum=1)
    kernel: int | None = option(None, "pooling kernel of the votes, odd (default 7; --convention kvpress: 5)",
                                group="headkv", minimum=1)
    pooling: str | None = option(None, "pooling of the votes (default max; --convention kvpress: avg)",
                                 group="headkv", choices=kv.POOLINGS)
    selection: str = option("kv-head", "kv-head: one set of entries per KV head, its query heads' votes averaged "
                                       "(kvpress, a GQA deployment); query-head: one per query head, the cache "
                                       "repeated for each (HeadKV's code: group times the entries)",
                            group="headkv", choices=SELECTIONS)
    beta: float = option(1.2, "HeadKV: floor(B / beta) per head is pooled and shared by score", group="headkv",
                          minimum=1)
    temperature: float = option(1.0, "HeadKV: exponent on the score shares", group="headkv",
                                 minimum=0)


# The settings every point of one curve shares: they are in the curve's id (other values: another curve).
SHARED = ("convention", "sink", "recent", "window", "kernel", "pooling", "selection", "beta", "temperature")


def with_convention_defaults(settings: KVSettings) -> KVSettings:
    """--window, --kernel and --pooling left out take the convention's defaults (the curve's id holds them)."""
    unset = {name: value for name, value in CONVENTION_DEFAULTS[settings.convention].items()
             if getattr(settings, name) is None}
    return dataclasses.replace(settings, **unset)


def check_settings(settings: KVSettings) -> None:
    """One line for the first combination that cannot run."""
    policies = parse_policies(settings.policy)
    if settings.ratios is not None:
        check_ratio_settings(settings, policies)
    else:
        check_budget_settings(settings, policies)
    if settings.kernel % 2 == 0:
        raise HeadscopeError(f"--kernel must be odd (SnapKV pads it by kernel // 2 each side), not {settings.kernel}")


def check_ratio_settings(settings: KVSettings, policies: list[str]) -> None:
    if settings.convention != "kvpress":
        raise HeadscopeError("--ratios are kvpress's compression ratios: give --convention kvpress, or --budgets")
    given = [flag for flag, value in (("--budgets", settings.budgets), ("--threshold", settings.threshold),
                                      ("--sparsity", settings.sparsity)) if value is not None]
    if given:
        raise HeadscopeError(f"--ratios and {given[0]} cannot be combined: give one of them")
    if not settings.ratios:
        raise HeadscopeError("--ratios needs at least one value")
    if "headkv" in policies:
        raise HeadscopeError("kvpress has no HeadKV press to take a ratio: headkv takes --budgets B")


def check_budget_settings(settings: KVSettings, policies: list[str]) -> None:
    if not (set(policies) <= set(BY_HEADS) or set(policies) <= set(BY_ENTRIES)):
        raise HeadscopeError("--budgets is K (heads kept full) for duo, random and streaming, and B (entries per head) "
                             "for headkv and snapkv: run each family in its own command (the same --out: one curve)")
    by_heads = policies[0] in BY_HEADS
    chosen = [flag for flag, value in (("--budgets", settings.budgets), ("--threshold", settings.threshold),
                                       ("--sparsity", settings.sparsity)) if value is not None]
    if not by_heads and chosen != ["--budgets"]:
        raise HeadscopeError("headkv and snapkv take --budgets B (entries per head), not " +
                             (", ".join(flag for flag in chosen if flag != "--budgets") or "nothing"))
    if by_heads and len(chosen) != 1:
        raise HeadscopeError("duo, random and streaming take exactly one of --budgets K, --threshold T or "
                             "--sparsity S")
    if settings.budgets is not None and not settings.budgets:
        raise HeadscopeError("--budgets needs at least one value")


@dataclass
class Point:
    """One point of the curve and draw: the policy replayed (None: the full cache) for a budget."""

    policy: str  # "full" or one of POLICIES
    budget: int | float | None  # K or B, or a compression ratio (a float); None for "full"
    repeat: int  # the draw (random), else 0
    heads: list[str] | None  # the KV heads kept full (duo, random)
    build: Callable[[], kv.Policy | None]  # a fresh policy for each batch

    @property
    def arm(self) -> str:
        if self.budget is None:
            return "full"
        if isinstance(self.budget, float):  # a ratio in fixed point: 1e-05 would read back as "snapkv-1e", 5
            digits = f"{self.budget:.12f}".rstrip("0")
            return f"{self.policy}-{digits}{'0' if digits.endswith('.') else ''}"
        return f"{self.policy}-{self.budget}"


def parse_arm(arm: str) -> tuple[str, int | float | None]:
    if arm == "full":
        return arm, None
    policy, budget = arm.rsplit("-", 1)
    return policy, float(budget) if "." in budget else int(budget)  # a ratio, or K or B


class Planner:
    """Turns (policy, budget, draw) into the policy to replay, from the heads file (its KV heads, top K and
    patterns, as `export` writes them)."""

    def __init__(self, settings: KVSettings, scores: HeadScores, kv_heads: int, seed: int):
        self.settings, self.scores, self.kv_heads, self.seed = settings, scores, kv_heads, seed
        self.total = scores.kv_scores(kv_heads).size  # the KV heads (refused if they cannot share the query heads)

    def budgets(self) -> list[int] | list[float]:
        settings = self.settings
        if settings.ratios is not None:
            return [float(ratio) for ratio in settings.ratios]
        if settings.budgets is not None:
            return settings.budgets
        return [int(self.scores.duo(self.kv_heads, settings.threshold, settings.sparsity).sum())]

    def points(self, policy: str, budget: int) -> list[Point]:
        """The point's draws (one, but --repeats for random), each checked: a bad budget fails before any output."""
        if policy in BY_ENTRIES or isinstance(budget, float) and policy == "streaming":
            return [self.point(policy, budget, 0)]
        total, k = self.total, self.full_heads(budget)
        if not 0 <= k <= total:
            raise HeadscopeError(f"K = {k} is not between 0 and the number of KV heads ({total})")
        if policy != "random":
            return [self.point(policy, budget, 0)]
        if k == 0 or k > total - k:
            if k:
                notify(f"random-{budget}: only {total - k} KV heads lie outside the top {k}: no random point")
            return []
        return [self.point(policy, budget, repeat) for repeat in range(self.settings.repeats)]

    def full_heads(self, budget: int | float) -> int:
        """K, the KV heads kept full: the budget, or from a head compression ratio as DuoAttentionPress counts the
        streaming ones (round(heads x ratio))."""
        return self.total - round(self.total * budget) if isinstance(budget, float) else budget

    def point(self, policy: str, budget: int | float | None, repeat: int) -> Point:
        settings = self.settings
        if policy == "full":
            return Point(policy, None, 0, None, lambda: None)
        # kvpress's convention: each context compressed after it is read, the window fixed at its end
        window = kv.ContextWindow if settings.convention == "kvpress" else kv.StreamingHeads
        if policy in ("duo", "random"):
            k = self.full_heads(budget)
            top = self.scores.top_kv(self.kv_heads, k)  # the K KV heads export --to duo keeps full
            heads = top if policy == "duo" else random_heads(self.scores.kv_keys(self.kv_heads), top, k,
                                                             self.seed + repeat)
            return Point(policy, budget, repeat, heads, lambda: window(outputs.heads_by_layer(heads), settings.sink,
                                                                       settings.recent))
        if policy == "streaming":
            if isinstance(budget, float):  # StreamingLLMPress: int(C * (1 - ratio)) entries, the sinks included
                recent = streaming_llm_recent(budget, settings.sink)
            else:
                recent = kv.matched_recent(self.total, budget, settings.sink, settings.recent)
            return Point(policy, budget, 0, None, lambda: window({}, settings.sink, recent))
        per_query_head = settings.selection == "query-head"
        if isinstance(budget, float):  # SnapKVPress at a compression ratio
            return Point(policy, budget, 0, None, lambda: kv.SnapSelection(
                None, 0, settings.window, settings.kernel, settings.pooling, per_query_head, ratio=budget))
        # one cache per query head, or per KV head (a KV head scoring the mean of its query heads': its pool share)
        caches = None if per_query_head else self.kv_heads
        if policy == "headkv":
            budgets = self.scores.headkv(budget, settings.beta, settings.temperature, caches)
        else:
            if budget < 1:
                raise HeadscopeError(f"B must be at least 1, not {budget}")
            budgets = np.full((len(self.scores.layers), caches or self.scores.heads_per_layer), budget)
        layers = self.scores.layers  # row i of budgets: attention layer layers[i] (a hybrid's skip the others)
        per_layer = np.zeros((layers[-1] + 1, budgets.shape[1]), dtype=budgets.dtype)  # row: the real layer
        per_layer[layers] = budgets
        return Point(policy, budget, 0, None, lambda: kv.SnapSelection(torch.tensor(per_layer), budget, settings.window,
                                                                       settings.kernel, settings.pooling,
                                                                       per_query_head))


def streaming_llm_recent(ratio: float, sink: int) -> Callable[[int], int]:
    """StreamingLLMPress at `ratio`: a context of C tokens keeps int(C * (1 - ratio)) entries, `sink` of them the
    first tokens and the rest the last."""
    return lambda length: max(int(length * (1 - ratio)) - sink, 0)


@kept_threads()
def kv_curve(task: str, scores: str, options=None, loaded=None, **overrides) -> dict:
    """Run every point and write NAME_TASK_kv.json (and its picture) in options.out. Returns that object.
    ``overrides`` set KVSettings fields (policy, budgets, sink, ...) and the task's options by name. What can be
    refused before the weights load is; nothing is written before the prompts are built."""
    settings, options = settings_and_options("kv", KVSettings, task, options, overrides, scores=scores)
    settings = with_convention_defaults(settings)
    check_settings(settings)
    heads = HeadScores.load(scores)
    keys = head_ids_before_loading(options, loaded, [heads])
    if keys is not None:
        heads.refuse_other_model(keys)
    name = model_name_of(options, loaded)
    made_of = identity.digests(run_identity(task, options, loaded))
    paths = kv_paths(options.out, f"{name}_{task}")
    with writer_lock(options.out, f"{name}_{task}_kv"):
        try:
            log = ArmLog(paths["samples"], curve_id(task, options, made_of, settings, heads.summary),
                         options.overwrite, schema.KV_ROW, made_of)
        except HeadscopeError as error:  # say what a later run must share to add its points
            flags = ", ".join("--" + flag for flag in SHARED)
            raise HeadscopeError(f"{error} (the points of one curve share the task's options, the heads file and "
                                 f"{flags})") from None
        try:
            run = start_run(task, options, loaded, command="kv")
            heads.refuse_other_model(run.keys)
            planner = Planner(settings, heads, num_kv_heads(run.loaded.model), options.seed)
            policies = parse_policies(settings.policy)
            points = [planner.point("full", None, 0)] + [point for budget in planner.budgets() for policy in policies
                                                         for point in planner.points(policy, budget)]
            items = all_items(run)
            contexts = context_lengths(run, items) if settings.convention == "kvpress" else None
            progress = tqdm(total=len(points), desc=f"kv {task}", unit="point", disable=options.quiet,
                            file=sys.stderr)
            try:
                for point in points:
                    run_point(run, items, point, log, contexts)
                    progress.update(1)
            finally:
                progress.close()
        finally:
            log.close()
        report = curve(run, planner, log.done, scores)
        outputs.atomic_write_json(paths["curve"], report)
        report["path"] = str(paths["curve"])
        report["pictures"] = []
        if options.plots:
            from .kv_output import draw

            report["pictures"] = [str(draw(report, paths["picture"]))]
    return report


def num_kv_heads(model) -> int:
    config = model.config.get_text_config()
    return getattr(config, "num_key_value_heads", None) or num_layers_and_heads(model)[1]


def kv_paths(out: str, prefix: str) -> dict:
    folder = Path(out)
    return {"curve": folder / f"{prefix}_kv.json", "samples": folder / f"{prefix}_kv_samples.jsonl",
            "picture": folder / f"{prefix}_kv.png"}


def curve_id(task: str, options, made_of: dict, settings: KVSettings, summary: dict) -> str:
    """What makes two runs points of the same curve: the model, tokenizer and data (`made_of`), the task's
    result-changing options, the heads file and the settings every policy shares (not the policies, budgets or
    draws: a later run adds points)."""
    shared = {flag: getattr(settings, flag) for flag in SHARED}
    return store.run_id(task, dataclasses.asdict(options) | {"kv": shared, "scores": summary}, made_of)


def context_lengths(run: Run, items: list) -> dict[str, int]:
    """kvpress's convention: each decodable sample's tokens before its question part (Sample.question_char),
    worked out before anything is written: a task that does not mark its question is refused by name."""
    lengths = {}
    for _, sample, prompt in items:
        if decodable(run, prompt):
            lengths[sample.id] = context_tokens(run.loaded.tokenizer, sample, prompt.input_ids)
    return lengths


def context_tokens(tokenizer, sample, input_ids: list[int]) -> int:
    """The number of the prompt's tokens before the one holding the question part's first character."""
    if sample.question_char is None:
        raise HeadscopeError(f"--convention kvpress: the {sample.task} task does not mark where its question "
                             "starts, so its context cannot be compressed alone")
    if not getattr(tokenizer, "is_fast", False):
        raise HeadscopeError("--convention kvpress needs a fast tokenizer (its offsets find where the question starts)")
    encoded = tokenizer(sample.prompt, add_special_tokens=sample.add_special_tokens, return_offsets_mapping=True)
    if list(encoded["input_ids"]) != list(input_ids):
        raise HeadscopeError(f"--convention kvpress: sample {sample.id}'s prompt is not its text's tokens, so "
                             "where its question starts is unknown")
    offsets = encoded["offset_mapping"]
    length = next((index for index, (start, end) in enumerate(offsets)
                   if end > start and end > sample.question_char), len(offsets))
    if length >= len(offsets):
        raise HeadscopeError(f"--convention kvpress: sample {sample.id} has no question after its context")
    return length


def batch_layout(run: Run, batch: list, contexts: dict[str, int] | None = None) -> kv.Layout | None:
    """The batch as `run_batch` lays it out: the prompts it decodes (not a needle it cannot locate), left-padded
    to the longest, with each one's context length under kvpress's convention (`contexts`). None when it decodes
    none."""
    decoded = [(sample, prompt) for _, sample, prompt in batch if decodable(run, prompt)]
    if not decoded:
        return None
    width = max(len(prompt.input_ids) for _, prompt in decoded)
    context = None if contexts is None else tuple(contexts[sample.id] for sample, _ in decoded)
    return kv.Layout(width, tuple(width - len(prompt.input_ids) for _, prompt in decoded), context)


def run_point(run: Run, items: list, point: Point, log: ArmLog, contexts: dict[str, int] | None = None) -> None:
    """Every sample of the point not yet in the log, batch by batch, each row with its share of the cache kept."""
    for batch in unlogged_batches(run, items, log, point.arm, point.repeat):
        policy, layout = point.build(), batch_layout(run, batch, contexts)
        replay = kv.replaying(run.loaded.model, policy, layout) if policy and layout else contextlib.nullcontext()
        with replay:
            shares = None
            for row, _ in run_batch(run, batch, []):
                if row["error"] is None and shares is None:  # decoded: every decoded sample's share is known
                    shares = iter(policy.shares() if policy else [1.0] * len(batch))
                log.append(point.arm, point.repeat, row | {"kv_kept": None if row["error"] else next(shares)})


def curve(run: Run, planner: Planner, done: dict, scores: str) -> dict:
    """Every point the log holds finished (each of its draws over every sample), best known order: full, then by
    policy and budget."""
    ids = [sample.id for sample in run.samples]
    draws: dict[str, dict[int, dict]] = {}
    for (arm, repeat, sample_id), row in done.items():
        draws.setdefault(arm, {}).setdefault(repeat, {})[sample_id] = row
    points = []
    for arm, repeats in draws.items():
        finished = {repeat: [rows[i] for i in ids] for repeat, rows in sorted(repeats.items())
                    if all(i in rows for i in ids)}
        if finished:
            points.append(point_result(planner, arm, finished))
    points.sort(key=lambda p: (p["policy"] != "full", POLICIES.index(p["policy"]) if p["policy"] in POLICIES else 0,
                               isinstance(p["budget"], float), p["budget"] or 0))  # a policy's ratios after its K or B
    if not points or points[0]["policy"] != "full":
        raise RuntimeError("the full cache's point is missing from the log")
    settings = planner.settings
    return {"task": run.task.name, "model": run.loaded.path, "scores": str(scores), "samples": len(ids),
            "settings": {name: getattr(settings, name) for name in SHARED} | {"kv_heads": planner.kv_heads},
            "full": points[0], "points": points[1:]}


def point_result(planner: Planner, arm: str, finished: dict[int, list[dict]]) -> dict:
    """success_rate, mean_metric and cells (as ablate's arms: mean and std over draws), and the mean share kept."""
    policy, budget = parse_arm(arm)
    drawn = policy == "random"
    result = arm_result(list(finished.values()), budget or 0, None, drawn)
    del result["k"], result["heads"]
    shares = [row["kv_kept"] for rows in finished.values() for row in rows if row["error"] is None]
    point = {"policy": policy, "budget": budget, "kv_kept": statistics.fmean(shares) if shares else None}
    if policy in ("duo", "random"):
        heads = [planner.point(policy, budget, repeat).heads for repeat in finished]
        point["full_heads"] = heads if drawn else heads[0]
    return point | result
