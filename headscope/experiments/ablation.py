"""Prove the heads matter: mask the top-K heads of a score file, or K random others, and re-run the task.

Arms, each over the same samples as `detect` builds:
  none    nothing masked (the model as it is)
  top     the K best heads of the score file
  random  K heads drawn (seeded, once per repeat) from the heads outside the top K
The central result of the retrieval-head paper is that `top` collapses needle-in-a-haystack while
`random` barely moves it. With several K (`top=[1, 5, 10, 20]`) each K gets a top and a random arm:
the ablation curve.
"""
from __future__ import annotations

import dataclasses
import os
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..runs import identity, outputs, schema, store
from ..attention import masking
from ..detection.engine import (
    Run, all_items, batch_size, head_ids_before_loading, kept_threads, model_name_of, run_batch, run_identity,
    start_run, task_options)
from ..errors import HeadscopeError
from ..heads import HeadScores
from ..runs.lock import writer_lock
from ..options import DetectOptions, option, parse_ints, unused_by, validate
from ..tasks import TASKS


def parse_top(text: str) -> list[int] | str:
    return "auto" if text.strip() == "auto" else parse_ints(text)


@dataclass
class AblationSettings:
    """What `ablate` adds to the task's options; the flags have the same names (random_k: --random)."""

    scores: str | None = option(None, "a heads or summary file (NAME_TASK_heads.json)", group="ablation",
                                required=True)
    top: list[int] | str | None = option(None, "K, a sweep 1,5,10,20, or auto: the heads scoring at least "
                                               "--min-score", group="ablation", required=True, parse=parse_top)
    min_score: float = option(0.1, "with --top auto (Wu et al.'s cut for a retrieval head)", group="ablation")
    random_k: int | None = option(None, "K random heads outside the top K (default: the same K; 0: no random "
                                        "arm)", group="ablation", flag="--random", minimum=0)
    repeats: int = option(3, "random draws (mean and std are reported)", group="ablation", minimum=1)
    mode: str = option("uniform", "how a masked head is ablated", group="ablation", choices=masking.MODES)


class ArmLog:
    """NAME_TASK_ablation_samples.jsonl: every finished sample of every arm and repeat, appended and flushed as
    it finishes, so that an interrupted ablation resumes where it stopped (nothing lost, nothing run twice).
    Its rows carry the ablation's id (a hash of the settings, the task's options and the score file); a
    file with another id is refused unless --overwrite. Opening reads and checks it; `begin` writes first."""

    def __init__(self, path, ablation_id: str, overwrite: bool, fields: dict = schema.ARM_ROW,
                 made_of: dict | None = None):
        self.path, self.ablation_id, self.overwrite, self.made_of = path, ablation_id, overwrite, made_of
        self.found = store.RowsFile(path, []) if overwrite else store.load_rows(path, fields)
        other = next((row for row in self.found.rows if row["ablation"] != ablation_id), None)
        if other is not None:
            changed = identity.difference(made_of, other.get("made_of"))
            raise HeadscopeError(f"{path} holds a run " + (f"made with other {changed}" if changed else
                                                           "with other settings")
                                 + ": --overwrite to replace it, or use another --out")
        self.done = {(row["arm"], row["repeat"], row["id"]): row for row in self.found.rows}
        self.file = None

    def _start(self) -> None:
        """The first write, with the first row: the log opened to append, emptied with --overwrite, its cut last
        line cut off (a failure before the first finished sample leaves the folder as it was)."""
        if self.file is not None:
            return
        self.file = store.open_for_append(self.path)
        if self.overwrite:
            os.ftruncate(self.file.fileno(), 0)
        elif self.found.cut:
            store.drop_cut_line(self.file, self.found)

    def append(self, arm: str, repeat: int, row: dict) -> None:
        row = {"ablation": self.ablation_id, "arm": arm, "repeat": repeat, **row}
        if self.made_of is not None:  # what a later run's refusal names when it differs
            row["made_of"] = self.made_of
        self._start()
        store.append_row(self.file, row, self.path)
        self.done[(arm, repeat, row["id"])] = row

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def run_arm(run: Run, items: list, heads: list[str], arm: tuple, log: ArmLog) -> list[dict]:
    """Every sample's row (response, score, passed) with `heads` masked; items: (index, sample, encoded);
    arm: (name, repeat, mode). Samples the log already holds are not run again."""
    name, repeat, mode = arm
    with masking.ablating(run.loaded.model, outputs.heads_by_layer(heads), mode):
        for batch in unlogged_batches(run, items, log, name, repeat):
            for row, _ in run_batch(run, batch, []):
                log.append(name, repeat, row)
    return [log.done[(name, repeat, sample.id)] for _, sample, _ in items]


