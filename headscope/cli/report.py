"""`headscope report RUN_DIR`: one self-contained HTML page per run, to look at what a detection found.

The page is rendered from templates/report.html.j2 with Jinja2. Its charts are Vega-Lite specs built here
(declarative: no charting code) and drawn in the browser by vega-embed, whose runtime vl-convert bundles
into one script that is inlined with everything else: the page opens offline. What it shows:

  run card        the manifest: model, dtype, task, scorer, grid, success filter, counts, versions, run ids
  heatmap         layer x head means (diverging around 0 for signed scores); hover for the figures, click to
                  select a head; with >= 2 passing samples a bootstrap gives each head a 95% interval and
                  P(top K) (`analysis.bootstrap`, as `show --bootstrap`)
  ranked table    the same figures, sortable
  NIAH grid       mean score per (context length, depth) for retrieval runs; click a cell to list its samples
  ablation, kv, specificity, rescore
                  their tables and pictures, when NAME_TASK_ablation.json, NAME_TASK_kv.json,
                  NAME_specificity.json or rescore/rescore.json lie in the folder
  samples         the prompt around the span (highlighted), the response, the metric, pass/fail and the
                  selected head's contribution; filter by outcome, sort by contribution
  compare         with --compare: top-K overlap, Jaccard, Spearman and a scatter of the two runs' means
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..heads import analysis
from ..runs import lock, outputs, schema, store
from ..errors import HeadscopeError, notify
from ..heads import HeadScores
from ..runs.outputs import parse_head_key
from ..scorers import keeps_zeros
from ..tasks import TASKS
from ..validate import refuse_overwriting

# Row fields the sample browser shows in their own places; any other field is shown as a "key=value" chip.
SHOWN_FIELDS = {"run", "index", "id", "task", "reference", "prompt_tokens", "span", "span_method", "response",
                "score", "passed", "error", "duration_s", "scorer", "keep_zeros", "head_scores", "answer_text",
                "excerpt", "prompt"}
MAX_IMAGE_BYTES = 2_000_000  # a picture larger than this is left out of the page (it stays small)
MOST_PAGES = 100  # runs of a folder report makes pages for at once; above, --run picks one
SHOWN_PROGRESS = 5  # from this many runs on, a progress bar says how far report has come


def report(run_dir, out=None, compare=None, run: str | None = None, bootstrap: int = 1000,
           k: int | None = None) -> list[Path]:
    """Write the page of each run in `run_dir` (or of `run`, a NAME_TASK prefix); returns the paths written.

    One run: RUN_DIR/report.html (or `out`); several: RUN_DIR/NAME_TASK_report.html each."""
    run_dir = Path(run_dir)
    if bootstrap < 0:
        raise HeadscopeError(f"--bootstrap must be 0 (none) or a number of resamples, not {bootstrap}")
    every_run, folder_of = page_runs(run_dir)
    runs = [(prefix, manifest) for prefix, manifest in every_run if run in (None, prefix)]
    if not runs:
        raise HeadscopeError(f"no run {run!r} in {run_dir}: it holds " + ", ".join(p for p, _ in every_run))
    if len(runs) > MOST_PAGES:
        raise HeadscopeError(f"{run_dir} holds {len(runs):,} runs: a page each (about 1 MB a page) is more than report "
                             f"makes at once ({MOST_PAGES}); pick one with --run NAME_TASK")
    if out is not None and len(runs) > 1:
        raise HeadscopeError(f"{run_dir} holds {len(runs)} runs ({', '.join(p for p, _ in runs)}): "
                             "pick one with --run to write it to --out")
    if out is not None:
        compared = [] if compare is None else [Path(compare) if Path(compare).is_dir() else Path(compare).parent]
        refuse_overwriting(out, "--out", [] if compare is None else [compare], [run_dir, *compared])
        outputs.write_target(out, follow=True)  # a folder or device named --out is refused before the work
    other = load_other(compare, runs) if compare is not None else None
    contexts = {}  # every run is read and checked before a page is rendered or written
    for prefix, manifest in tqdm(runs, desc="report: reading runs", unit="run", file=sys.stderr,
                                 disable=len(runs) < SHOWN_PROGRESS):
        path = Path(out) if out else run_dir / ("report.html" if len(every_run) == 1 else f"{prefix}_report.html")
        contexts[path] = page_context(folder_of[prefix], prefix, manifest, other and other.get(prefix), bootstrap, k,
                                      companions=run_dir)
    bundle = vega_bundle()
    for path, context in tqdm(contexts.items(), desc="report: writing pages", unit="page", file=sys.stderr,
                              disable=len(contexts) < SHOWN_PROGRESS):
        outputs.atomic_write_text(path, render(context, bundle), follow=out is not None)  # a named path: via links
    return list(contexts)


def page_runs(run_dir: Path) -> tuple[list[tuple[str, dict]], dict[str, Path]]:
    """The runs whose pages `report RUN_DIR` writes (prefix, manifest), and the folder of each one's files: the
    folder's own detect runs; or, in a folder holding ablations only (`ablate --out elsewhere`, as the
    sweep of docs/experiments.md), the detect runs their heads files came from, each page with this folder's ablation."""
    try:
        runs = store.find_runs(run_dir)
        return runs, {prefix: run_dir for prefix, _ in runs}
    except HeadscopeError:
        ablations = sorted(run_dir.glob("*_ablation.json")) if run_dir.is_dir() else []
        if not ablations:
            raise
    runs, folders = [], {}
    for path in ablations:
        prefix = path.name.removesuffix("_ablation.json")
        ablation = schema.read_json(path)
        scores = Path(ablation["scores"]) if isinstance(ablation, dict) and isinstance(ablation.get("scores"), str) \
            else None
        found = []
        if scores is not None:
            with contextlib.suppress(HeadscopeError):  # no run beside the heads file: said below
                found = [(other, manifest) for other, manifest in store.find_runs(scores.parent) if other == prefix]
        if not found:
            raise HeadscopeError(f"no detect run in {run_dir}, and the run of its ablation's heads file ({scores}) "
                                 f"is not beside that file: give the folder of the detect run {prefix}")
        runs += found
        folders[prefix] = scores.parent
    return runs, folders


