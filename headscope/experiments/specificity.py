"""`headscope specificity`: are a score file's heads specific to its skill?

For every score file x task: the task's success rate with nothing masked, with the file's top-K heads
masked, and with K random heads outside that top K masked (mean and std over repeats) -- one command,
one model load. If the reasoning heads were specific to reasoning, masking them would hurt the reasoning
task much more than the retrieval task, and masking the retrieval heads the reverse.
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
from pathlib import Path

from tqdm import tqdm

from ..runs import identity, outputs
from .ablation import ArmLog, ablation_id, random_heads, run_arm
from ..detection.engine import (
    all_items, head_ids_before_loading, kept_threads, model_identity, model_name_of, run_identity, start_run,
    task_options)
from ..errors import HeadscopeError
from ..heads import HeadScores
from ..runs.lock import writer_lock
from ..tasks import TASKS


@dataclasses.dataclass
class Arms:
    """What every (file, task) cell runs: K top heads, K random heads, repeats draws, masked how."""

    k: int
    random_k: int | None = None  # default: K
    repeats: int = 3
    mode: str = "uniform"


def success_rate(rows: list[dict]) -> float:
    measured = [row for row in rows if row["error"] is None]
    return sum(row["passed"] for row in measured) / max(len(measured), 1)


@kept_threads()
def specificity(files: list[str], tasks: list[str], arms: Arms, loaded=None, **overrides) -> dict:
    """Run the matrix and write NAME_specificity.json (and its picture) in the output folder. The score files,
    K and every log are checked before a model loads; nothing is written before the first task's prompts are
    built."""
    score_files = {str(path): HeadScores.load(path) for path in files}
    unknown = [task for task in tasks if task not in TASKS or not TASKS[task].success_filter]
    if unknown:
        raise HeadscopeError(f"specificity needs tasks with a success filter (retrieval, reasoning), not {unknown[0]}")
    options_of = {task: options_for(task, overrides) for task in tasks}
    first = options_of[tasks[0]]
    out, name = Path(first.out), model_name_of(first, loaded)
    keys = head_ids_before_loading(first, loaded, list(score_files.values()))
    if keys is not None:
        check_files(score_files, keys, arms)
    with writer_lock(out, f"{name}_specificity"):
        model = model_identity(first, loaded)  # the model's files fingerprinted once, each task's data on its own
        made_of = {task: identity.digests(run_identity(task, options_of[task], loaded, model)) for task in tasks}
        logs = {task: ArmLog(out / f"{name}_specificity_{task}_samples.jsonl",
                             ablation_id(task, options_of[task], made_of[task], arms,
                                         {path: scores.summary for path, scores in score_files.items()}),
                             options_of[task].overwrite, made_of=made_of[task])
                for task in tasks}
        try:
            matrix = run_matrix(score_files, arms, options_of, logs, loaded)
        finally:
            for log in logs.values():
                log.close()
        report = {"k": arms.k, "random_k": arms.random_k or arms.k, "repeats": arms.repeats, "mode": arms.mode,
                  "tasks": tasks, "files": list(score_files), "matrix": matrix}
        path = out / f"{name}_specificity.json"
        outputs.atomic_write_json(path, report)
        report["path"] = str(path)
    return report


def options_for(task: str, overrides: dict):
    """The task's options from the flags given (each task takes those of its own fields)."""
    names = {spec.name for spec in dataclasses.fields(TASKS[task].options)}
    return task_options(task, None, **{key: value for key, value in overrides.items() if key in names})


def check_files(score_files: dict, keys: list[str], arms: Arms) -> None:
    """Every score file scores this model's heads, has K heads with a value, and leaves K random ones to draw."""
    for scores in score_files.values():
        scores.refuse_other_model(keys)
        scores.top(arms.k)
        if (arms.random_k or arms.k) > len(keys) - arms.k:
            raise HeadscopeError(f"cannot draw {arms.random_k or arms.k} random heads from the {len(keys) - arms.k} "
                                 "heads outside the top K")


def run_matrix(score_files: dict, arms: Arms, options_of: dict, logs: dict, loaded) -> dict:
    """{file: {task: cell}}: each task's arms, one model load."""
    matrix = {name: {} for name in score_files}
    for task, options in options_of.items():
        run = start_run(task, options, loaded, command="ablate")
        loaded = run.loaded
        check_files(score_files, run.keys, arms)
        items = all_items(run)
        for name, cell in run_cells(run, items, score_files, arms, logs[task]).items():
            matrix[name][task] = cell
    return matrix


def run_cells(run, items, score_files: dict, arms: Arms, log: ArmLog) -> dict:
    """{file: {"none", "top", "random", "random_std", "top_heads"}} for one task; `none` runs once."""
    keys = run.keys
    label = run.task.name
    quiet = run.options.quiet
    total = 1 + len(score_files) * (1 + arms.repeats)
    progress = tqdm(total=total, desc=f"specificity {label}", unit="arm", disable=quiet, file=sys.stderr)
    none = success_rate(run_arm(run, items, [], ("none", 0, arms.mode), log))
    progress.update(1)
    cells = {}
    for index, (name, scores) in enumerate(score_files.items()):
        top = scores.top(arms.k)
        top_rate = success_rate(run_arm(run, items, top, (f"file{index}-top", 0, arms.mode), log))
        progress.update(1)
        drawn = []
        for repeat in range(arms.repeats):
            heads = random_heads(keys, top, arms.random_k or arms.k, run.options.seed + repeat)
            drawn.append(success_rate(run_arm(run, items, heads, (f"file{index}-random", repeat, arms.mode), log)))
            progress.update(1)
        cells[name] = {"none": none, "top": top_rate, "random": statistics.fmean(drawn),
                       "random_std": statistics.pstdev(drawn), "top_heads": top}
    progress.close()
    return cells


def label(path: str) -> str:
    """A score file by its folder and name: runs of one model share file names."""
    return f"{Path(path).parent.name}/{Path(path).name}".removesuffix("_heads.json")


def format_matrix(report: dict) -> str:
    tasks = report["tasks"]
    lines = [f"success rate with the top-{report['k']} heads of each file masked "
             f"(random: {report['random_k']} other heads, mean ± std over {report['repeats']} draws)"]
    lines.append(f"{'scores':<44}" + "".join(f"{task + ' none/top/random':>34}" for task in tasks))
    for name, row in report["matrix"].items():
        cells = "".join(f"{row[t]['none']:>12.3f}{row[t]['top']:>8.3f}{row[t]['random']:>8.3f}±{row[t]['random_std']:.2f}"
                        for t in tasks)
        lines.append(f"{label(name)[:44]:<44}{cells}")
    return "\n".join(lines)


def draw(report: dict) -> Path:
    from ..heads.plots import specificity_matrix

    path = Path(report["path"]).with_suffix(".png")
    return specificity_matrix(report, path)