def unlogged_batches(run: Run, items: list, log: ArmLog, arm: str, repeat: int) -> list[list]:
    """The items whose (arm, repeat) row the log does not hold yet, in batches of the run's batch size."""
    todo = [item for item in items if (arm, repeat, item[1].id) not in log.done]
    size = batch_size(run)
    return [todo[first:first + size] for first in range(0, len(todo), size)]


def cell_of(row: dict) -> str:
    """Retrieval: one cell per (context length, depth); reasoning: one per sample."""
    if "depth_percent" in row:
        return f"{row['context_length']}-{row['depth_percent']}"
    return row["id"]


def arm_result(rows_per_repeat: list[list[dict]], k: int, heads: list, drawn: bool) -> dict:
    """success_rate (0-1), mean_metric and cells of an arm; for several repeats, their mean and the std."""
    def rates(rows):
        measured = [r for r in rows if r["error"] is None]
        return (sum(r["passed"] for r in measured) / max(len(measured), 1),
                sum(r["score"] for r in measured) / max(len(measured), 1))

    per_repeat = [rates(rows) for rows in rows_per_repeat]
    cells = {}
    for rows in rows_per_repeat:
        for row in rows:
            cell = cells.setdefault(cell_of(row), {"passed": 0, "metric": 0.0, "n": 0})
            if row["error"] is None:
                cell["passed"] += row["passed"]
                cell["metric"] += row["score"]
                cell["n"] += 1
    result = {
        "k": k,
        "heads": heads,
        "success_rate": statistics.fmean(rate for rate, _ in per_repeat),
        "mean_metric": statistics.fmean(metric for _, metric in per_repeat),
        "cells": {name: {"success_rate": c["passed"] / max(c["n"], 1), "mean_metric": c["metric"] / max(c["n"], 1),
                         "n": c["n"]} for name, c in cells.items()},
    }
    if drawn:  # random heads: one head list per repeat, and the spread over repeats
        result["success_rate_std"] = statistics.pstdev(rate for rate, _ in per_repeat)
        result["success_rate_per_repeat"] = [rate for rate, _ in per_repeat]
        result["repeats"] = len(rows_per_repeat)
    return result


def random_heads(all_keys: list[str], excluded: list[str], k: int, seed: int) -> list[str]:
    pool = sorted(set(all_keys) - set(excluded), key=outputs.parse_head_key)
    if k > len(pool):
        raise HeadscopeError(f"cannot draw {k} random heads from the {len(pool)} heads outside the top K")
    return sorted(random.Random(seed).sample(pool, k), key=outputs.parse_head_key)


def heads_above(scores: HeadScores, min_score: float) -> int:
    """K chosen by the data: how many heads have a mean score of at least ``min_score``.

    Wu et al. (2024) call a head a retrieval head when its retrieval score exceeds 0.1, hence the default."""
    k = scores.at_least(min_score)
    if k == 0:
        raise HeadscopeError(f"--top auto: no head has a mean score of at least {min_score:g}; give K instead")
    return k


