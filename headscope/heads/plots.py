"""PNG figures of head scores and of what the heads do (matplotlib, Agg backend: no display needed).

Every figure has a fixed size in inches at DPI dots per inch, so its pixel size is known, and is
written to a temporary file that is renamed over the target: never a half-written PNG.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap, TwoSlopeNorm  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .analysis import LENGTH_AXIS, length_labels, read_samples  # noqa: E402
from ..errors import HeadscopeError, notify  # noqa: E402
from . import HeadScores  # noqa: E402
from .scores import companion  # noqa: E402
from ..runs.outputs import atomic_path, parse_head_key  # noqa: E402

DPI = 100
HEATMAP_SIZE = (8, 6)  # inches: 800 x 600 pixels
NIAH_SIZE = (8, 5)
CURVE_SIZE = (6, 4)
SCATTER_SIZE = (6, 6)
# The red-yellow-green map of the needle-in-a-haystack plots (Kamradt's LLMTest_NeedleInAHaystack).
NIAH_COLORS = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])


def save(figure, path: str | Path, follow: bool = False) -> Path:
    """Write `figure` as a PNG to `path` atomically and close it (follow: a path the user named, written
    through a link; see outputs.atomic_path)."""
    try:
        with atomic_path(path, follow) as temporary:
            figure.savefig(temporary, format="png", dpi=DPI)
    finally:
        plt.close(figure)
    return Path(path)


def heatmap(scores: HeadScores, path, title: str = "", top: int = 10) -> Path:
    """Layer x head map of mean scores; the `top` best heads carry their rank (1 = best) in a white badge.
    Signed scores (the query score) get a diverging map centred on 0; a map with no non-zero head is
    refused (it would look like a result)."""
    means, summary = scores.means, scores.summary
    layers = scores.layers  # a hybrid model's attention layers only, by their real indices
    if not np.any(means):
        raise HeadscopeError("every head's mean is 0 (or has no value): there is no heatmap to draw")
    figure, axes = plt.subplots(figsize=HEATMAP_SIZE)
    signed = means.min() < 0 < means.max()
    norm = TwoSlopeNorm(vcenter=0.0, vmin=means.min(), vmax=means.max()) if signed else None
    image = axes.imshow(means, aspect="auto", cmap="RdBu_r" if signed else "viridis", norm=norm, origin="lower",
                        interpolation="nearest")
    figure.colorbar(image, ax=axes, label="mean score" + (" (0 at the centre)" if signed else ""))
    cut = 0.01 * np.abs(means).max()  # ranks among near-zero heads mean nothing
    for rank, key in enumerate(scores.top(min(top, len(summary))) if top > 0 else [], 1):
        if summary[key]["mean"] <= cut:
            break
        layer, head = parse_head_key(key)
        axes.text(head, layers.index(layer), str(rank), ha="center", va="center", fontsize=8, color="black",
                  fontweight="bold",
                  bbox=dict(boxstyle="circle,pad=0.2", facecolor="white", edgecolor="black", linewidth=0.5))
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # heads and layers are whole numbers
    contiguous = layers == list(range(len(layers)))
    if contiguous:
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    else:  # a hybrid: one row per attention layer, labelled with its real index
        axes.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    axes.set(xlabel="head", ylabel="layer" if contiguous else "attention layer (the others have no heads)",
             title=title or "mean head score")
    figure.tight_layout()
    return save(figure, path)


def niah_matrix(rows: list[dict]) -> tuple[np.ndarray, list, list]:
    """(depths, lengths) grid of the mean metric score (0-100) over the needles at each cell; NaN where no
    sample ran. Samples whose needle could not be located (`error`) measured nothing and are left out."""
    cells = [r for r in rows if r.get("error") is None and "context_length" in r and "depth_percent" in r]
    if not cells:
        raise HeadscopeError("no retrieval samples with context_length and depth_percent to draw a NIAH grid from")
    lengths = sorted({r["context_length"] for r in cells})
    depths = sorted({r["depth_percent"] for r in cells})
    total = np.zeros((len(depths), len(lengths)))
    count = np.zeros_like(total)
    for r in cells:
        index = depths.index(r["depth_percent"]), lengths.index(r["context_length"])
        total[index] += float(r["score"])
        count[index] += 1
    return np.divide(total, count, out=np.full_like(total, np.nan), where=count > 0), lengths, depths


def _draw_niah(axes, rows, title):
    scores, lengths, depths = niah_matrix(rows)
    image = axes.imshow(scores, aspect="auto", cmap=NIAH_COLORS, vmin=0, vmax=100, interpolation="nearest")
    axes.set_xticks(range(len(lengths)), length_labels(rows, lengths), rotation=45, fontsize=9)
    axes.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=9)
    axes.set(xlabel=LENGTH_AXIS, ylabel="needle depth (%)", title=title)
    return image



def niah_grid(rows: list[dict], path, title: str = "needle in a haystack") -> Path:
    """The needle-in-a-haystack grid: x = context length, y = depth %, colour = mean score (0-100)."""
    figure, axes = plt.subplots(figsize=NIAH_SIZE)
    figure.colorbar(_draw_niah(axes, rows, title), ax=axes, label="score")
    figure.tight_layout()
    return save(figure, path)


NIAH_COLUMNS = 3  # arms per row of the ablation's NIAH pictures: each panel a third of a page, whatever the K count


def niah_grids_side_by_side(arms: dict[str, list[dict]], path) -> Path:
    """One NIAH grid per ablation arm ({name: samples rows}), sharing one colour scale: small multiples that wrap
    after NIAH_COLUMNS panels (a sweep of 5 K values is 11 arms), so the picture stays readable at page width."""
    if not arms:
        raise HeadscopeError("no arms to draw")
    columns = min(len(arms), NIAH_COLUMNS)
    rows = -(-len(arms) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(NIAH_SIZE[0] * columns * 0.6, NIAH_SIZE[1] * rows),
                                squeeze=False, sharey=True, layout="constrained")
    panels = list(axes.flat)
    for index, (ax, (name, rows_of_arm)) in enumerate(zip(panels, arms.items())):
        image = _draw_niah(ax, rows_of_arm, name)
        if index % columns:  # one depth axis per row: labels do not run into the next panel
            ax.set_ylabel("")
            ax.tick_params(labelleft=False)
    for ax in panels[len(arms):]:  # the last row's empty places
        ax.set_visible(False)
    figure.colorbar(image, ax=panels[:len(arms)], label="score")
    return save(figure, path)


def ablation_curve(sweep: list[dict], path, title: str = "success rate as the top-K heads (or K random heads) "
                                                             "are masked") -> Path:
    """Success rate against the number of ablated heads K: the top heads against random heads
    (mean +- std over repeats). `sweep` is [{"k", "top", "random", "random_std"}, ...]."""
    needed = {"k", "top", "random", "random_std"}
    if not sweep or not all(isinstance(point, dict) and needed <= set(point) for point in sweep):
        raise HeadscopeError(f"an ablation sweep is a non-empty list of objects with {', '.join(sorted(needed))}")
    sweep = sorted(sweep, key=lambda point: point["k"])
    ks = [point["k"] for point in sweep]
    figure, axes = plt.subplots(figsize=CURVE_SIZE)
    axes.plot(ks, [point["top"] for point in sweep], "o-", color="#d62728", label="top-K heads ablated")
    axes.errorbar(ks, [point["random"] for point in sweep], yerr=[point["random_std"] for point in sweep],
                  fmt="s--", color="#7f7f7f", capsize=3, label="random K heads ablated")
    axes.set(xlabel="heads ablated (K)", ylabel="success rate", title=title)
    axes.legend()
    figure.tight_layout()
    return save(figure, path)


def rescore_stability(curves: dict[str, list[tuple[float, float]]], path, title: str) -> Path:
    """Top-K Jaccard against the run's own head set, per success threshold, one line per metric. Lines that
    coincide are drawn apart (markers) and said so in the legend; the threshold axis shows the thresholds
    themselves (one threshold alone would get matplotlib's offset ticks, -0.04 ... 0.04)."""
    figure, axes = plt.subplots(figsize=CURVE_SIZE)
    styles = ["o-", "s--", "^-.", "D:", "v-", "P--", "X-.", "*:", "h-"]
    drawn: dict[tuple, str] = {}
    for index, (metric, points) in enumerate(curves.items()):
        points = sorted(points)
        label = metric if points else f"{metric}: no sample passes at any threshold"
        if points and tuple(points) in drawn:
            label += f" (the same as {drawn[tuple(points)]})"
        drawn.setdefault(tuple(points), metric)
        axes.plot([t for t, _ in points], [j for _, j in points], styles[index % len(styles)], label=label,
                  markersize=max(9 - index, 3), linewidth=max(2.5 - 0.3 * index, 0.8))
    thresholds = sorted({t for points in curves.values() for t, _ in points})
    if thresholds:
        axes.set_xticks(thresholds, [f"{t:g}" for t in thresholds])
        axes.set_xlim(thresholds[0] - 5, thresholds[-1] + 5)
    axes.set(xlabel="success threshold (metric > threshold)", ylabel="top-10 Jaccard with the run's heads",
             ylim=(-0.02, 1.05))
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return save(figure, path)


def specificity_matrix(report: dict, path) -> Path:
    """Rows: score files; columns: tasks; colour: the drop in success (points) when the file's top-K heads are
    masked; each cell also gives the random arm's drop."""
    files, tasks = report["files"], report["tasks"]
    drops = np.array([[100 * (report["matrix"][f][t]["none"] - report["matrix"][f][t]["top"]) for t in tasks]
                      for f in files])
    figure, axes = plt.subplots(figsize=(4.5 + 2.2 * len(tasks), 1.6 + 0.9 * len(files)))
    image = axes.imshow(drops, cmap="Reds", vmin=0, vmax=100, aspect="auto")
    for i, f in enumerate(files):
        for j, t in enumerate(tasks):
            cell = report["matrix"][f][t]
            random_drop = 100 * (cell["none"] - cell["random"])
            axes.text(j, i, f"top: {change(-drops[i, j])}\nrandom: {change(-random_drop)}", ha="center",
                      va="center", fontsize=10, color="white" if drops[i, j] > 60 else "black")
    axes.set_xticks(range(len(tasks)), [f"{t} task" for t in tasks])
    names = [f"{Path(f).parent.name}/{Path(f).name}".removesuffix("_heads.json") for f in files]
    axes.set_yticks(range(len(files)), [f"top-{report['k']} of {name}" for name in names], fontsize=8)
    axes.set_title(f"change in success (points) when heads are masked ({report['mode']})", fontsize=10)
    figure.colorbar(image, ax=axes, label="drop, top heads masked (points)")
    figure.tight_layout()
    return save(figure, path)


def change(points: float) -> str:
    """A change in success, in whole points: "-12", "+3", "0" (never "-0" or "--3")."""
    value = round(points)
    return f"{value:+d}" if value else "0"


def scatter(a: HeadScores, b: HeadScores, path, labels=("A", "B"), annotate: int = 5, follow: bool = False) -> Path:
    """Each head's mean score in A against B, with the diagonal and the best `annotate` heads of each named."""
    a_summary, b_summary = a.summary, b.summary
    if set(a_summary) != set(b_summary):
        raise HeadscopeError("the two score files score different heads")
    a.refuse_partial_grid()
    keys = a.keys
    x = np.array([a_summary[k]["mean"] for k in keys])
    y = np.array([b_summary[k]["mean"] for k in keys])
    figure, axes = plt.subplots(figsize=SCATTER_SIZE)
    axes.scatter(x, y, s=10, alpha=0.6)
    high = max(x.max(), y.max(), 1e-12)
    low = min(x.min(), y.min(), 0.0)
    axes.plot([low, high], [low, high], ":", color="grey", linewidth=1)
    named = set(a.top(min(annotate, len(keys)))) | set(b.top(min(annotate, len(keys))))
    for index, key in enumerate(sorted(named, key=lambda k: (-(a_summary[k]["mean"] + b_summary[k]["mean"]), k))):
        # ties by name: the picture must not depend on the set's (hash-seeded) order
        offset = [(4, 4), (4, -10), (-24, 4), (-24, -10)][index % 4]  # neighbours' labels go different ways
        axes.annotate(key, (a_summary[key]["mean"], b_summary[key]["mean"]), xytext=offset,
                      textcoords="offset points", fontsize=7)
    axes.set(xlabel=f"{labels[0]} mean score", ylabel=f"{labels[1]} mean score", title=f"{labels[0]} vs {labels[1]}")
    figure.tight_layout()
    return save(figure, path, follow)


def plot_run(heads_path, top: int = 10) -> list[Path]:
    """The figures of one run, next to its heads (or summary) file: NAME_TASK_heatmap.png, and for a
    retrieval run with its samples file, NAME_TASK_niah.png. Returns the paths written."""
    heads_path = Path(heads_path)
    scores = HeadScores.load(heads_path)
    summary = scores.summary
    name = companion(heads_path, "heatmap").name.removesuffix("_heatmap.png")
    written = []
    if any(stats["mean"] for stats in summary.values()):  # before the grid is checked, as heatmap checks it
        written.append(heatmap(scores, companion(heads_path, "heatmap"), title=f"{name}: mean head score", top=top))
    elif not scores.valued:  # no passing sample has a score
        notify(f"{name}: no head has a value (no passing sample has a score), no heatmap drawn")
    else:  # a flat map would look like a result
        notify(f"{name}: every head's mean is 0, no heatmap drawn")
    samples = companion(heads_path, "samples")
    if samples.exists():
        rows = read_samples(samples)
        # Only when some needle was located: a figure of nothing would help no one (and must not fail `detect`).
        if any(row.get("task") == "retrieval" and "depth_percent" in row and row.get("error") is None for row in rows):
            written.append(niah_grid(rows, companion(heads_path, "niah"), title=f"{name}: needle in a haystack"))
    return written
