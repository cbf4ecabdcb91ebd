"""`headscope rescore`: re-judge a finished run under other success filters, without running the model again.

Every samples row holds the response, the reference it was judged against and what the sample contributes
to every head, so a success filter (metric, threshold) is one pass over the file: each row passes again
when metric(reference, response) > threshold, and heads and summary are rebuilt with the scorer's own
accumulation rule (the rows' keep_zeros) -- exactly what `detect --metric M --success-threshold T` writes.
Files go to RUN_DIR/rescore/METRIC-THRESHOLD/; the run's own files are never touched.

A task with no success filter (pattern, query: every sample counts, whatever the model answers) has nothing to
rescore: its runs get no settings, files or picture, one line says so, and a folder holding only such runs is
refused.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from ..heads import analysis
from ..runs import outputs, schema, store
from ..errors import HeadscopeError
from ..heads import HeadScores
from ..runs.lock import writer_locks
from ..metrics import METRICS, MODEL_BASED, score_responses

K_VALUES = (5, 10, 20)


def rows_to_judge(paths: dict, manifest: dict) -> list[dict]:
    rows = store.run_rows(paths, manifest)
    for field in ("reference", "response"):  # what rescore judges again: the response against the reference
        missing = next((row for row in rows if field not in row), None)
        if missing is not None:
            raise HeadscopeError(f"{paths['samples']}: sample {missing['id']!r} has no {field!r} field (it was "
                                 "written before headscope recorded what each response was judged against): run "
                                 "detect again")
    return rows


def judge(rows: list[dict], metric: str, metric_model: str | None, trust_remote_code: bool) -> list[float | None]:
    """The metric of every row (None for a row with an error: it never passes)."""
    def judged(row):  # the extracted answer when the run extracted one; None: no answer, never passes
        return row["answer_text"] if "answer_text" in row else row["response"]

    measured = [row for row in rows if row["error"] is None and judged(row) is not None]
    scores = iter(score_responses(metric, [row["reference"] for row in measured],
                                  [judged(row) for row in measured], metric_model, trust_remote_code))
    return [next(scores) if row["error"] is None and judged(row) is not None else None for row in rows]


def rescore(run_dir, metrics: list[str], thresholds: list[float], task: str | None = None,
            metric_model: str | None = None, trust_remote_code: bool = False) -> dict:
    """Rebuild heads and summary for every (metric, threshold); returns the stability report (rescore.json), which
    keeps the settings of earlier rescores of the same runs (a setting rescored again is replaced)."""
    run_dir = Path(run_dir)
    unknown = [metric for metric in metrics if metric not in METRICS]
    if unknown:
        raise HeadscopeError(f"unknown metric {unknown[0]!r}: choose from {', '.join(METRICS)}")
    if not metrics or not thresholds:
        raise HeadscopeError("give at least one --metric and one --threshold")
    started = time.time()
    found, unfiltered = filtered_runs(run_dir, task)
    with writer_locks(run_dir, [prefix for prefix, _ in found] + ["rescore"]):  # no detect writes them meanwhile
        runs, files = {}, {}
        for prefix, manifest in found:  # everything is judged and computed before anything is written
            rows = rows_to_judge(outputs.prefix_paths(run_dir, prefix), manifest)
            scores = {metric: judge(rows, metric, metric_model, trust_remote_code) for metric in metrics}
            runs[prefix] = rescore_run(run_dir, prefix, manifest, rows, scores, thresholds, files)
        earlier = {prefix: run for prefix, run in read_earlier(run_dir / "rescore" / "rescore.json").items()
                   if prefix not in unfiltered}  # an older headscope rescored runs without a filter too: dropped
        report = {"metrics": metrics, "thresholds": thresholds, "runs": with_earlier(earlier, runs),
                  "unfiltered": unfiltered, "seconds": round(time.time() - started, 2)}
        folder = outputs.own_folder(run_dir / "rescore")  # a link there is refused: nothing leaves the folder
        for path, content in files.items():
            outputs.atomic_write_json(outputs.own_folder(path.parent) / path.name, content)
        outputs.atomic_write_json(folder / "rescore.json", report)
    return report


def filtered_runs(run_dir: Path, task: str | None) -> tuple[list[tuple[str, dict]], list[str]]:
    """The folder's runs whose task has a success filter (prefix, manifest), and the prefixes of those whose task
    has none (every sample counts whatever a filter would say: nothing to rescore); refused when every run is of
    the second kind."""
    from ..tasks import TASKS

    found = store.find_runs(run_dir, task)
    unfiltered = [prefix for prefix, manifest in found
                  if manifest.get("task") in TASKS and not TASKS[manifest["task"]].success_filter]
    if len(unfiltered) == len(found):
        tasks = sorted({manifest["task"] for _, manifest in found})
        raise HeadscopeError(f"nothing to rescore in {run_dir}: its runs are of tasks without a success filter "
                             f"({', '.join(tasks)}: every sample counts)")
    return [(prefix, manifest) for prefix, manifest in found if prefix not in unfiltered], unfiltered


def rescore_run(run_dir: Path, prefix: str, manifest: dict, rows: list[dict], scores: dict,
                thresholds: list[float], files: dict) -> dict:
    """One run's settings, each against the run's own; their heads and summary files go into `files`
    (path -> content) for rescore/METRIC-THRESHOLD/ (a run whose task has a success filter: filtered_runs)."""
    keys, paths = manifest["heads"], outputs.prefix_paths(run_dir, prefix)
    base = outputs.read_heads(paths["base_heads"]) if paths["base_heads"].exists() else None  # read once
    own = HeadScores.from_summary(outputs.summarize(store.derive_heads(rows, keys, base))).plain()
    options = manifest.get("options", {})
    settings = []
    for metric, values in scores.items():
        for threshold in thresholds:
            judged = [row | {"passed": value is not None and value > threshold} for row, value in zip(rows, values)]
            heads = store.derive_heads(judged, keys, base)
            summary = outputs.summarize(heads)
            folder = run_dir / "rescore" / f"{metric}-{threshold:g}"
            written = outputs.prefix_paths(folder, prefix)
            files[written["heads"]], files[written["summary"]] = heads, summary
            measured = [value for value in values if value is not None]
            ks = [k for k in K_VALUES if k <= len(keys)] or [len(keys)]
            rescored = HeadScores.from_summary(summary).plain()
            comparison = analysis.compare(own, rescored, ks)
            passing = sum(r["passed"] for r in judged)
            if not passing:  # no head has a value: there is no head set to compare
                comparison = {"per_k": [{"k": k, "overlap": None, "jaccard": None} for k in ks], "spearman": None}
            settings.append({"metric": metric, "threshold": threshold, "passing": passing,
                             "samples": len(rows), "mean_metric": sum(measured) / max(len(measured), 1),
                             "top_k": comparison["per_k"], "spearman": comparison["spearman"],
                             "top10": rescored.top(min(10, len(keys))) if passing else None,
                             "path": str(folder)})
    return {"own": {"metric": options.get("metric"), "threshold": options.get("success_threshold")},
            "run_ids": sorted(manifest.get("runs") or [manifest.get("run")], key=str), "settings": settings}


def read_earlier(path: Path) -> dict:
    """The runs of an earlier rescore.json ({} when there is none); a malformed one is refused, not replaced."""
    if not os.path.lexists(path):
        return {}
    earlier = schema.read_json(path)
    runs = earlier.get("runs") if isinstance(earlier, dict) else None
    valid = isinstance(runs, dict) and all(
        isinstance(run, dict) and isinstance(run.get("settings"), list)
        and all(isinstance(setting, dict) and {"metric", "threshold", "top10"} <= set(setting)
                for setting in run["settings"]) for run in runs.values())
    if not valid:
        raise HeadscopeError(f"{path} is not a rescore report (runs with their settings): move it away to rescore")
    return runs


def with_earlier(earlier: dict, runs: dict) -> dict:
    """Each run's settings: those rescored before (of the same runs) that this rescore did not redo, then this
    rescore's; and the heads whose top-10 membership changes across all of them."""
    merged = {}
    for prefix, run in (earlier | runs).items():
        if prefix in runs:
            kept = earlier.get(prefix, {}) if earlier.get(prefix, {}).get("run_ids") == run["run_ids"] else {}
            redone = {(setting["metric"], setting["threshold"]) for setting in run["settings"]}
            run = dict(run, settings=[setting for setting in kept.get("settings", [])
                                      if (setting["metric"], setting["threshold"]) not in redone] + run["settings"])
        tops = [set(setting["top10"]) for setting in run["settings"] if setting["top10"] is not None] or [set()]
        merged[prefix] = dict(run, top10_changing=sorted(set.union(*tops) - set.intersection(*tops),
                                                         key=outputs.parse_head_key))
    return merged