def plan_arms(scores: HeadScores, keys: list[str], ks: list[int], settings: AblationSettings,
              seed: int) -> list[tuple]:
    """(name, K, head sets) of every arm; refused when the score file is another model's or a K cannot be met.
    Run before the model loads (with the head ids of its config) and again on the loaded model."""
    scores.refuse_other_model(keys)
    for k in ks:
        if k < 0 or k > len(keys):
            raise HeadscopeError(f"K = {k} is not between 0 and the number of heads ({len(keys)})")
    arms = [("none", 0, [[]])]
    for k in ks:
        top = scores.top(k) if k else []
        arms.append((f"top-{k}", k, [top]))
        if k and (settings.random_k is None or settings.random_k > 0):
            count = k if settings.random_k is None or len(ks) > 1 else settings.random_k
            arms.append((f"random-{count}", count, [random_heads(keys, top, count, seed + r)
                                                     for r in range(settings.repeats)]))
    return arms


@kept_threads()
def ablate(task: str, scores: str, top: list[int] | str, options=None, loaded=None, **overrides) -> dict:
    """Run the arms and write NAME_TASK_ablation.json (and pictures) in options.out. Returns that object.

    ``top`` is a list of K, or ``"auto"``: K = the heads scoring at least ``min_score`` (see heads_above).
    ``overrides`` set AblationSettings fields (random_k, repeats, mode, min_score) and the task's options.
    Every refusal that does not need the model's weights comes before they load; nothing is written before
    the prompts are built."""
    settings, options = settings_and_options("ablate", AblationSettings, task, options, overrides, scores=scores,
                                             top=top)
    heads = HeadScores.load(scores)
    ks = [heads_above(heads, settings.min_score)] if top == "auto" else top
    keys = head_ids_before_loading(options, loaded, [heads])
    if keys is not None:
        plan_arms(heads, keys, ks, settings, options.seed)
    name = model_name_of(options, loaded)
    made_of = identity.digests(run_identity(task, options, loaded))
    path = Path(options.out) / f"{name}_{task}_ablation.json"
    with writer_lock(options.out, f"{name}_{task}_ablation"):
        log = ArmLog(path.with_name(f"{name}_{task}_ablation_samples.jsonl"),
                     ablation_id(task, options, made_of, settings, heads.summary), options.overwrite,
                     made_of=made_of)
        try:
            run = start_run(task, options, loaded, command="ablate")
            arms_to_run = plan_arms(heads, run.keys, ks, settings, options.seed)
            items = all_items(run)
            results, rows_of = run_arms(run, items, arms_to_run, settings.mode, log)
        finally:
            log.close()
        report = {"task": task, "model": run.loaded.path, "scores": str(scores), "mode": settings.mode,
                  "samples": len(run.samples), "none": results["none"]}
        if len(ks) == 1:
            k = ks[0]
            report["top"] = results[f"top-{k}"]
            random_name = next((n for n in results if n.startswith("random-")), None)
            if random_name:
                report["random"] = results[random_name]
        else:
            report["sweep"] = [{"k": k, "top": results[f"top-{k}"], "random": results.get(f"random-{k}")} for k in ks]
        outputs.atomic_write_json(path, report)
        report["path"] = str(path)
        report["pictures"] = draw(report, rows_of, path) if options.plots else []
    return report


def run_arms(run: Run, items: list, arms_to_run: list, mode: str, log: ArmLog) -> tuple[dict, dict]:
    """Every arm's result and rows, with a progress bar over arms x repeats."""
    results, rows_of = {}, {}
    progress = tqdm(total=sum(len(h) for _, _, h in arms_to_run), desc=f"ablate {run.task.name}", unit="arm",
                    disable=run.options.quiet, file=sys.stderr)
    try:
        for name, k, head_sets in arms_to_run:
            if name in results:
                continue
            per_repeat = []
            for repeat, heads in enumerate(head_sets):
                per_repeat.append(run_arm(run, items, heads, (name, repeat, mode), log))
                progress.update(1)
            drawn = name.startswith("random-")
            results[name] = arm_result(per_repeat, k, head_sets if drawn else head_sets[0], drawn)
            rows_of[name] = [row for rows in per_repeat for row in rows]
    finally:
        progress.close()
    return results, rows_of