# -------------------------------------------------------------------------------------------- a run

def read_run(run_dir: Path, prefix: str, manifest: dict) -> dict:
    """The run's manifest, rows, head ids and summary (derived from the rows, as detect derives its files)."""
    paths = outputs.prefix_paths(run_dir, prefix)
    rows = store.run_rows(paths, manifest)
    keys = manifest["heads"]
    _, summary = store.derive_heads_and_summary(paths, rows, keys)
    return {"folder": run_dir, "prefix": prefix, "manifest": manifest, "rows": rows, "keys": keys,
            "scores": HeadScores.from_summary(summary, manifest)}


def page_context(run_dir: Path, prefix: str, manifest: dict, other: dict | None, bootstrap: int,
                 k: int | None, companions: Path | None = None) -> dict:
    """Everything the template needs, as plain data; the ablation, kv, specificity and rescore sections from the
    files in `companions` (default: the run's folder)."""
    run = read_run(run_dir, prefix, manifest)
    keys, scores = run["keys"], run["scores"]
    summary, layers, heads_per_layer = scores.summary, scores.layers, scores.heads_per_layer
    k = min(10, len(keys)) if k is None else k
    if bootstrap and not 1 <= k <= len(keys):
        raise HeadscopeError(f"--k must be between 1 and the number of heads ({len(keys)}), not {k}")
    stability, no_bootstrap = head_stability(run["rows"], keys, bootstrap, k)
    heads = head_entries(keys, summary, stability)
    means = [head["mean"] for head in heads if head["mean"] is not None]
    signed = bool(means) and min(means) < 0 < max(means)
    samples, contributions = sample_entries(run["rows"], keys)
    best = heads[0]["id"] if heads else None
    legacy = outputs.prefix_paths(run_dir, prefix)["base_heads"]
    context = {
        "title": f"{prefix} — headscope report",
        "prefix": prefix,
        "card": run_card(manifest, run["rows"], layers, heads_per_layer) | {"writing": writer_now(run_dir, prefix)},
        "heads": heads,
        "k": k,
        "stability": stability is not None and {"resamples": bootstrap, "samples": stability["num_samples"]},
        "no_bootstrap": no_bootstrap,
        "legacy": legacy.name if legacy.exists() else None,  # lists of a Retrieval_Head heads file, in the means
        "signed": signed,
        "all_zero": not any(means),
        "no_value": not means,  # every head null: no passing sample has a score (the rows' `unscored` say why)
        "samples": samples,
        "counts": outcome_counts(samples),
        "compare": compare_section(run, other) if other else None,
    } | companion_sections(companions or run_dir, prefix, manifest)
    context["charts"] = {"heatmap": None if context["all_zero"] else heatmap_spec(heads, signed, heads_per_layer, best, k),
                         "niah": niah_spec(samples),
                         "scatter": context["compare"].pop("spec") if context["compare"] else None}
    # contributions are made finite where they are built (the largest part: one walk over them is enough)
    context["data"] = finite({"heads": heads, "selected": best, "k": k, "charts": context["charts"]}) | {
        "contributions": contributions}
    return context