def format_report(report: dict) -> str:
    lines = [f"{prefix}: its task has no success filter (every sample counts): nothing to rescore"
             for prefix in report.get("unfiltered", [])]
    for prefix, run in report["runs"].items():
        own = run["own"]
        lines.append(f"{prefix}: against the run's own filter ({own['metric']} > {own['threshold']})")
        lines.append(f"{'metric':<10} {'thresh':>6} {'passing':>9} {'metric':>7} " +
                     " ".join(f"{'J@' + str(p['k']):>6}" for p in run["settings"][0]["top_k"]) + f" {'spearman':>9}")
        for s in run["settings"]:
            jaccards = " ".join(f"{p['jaccard']:>6.2f}" if p["jaccard"] is not None else f"{'-':>6}"
                                for p in s["top_k"])
            spearman = f"{s['spearman']:>9.3f}" if s["spearman"] is not None else f"{'-':>9}"
            lines.append(f"{s['metric']:<10} {s['threshold']:>6g} {s['passing']:>4}/{s['samples']:<4} "
                         f"{s['mean_metric']:>7.1f} {jaccards} {spearman}")
        changing = ", ".join(run["top10_changing"]) or "none"
        lines.append(f"heads whose top-10 membership changes across these settings: {changing}"
                     + ("  ('-': no sample passes, no head set)" if any(s["top10"] is None for s in run["settings"])
                        else ""))
    lines.append(f"rescored {sum(len(r['settings']) for r in report['runs'].values())} settings in "
                 f"{report['seconds']:.1f} s, no model run" + (" (model-based metrics load their encoder)"
                                                               if set(report["metrics"]) & set(MODEL_BASED) else ""))
    return "\n".join(lines)


def draw(report: dict, run_dir: Path) -> list[Path]:
    from ..heads.plots import rescore_stability

    pictures = []
    for prefix, run in report["runs"].items():
        curves = {}
        for setting in run["settings"]:
            jaccard = next((p["jaccard"] for p in setting["top_k"] if p["k"] == 10), setting["top_k"][-1]["jaccard"])
            points = curves.setdefault(setting["metric"], [])
            if jaccard is not None:  # no sample passed: no point (the legend says so)
                points.append((setting["threshold"], jaccard))
        pictures.append(rescore_stability(curves, run_dir / "rescore" / f"{prefix}_rescore.png",
                                          f"{prefix}: top-10 Jaccard against the run's own filter"))
    return pictures