def settings_and_options(command: str, settings_class, task: str, options, overrides: dict, **given):
    """(settings, task options) of a command that re-runs a task: its settings_class's fields from `overrides` (and
    `given`), the task's options from the rest, both validated. What the command does not use (`ablate=False` in
    an option's metadata: --scorer, --shard, ...) is refused by name, never ignored."""
    names = {spec.name for spec in dataclasses.fields(settings_class)}
    settings = settings_class(**given, **{k: v for k, v in overrides.items() if k in names})
    validate(settings)
    unused = sorted(set(overrides) & unused_by("ablate", TASKS[task].options if task in TASKS else DetectOptions))
    if unused:
        raise HeadscopeError(f"{command} does not use --{unused[0].replace('_', '-')}")
    return settings, task_options(task, options, **{k: v for k, v in overrides.items() if k not in names})


def ablation_id(task: str, options, made_of: dict, settings, summary: dict) -> str:
    """What makes two ablations the same: the model, tokenizer and data (`made_of`, identity.digests), the task's
    result-changing options, the settings and the scores ranked (the run id's rule)."""
    described = dataclasses.asdict(options) | {"ablation": dataclasses.asdict(settings), "scores": summary}
    return store.run_id(task, described, made_of)


def draw(report: dict, rows_of: dict, path) -> list[str]:
    """NIAH grids of the arms side by side (retrieval) and the ablation curve (a sweep)."""
    from ..heads import plots

    pictures = []
    if report["task"] == "retrieval":
        chosen = {name + (" (all draws)" if name.startswith("random-") else ""): rows for name, rows in rows_of.items()}
        pictures.append(plots.niah_grids_side_by_side(chosen, str(path).replace("_ablation.json", "_ablation_niah.png")))
    if "sweep" in report:
        curve = [{"k": point["k"], "top": point["top"]["success_rate"],
                  "random": (point["random"] or point["top"])["success_rate"],
                  "random_std": (point["random"] or {}).get("success_rate_std", 0.0)} for point in report["sweep"]]
        curve.insert(0, {"k": 0, "top": report["none"]["success_rate"], "random": report["none"]["success_rate"],
                         "random_std": 0.0})
        pictures.append(plots.ablation_curve(curve, str(path).replace("_ablation.json", "_ablation_curve.png")))
    return [str(p) for p in pictures]


def format_report(report: dict) -> str:
    """The console table: overall per arm, then per cell."""
    arms = [("none", report["none"])]
    if "sweep" in report:
        for point in report["sweep"]:
            arms.append((f"top-{point['k']}", point["top"]))
            if point["random"]:
                arms.append((f"random-{point['k']}", point["random"]))
    else:
        arms += [(f"top-{report['top']['k']}", report["top"])]
        if "random" in report:
            arms.append((f"random-{report['random']['k']}", report["random"]))
    lines = [f"{'arm':<12} {'success':>8} {'± std':>7} {'metric':>7}"]
    for name, arm in arms:
        std = f"{arm['success_rate_std']:.3f}" if "success_rate_std" in arm else ""
        lines.append(f"{name:<12} {arm['success_rate']:>8.3f} {std:>7} {arm['mean_metric']:>7.1f}")
    cells = list(report["none"]["cells"])
    if len(cells) <= 60:
        lines.append("")
        lines.append(f"{'cell':<14}" + "".join(f"{name:>12}" for name, _ in arms) + "   (success rate)")
        for cell in cells:
            lines.append(f"{cell:<14}" + "".join(f"{arm['cells'][cell]['success_rate']:>12.2f}" for _, arm in arms))
    return "\n".join(lines)