def writer_now(run_dir: Path, prefix: str) -> str | None:
    """The pid of a process writing the run while its page is made (its files are then a run in progress, and the
    page says so, not "unfinished"), with a note."""
    pid = lock.holder(run_dir, prefix)
    if pid is not None:
        notify(f"{prefix} is being written (pid {pid}): its page shows the samples finished so far; make the page "
               "again when the run finishes")
    return pid


def run_card(manifest: dict, rows: list[dict], layers: list[int], heads_per_layer: int) -> dict:
    options = manifest.get("options", {})
    task = TASKS.get(manifest.get("task"))
    filtered = task is None or task.success_filter
    if not filtered:  # the filter's settings mean nothing here: the card says so once, and lists none of them
        success = "none: every sample counts"
        options = {key: value for key, value in options.items() if key not in filter_fields(task)}
    else:
        success = f"{options.get('metric', 'rouge1')} > {options.get('success_threshold')}"
        if options.get("answer_marker") or options.get("answer_from", "full") != "full":
            success += f" on the answer ({options.get('answer_from')}, marker {options.get('answer_marker')!r})"
    versions = manifest.get("versions", {})
    return {
        "model": manifest.get("model_path") or options.get("model"),
        "revision": manifest.get("model_revision") or "-",
        "dtype": manifest.get("dtype"),
        "attention": manifest.get("attention"),
        "task": manifest.get("task"),
        "scorer": manifest.get("scorer") or manifest.get("task"),
        "grid": (analysis.layers_line(layers, manifest.get("layers")) or f"{len(layers)} layers") +
                f" × {heads_per_layer} heads ({len(layers) * heads_per_layer} heads)",
        "success": success,
        "filtered": filtered,  # a sample's metric is shown only where a filter judged it
        "run": len(rows),
        "passed": sum(1 for row in rows if row.get("passed")),
        "errors": sum(1 for row in rows if row.get("error")),
        "versions": {name: versions.get(name) for name in ("headscope", "transformers", "torch")},
        "runs": [{"id": run_id, "started": info.get("started"), "finished": info.get("finished")}
                 for run_id, info in manifest.get("runs", {manifest.get("run"): manifest}).items()],
        "prompt_template": manifest.get("prompt_template"),
        "options": {key: value for key, value in options.items() if value is not None},
    }


def filter_fields(task) -> set[str]:
    """The option fields of the success filter (--metric, --success-threshold, ...) of a task's options."""
    return {spec.name for spec in dataclasses.fields(task.options) if spec.metadata.get("success_filter")}


