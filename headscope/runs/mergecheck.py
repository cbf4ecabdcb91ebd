"""What `merge` checks of the shards' merged rows before it writes a byte (store.merge): a merge that would be
refused halfway (a row with the wrong number of head scores, a mean that overflows) or that would be wrong
without a refusal (a sample twice under two indexes, a grid size edited smaller, rows of another task, a `passed`
that the run's own success filter contradicts) is refused in one line, with the folder as it was.

store.merged_run has already checked that the shards are finished shards of the same runs whose indexes cover
each run's grid_size exactly once; the checks here read what that cannot see."""
from __future__ import annotations

import re

from ..errors import HeadscopeError
from .schema import read_manifest


def refuse_inconsistent_merge(shards, rows: list[dict], manifest: dict) -> None:
    """One line for the first thing of the merged run that does not hold (see the module's docstring)."""
    where = shards.prefix
    refuse_other_tasks(shards, rows, manifest["task"])
    for run, record in manifest["runs"].items():
        run_rows = [row for row in rows if row["run"] == run]
        refuse_repeated_ids(where, run, run_rows)
        refuse_other_shapes(where, run_rows, len(manifest["heads"]))
        refuse_contradicted_passes(where, run_rows, manifest["task"], record.get("options", {}))
        problem = grid_problem(manifest["task"], record.get("options", {}), record.get("grid_size"), run_rows)
        if problem:
            raise HeadscopeError(f"{where}: run {run}'s grid_size {record.get('grid_size')} {problem}: a manifest "
                                 "was edited, or the shards are not of one run")


def refuse_other_tasks(shards, rows: list[dict], task: str) -> None:
    """Every shard's manifest and every row are of the merged run's task."""
    for index in sorted(shards.paths):
        other = read_manifest(shards.manifest_path(index))["task"]
        if other != task:
            raise HeadscopeError(f"{shards.prefix}: shard {index}'s manifest is of task {other!r} and shard 0's of "
                                 f"{task!r}: shards of different tasks are not merged")
    stray = next((row for row in rows if row.get("task", task) != task), None)
    if stray is not None:
        raise HeadscopeError(f"{shards.prefix}: sample {stray['id']} is a row of task {stray['task']!r}, not "
                             f"{task!r}: shards of different tasks are not merged")


def refuse_repeated_ids(where: str, run: str, rows: list[dict]) -> None:
    """One sample, one index: an id under two indexes is a sample counted twice (and another one missing)."""
    seen: dict[str, int] = {}
    for row in rows:
        if row["id"] in seen:
            raise HeadscopeError(f"{where}: sample {row['id']} of run {run} is at indexes {seen[row['id']]} and "
                                 f"{row['index']}: one of them is another sample's place")
        seen[row["id"]] = row["index"]


def refuse_other_shapes(where: str, rows: list[dict], heads: int) -> None:
    """Every row's head scores are one per head the manifest lists (checked before the samples file is written,
    not when its heads file would be)."""
    for row in rows:
        scores = row.get("head_scores")
        count = None if scores is None else sum(map(len, scores))
        if count is not None and count != heads:
            raise HeadscopeError(f"{where}: sample {row['id']} has {count} head scores, and the run's manifest lists "
                                 f"{heads} heads")


def refuse_contradicted_passes(where: str, rows: list[dict], task: str, options: dict) -> None:
    """`passed` is what the run's success filter says of the row's score: an error never passes; with a filter,
    a sample passes when it has an answer and its score is above --success-threshold; without one, always."""
    from ..tasks import TASKS

    threshold = options.get("success_threshold")
    filtered = TASKS[task].success_filter if task in TASKS else True
    if filtered and threshold is None:
        return  # nothing to judge by (a run of an older headscope, or a task registered elsewhere)
    for row in rows:
        if row["error"] is not None:
            expected = False
        elif not filtered:
            expected = True
        else:
            expected = row.get("answer_text", "") is not None and row["score"] is not None \
                and row["score"] > threshold
        if row["passed"] != expected:
            raise HeadscopeError(f"{where}: sample {row['id']} says passed: {str(row['passed']).lower()}, but its "
                                 f"score ({row['score']}) and error say {str(expected).lower()} under "
                                 f"--success-threshold {threshold}: a row was edited")


RETRIEVAL_ID = re.compile(r"^n(?P<needle>\d+)-L(?P<length>\d+)-d(?P<depth>.+)$")


def grid_problem(task: str, options: dict, grid_size: int | None, rows: list[dict]) -> str | None:
    """What is wrong with a run's grid_size given its options and rows (None: nothing seen). The grid is rebuilt
    nowhere (that needs the tokenizer and the data); what the options and the rows' own ids fix is checked."""
    if grid_size is None:
        return None
    if task == "pattern" and isinstance(options.get("num_samples"), int) and grid_size != options["num_samples"]:
        return f"is not its --num-samples {options['num_samples']}"
    lengths = len(options.get("context_lengths") or [None])  # reasoning: each record at each context length
    if task in ("reasoning", "query") and isinstance(options.get("num_samples"), int) \
            and grid_size > options["num_samples"] * lengths:
        return f"is more than its --num-samples {options['num_samples']} x {lengths} context length(s)"
    if task == "retrieval":
        return retrieval_grid_problem(options, grid_size, rows)
    return None


def depth_count(options: dict) -> int | None:
    """How many depths a retrieval grid has: --depths as given, or --num-depths as spaced (equal ones merged)."""
    from ..tasks.retrieval import depth_percents

    if options.get("depths"):
        return len(options["depths"])
    if isinstance(options.get("num_depths"), int) and options["num_depths"] > 0:
        return len(depth_percents(options["num_depths"], options.get("depth_spacing") or "linear"))
    return None


def retrieval_grid_problem(options: dict, grid_size: int, rows: list[dict]) -> str | None:
    """A retrieval grid is needles x context lengths x depths (ids n{needle}-L{length}-d{depth}): at least the
    needles, lengths and depths its rows show, with as many depths as --depths or --num-depths and as many lengths
    as --context-lengths name."""
    places = [found.groupdict() for found in map(RETRIEVAL_ID.match, (row["id"] for row in rows)) if found]
    if len(places) != len(rows):
        return None  # ids of another form: nothing to compare
    depths = depth_count(options)
    lengths = len(set(options["context_lengths"])) if options.get("context_lengths") else None
    seen = [len({place[part] for place in places}) for part in ("needle", "length", "depth")]
    least = seen[0] * max(seen[1], lengths or 0) * max(seen[2], depths or 0)
    if grid_size < least:
        return f"is smaller than the {least} samples its rows' needles, context lengths and depths make"
    step = (depths or 1) * (lengths or 1)
    if isinstance(depths, int) and depths > 0 and grid_size % step:
        return f"is not a whole number of needles x {step} samples (its context lengths x depths)"
    return None