def head_stability(rows: list[dict], keys: list[str], resamples: int, k: int) -> tuple[dict | None, str | None]:
    """The bootstrap of `analysis.bootstrap` (95% interval, P(top K)) and None; or None and why there is none."""
    if resamples < 1:
        return None, "No bootstrap (--bootstrap 0)."
    try:
        contributions = analysis.sample_contributions(rows, keys)
        rule = keeps_zeros(rows)
    except HeadscopeError:  # rows of an older headscope (no accumulation rule recorded): no intervals
        return None, "No bootstrap (the rows of an older headscope do not record how they accumulate)."
    if contributions.shape[0] < 2:
        passing = sum(bool(row.get("passed")) for row in rows)
        return None, (f"No bootstrap: it needs 2 passing samples with head scores, and of the {passing} passing "
                      f"samples {contributions.shape[0]} {'has' if contributions.shape[0] == 1 else 'have'} them.")
    return analysis.bootstrap(contributions, rule, resamples, k), None


def head_entries(keys: list[str], summary: dict, stability: dict | None) -> list[dict]:
    """One entry per head, ranked best first (`outputs.ranked`): what the heatmap's hover and the table show.
    `index` is the head's place in `keys`, the column of its contributions."""
    index_of = {key: index for index, key in enumerate(keys)}
    entries = []
    for rank, (key, stats) in enumerate(outputs.ranked(summary), 1):
        index = index_of[key]
        layer, head = parse_head_key(key)
        entry = {"id": key, "index": index, "rank": rank, "layer": layer, "head": head, **stats}
        if stability is not None:
            entry |= {"ci_low": float(stability["ci_low"][index]), "ci_high": float(stability["ci_high"][index]),
                      "p_top_k": float(stability["p_top_k"][index])}
        entries.append(entry)
    return entries


def outcome(row: dict) -> str:
    return "error" if row.get("error") else "passed" if row.get("passed") else "failed"


def sample_entries(rows: list[dict], keys: list[str]) -> tuple[list[dict], list]:
    """The browser's samples, and each one's contribution to every head (index as in `keys`; None when the
    row has no head scores, e.g. an error)."""
    samples, contributions = [], []
    for position, row in enumerate(rows):
        samples.append({
            "position": position, "id": row.get("id"), "outcome": outcome(row), "score": row.get("score"),
            "reference": row.get("reference"), "response": row.get("response"), "answer_text": row.get("answer_text"),
            "error": row.get("error"), "excerpt": row.get("excerpt"), "span_method": row.get("span_method"),
            "prompt_tokens": row.get("prompt_tokens"),
            "context_length": row.get("context_length"), "depth_percent": row.get("depth_percent"),
            "meta": {key: value for key, value in row.items() if key not in SHOWN_FIELDS and value is not None}})
        scores = row.get("head_scores")
        contributions.append(None if scores is None else finite(np.round(np.ravel(scores).astype(float), 5).tolist()))
    return samples, contributions


def outcome_counts(samples: list[dict]) -> dict:
    counts = {"all": len(samples), "passed": 0, "failed": 0, "error": 0}
    for sample in samples:
        counts[sample["outcome"]] += 1
    return counts


# ------------------------------------------------------------------------------------------ charts

def heatmap_spec(heads: list[dict], signed: bool, heads_per_layer: int, selected: str | None, k: int) -> dict:
    """Layer x head rects coloured by mean (layer 0 at the bottom, as the PNG); `selected` is outlined.
    A head with no value (null mean) is grey."""
    cell = max(10, min(44, 640 // max(heads_per_layer, 1)))
    scale = {"scheme": "redblue", "reverse": True, "domainMid": 0} if signed else {"scheme": "viridis"}
    tooltip = [{"field": "id", "title": "head id"}, {"field": "rank"},
               {"field": "mean", "format": ".4f"}, {"field": "std", "format": ".4f"},
               {"field": "count"}, {"field": "max", "format": ".4f"}]
    if heads and "ci_low" in heads[0]:
        tooltip += [{"field": "ci_low", "title": "95% CI low", "format": ".4f"},
                    {"field": "ci_high", "title": "95% CI high", "format": ".4f"},
                    {"field": "p_top_k", "title": f"P(top {k})", "format": ".3f"}]
    is_selected = "datum.id === selected"
    return {
        "data": {"values": heads},
        "params": [{"name": "selected", "value": selected}],
        "width": {"step": cell}, "height": {"step": cell},
        "mark": {"type": "rect", "invalid": None},
        "encoding": {
            "x": {"field": "head", "type": "ordinal", "title": "head"},
            "y": {"field": "layer", "type": "ordinal", "title": "layer", "sort": "descending"},
            "color": {"condition": {"test": "datum.mean === null", "value": "#cccccc"},
                      "field": "mean", "type": "quantitative", "title": "mean score", "scale": scale},
            "stroke": {"condition": {"test": is_selected, "value": "#000000"}, "value": None},
            "strokeWidth": {"condition": {"test": is_selected, "value": 3}, "value": 0},
            "tooltip": tooltip,
        },
        "config": {"view": {"stroke": None}},
    }


def niah_spec(samples: list[dict]) -> dict | None:
    """Mean metric per (context length, depth), as the NIAH PNG; None when the rows are not a NIAH grid.
    Samples with an error measured nothing and are left out (as plots.niah_matrix)."""
    measured = [s for s in samples if s["context_length"] is not None and s["depth_percent"] is not None
                and s["outcome"] != "error"]
    if not measured:
        return None
    lengths = sorted({s["context_length"] for s in measured})
    labels = dict(zip(lengths, analysis.length_labels(measured, lengths)))  # "300 (125)": setting, prompt tokens
    cells = [{"context_length": s["context_length"], "length": labels[s["context_length"]],
              "depth_percent": s["depth_percent"], "score": s["score"]} for s in measured]
    return {
        "data": {"values": cells},
        "width": {"step": 56}, "height": {"step": 36},
        "mark": "rect",
        "encoding": {
            "x": {"field": "length", "type": "ordinal", "title": analysis.LENGTH_AXIS,
                  "sort": {"field": "context_length"}},
            "y": {"field": "depth_percent", "type": "ordinal", "title": "needle depth (%)"},
            "detail": {"field": "context_length"},  # kept in each cell's datum: a click lists its samples
            "color": {"aggregate": "mean", "field": "score", "type": "quantitative", "title": "score",
                      "scale": {"domain": [0, 100], "range": ["#F0496E", "#EBB839", "#0CD79F"]}},
            "tooltip": [{"field": "length", "title": "context length (prompt tokens)"},
                        {"field": "depth_percent", "title": "depth (%)"},
                        {"aggregate": "mean", "field": "score", "title": "mean score", "format": ".1f"},
                        {"aggregate": "count", "title": "samples"}],
        },
        "config": {"view": {"stroke": None}},
    }


def scatter_spec(points: list[dict], labels: tuple[str, str], selected: str | None) -> dict:
    is_selected = "datum.id === selected"
    return {
        "data": {"values": points},
        "params": [{"name": "selected", "value": selected}],
        "width": 420, "height": 420,
        "mark": {"type": "point", "filled": True},
        "encoding": {
            "x": {"field": "a", "type": "quantitative", "title": labels[0]},
            "y": {"field": "b", "type": "quantitative", "title": labels[1]},
            "size": {"condition": {"test": is_selected, "value": 160}, "value": 40},
            "color": {"condition": {"test": is_selected, "value": "#d62728"}, "value": "#1f77b4"},
            "tooltip": [{"field": "id", "title": "head"}, {"field": "a", "title": labels[0], "format": ".4f"},
                        {"field": "b", "title": labels[1], "format": ".4f"}],
        },
    }


# ---------------------------------------------------------------------------- companion results

def image(path: Path) -> str | None:
    """A PNG as a data: URI, to inline it; None when it is missing or too large."""
    if not path.is_file() or path.stat().st_size > MAX_IMAGE_BYTES:
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def companion_sections(run_dir: Path, prefix: str, manifest: dict) -> dict:
    """The ablation, KV cache, specificity and rescore sections, each from its own file when it lies in the folder, and
    `notes`: a malformed file drops its section with a visible note, and the page is written all the same."""
    task = manifest["task"]
    name = prefix.removesuffix("_" + outputs.file_label(task, manifest.get("scorer") or task))  # NAME of NAME_TASK
    files = {"ablation": (run_dir / f"{prefix}_ablation.json", lambda data: ablation_section(data, run_dir, prefix)),
             "specificity": (run_dir / f"{name}_specificity.json",
                             lambda data: specificity_section(data, run_dir / f"{name}_specificity.png", prefix)),
             "rescore": (run_dir / "rescore" / "rescore.json", lambda data: rescore_section(data, run_dir, prefix)),
             "kv": (run_dir / f"{prefix}_kv.json", lambda data: kv_section(data, run_dir, prefix))}
    sections, notes = {}, []
    for section, (path, build) in files.items():
        sections[section], note = companion(path, build)
        if note:
            notify(f"{note}: the {section} section is left out of the report")
            notes.append(f"{note}: the {section} section is left out")
    return sections | {"notes": notes}


def companion(path: Path, build) -> tuple[dict | None, str | None]:
    """(section, None), (None, None) when there is no file, or (None, the reason) when it is malformed."""
    if not path.is_file():
        return None, None
    try:
        return build(schema.read_json(path)), None
    except HeadscopeError as error:
        return None, str(error)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:  # a field missing or of the
        return None, f"{path} is malformed ({type(error).__name__}: {error})"       # wrong kind, deep in the file


def ablation_section(result: dict, run_dir: Path, prefix: str) -> dict | None:
    """NAME_TASK_ablation.json: success with nothing masked, the top-K heads masked, and K random heads; a sweep
    of K or a single K."""
    points = result["sweep"] if "sweep" in result else [{"k": result["top"]["k"], "top": result["top"],
                                                         "random": result.get("random")}]
    arms = [{"k": 0, "heads": "-", "top": result["none"]["success_rate"], "random": None, "random_std": None,
             "repeats": None}]
    for entry in points:
        random = entry.get("random") or {}
        arms.append({"k": entry["k"], "heads": " ".join(map(str, entry["top"]["heads"])),
                     "top": entry["top"]["success_rate"], "random": random.get("success_rate"),
                     "random_std": random.get("success_rate_std"), "repeats": random.get("repeats")})
    return {"mode": result.get("mode"), "samples": result.get("samples"), "arms": arms,
            "images": [uri for uri in (image(run_dir / f"{prefix}_ablation_{name}.png") for name in ("curve", "niah"))
                       if uri]}


def kv_section(result: dict, run_dir: Path, prefix: str) -> dict:
    """NAME_TASK_kv.json: the task's success at each share of the KV cache kept, per policy (kv_output.py)."""
    from ..experiments.kv_output import section

    return section(result) | {"image": image(run_dir / f"{prefix}_kv.png")}


def specificity_section(result: dict, picture: Path, prefix: str) -> dict | None:
    """NAME_specificity.json (model NAME of this run): each score file's top-K masked on each task; on the pages of
    the runs whose heads (or summary) file it tested only (by file name: the paths are as the user typed them)."""
    from ..experiments.specificity import label

    if not {Path(str(path)).name for path in result["files"]} & {f"{prefix}_heads.json", f"{prefix}_summary.json"}:
        return None
    tasks = [str(task) for task in result["tasks"]]
    rows = [{"scores": label(path), "cells": [specificity_cell(row.get(task)) for task in tasks]}
            for path, row in result["matrix"].items()]
    return {"k": result.get("k"), "random_k": result.get("random_k"), "repeats": result.get("repeats"),
            "tasks": tasks, "rows": rows, "image": image(picture)}


def specificity_cell(cell: dict | None) -> dict | None:
    return None if cell is None else {key: cell[key] for key in ("none", "top", "random", "random_std")}


def rescore_section(result: dict, run_dir: Path, prefix: str) -> dict | None:
    """rescore/rescore.json: how this run's head set moves under other success filters."""
    run = result["runs"].get(prefix)
    if not run or run.get("success_filter") is False:  # a task without a filter (an older rescore.json listed it)
        return None
    settings = [{"metric": setting["metric"], "threshold": setting["threshold"], "passing": setting["passing"],
                 "samples": setting["samples"], "mean_metric": setting["mean_metric"],
                 "top_k": [{"k": entry["k"], "overlap": entry["overlap"], "jaccard": entry["jaccard"]}
                           for entry in setting["top_k"]], "spearman": setting["spearman"]}
                for setting in run["settings"]]
    ks = [entry["k"] for entry in settings[0]["top_k"]] if settings else []
    return {"own": {"metric": run["own"]["metric"], "threshold": run["own"]["threshold"]}, "ks": ks,
            "settings": settings, "changing": [str(head) for head in run.get("top10_changing", [])],
            "image": image(run_dir / "rescore" / f"{prefix}_rescore.png")}


# ------------------------------------------------------------------------------------------ compare

def load_other(compare, runs: list) -> dict:
    """The run each run is compared with, by its prefix. `compare` is a run folder (its run of the same NAME_TASK,
    else its only run) or one file of a run (NAME_TASK_heads.json, ...: that run, e.g. another scorer's run in
    the same folder)."""
    compare = Path(compare)
    other_dir = compare.parent if compare.is_file() else compare
    others = dict(store.find_runs(other_dir))
    if compare.is_file():  # NAME_TASK_KIND.EXT: the longest run prefix it starts with (retrieval_r2 over retrieval)
        owners = sorted((prefix for prefix in others if compare.name.startswith(prefix + "_")), key=len)
        if not owners:
            raise HeadscopeError(f"{compare} is not a file of a detect run in {other_dir}: it holds "
                                 + ", ".join(others))
        others = {owners[-1]: others[owners[-1]]}
    chosen = {}
    for prefix, _ in runs:
        match = prefix if prefix in others else next(iter(others)) if len(others) == 1 else None
        if match is None:
            raise HeadscopeError(f"{other_dir} holds {len(others)} runs and none is {prefix}: pass one of its "
                                 "files (e.g. NAME_TASK_heads.json) to --compare")
        chosen[prefix] = read_run(other_dir, match, others[match])
    return chosen


def compare_section(run: dict, other: dict) -> dict:
    """Overlap and Jaccard of the top-K sets, Spearman over all heads (`analysis.compare`), and the scatter."""
    ours, theirs = run["scores"].plain(), other["scores"].plain()
    ks = [k for k in (5, 10, 20, 30) if k <= len(ours.summary)] or [len(ours.summary)]
    result = analysis.compare(ours, theirs, ks)
    labels = (run_label(run), run_label(other))
    points = [{"id": key, "a": ours.summary[key]["mean"], "b": theirs.summary[key]["mean"]} for key in run["keys"]]
    spearman = result["spearman"]
    return {"labels": labels, "per_k": result["per_k"], "spearman": None if math.isnan(spearman) else spearman,
            "largest_k": result["largest_k"], "only_a": result["only_a"], "only_b": result["only_b"],
            "spec": scatter_spec(points, labels, ours.top(1)[0])}


def run_label(run: dict) -> str:
    manifest = run["manifest"]
    task, scorer = manifest.get("task"), manifest.get("scorer") or manifest.get("task")
    what = task if task == scorer else f"{task} ({scorer})"
    return f"{run['folder'].name}/{run['prefix']}: {what}"


# ------------------------------------------------------------------------------------------- the page

def vega_bundle() -> str:
    """vega, vega-lite and vega-embed in one script that sets window.vegaEmbed (vl-convert bundles it, offline)."""
    try:
        import vl_convert
    except ImportError:
        raise HeadscopeError("headscope report needs vl-convert-python: pip install vl-convert-python") from None
    return vl_convert.javascript_bundle()


def render(context: dict, bundle: str) -> str:
    import jinja2

    environment = jinja2.Environment(loader=jinja2.PackageLoader("headscope", "templates"),
                                     autoescape=True, undefined=jinja2.StrictUndefined)
    environment.filters["number"] = number
    # The bundle goes inside a <script> element: no "</script" may end it early.
    return environment.get_template("report.html.j2").render(**context, vega_bundle=bundle.replace("</script", "<\\/script"))


def finite(value):
    """JSON has no NaN or infinity (JSON.parse refuses them): they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def number(value, digits: int = 4) -> str:
    """A figure for the page: fixed digits, '-' for none."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)
