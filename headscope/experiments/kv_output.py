"""What `headscope kv` shows: the console table, the picture (success against the share of the KV cache kept --
the model's own cache, KV heads x entries, for every policy -- one line per policy) and the rows of its section
in `headscope report`, all from NAME_TASK_kv.json."""
from __future__ import annotations

from pathlib import Path


# What a point's budget counts, per policy (kv_curve.py's table of policies).
UNITS = {"duo": "K full", "random": "K full", "streaming": "as K full", "headkv": "B", "snapkv": "B"}
STYLES = {"duo": ("o-", "#d62728"), "random": ("s--", "#7f7f7f"), "streaming": ("^:", "#1f77b4"),
          "headkv": ("D-", "#2ca02c"), "snapkv": ("v:", "#9467bd")}


def rows(report: dict) -> list[dict]:
    """One row per point, the full cache first: policy, budget, unit, kv_kept, success (± std, draws), metric."""
    table = []
    for point in [report["full"], *report["points"]]:
        unit = "ratio" if isinstance(point["budget"], float) else UNITS.get(point["policy"], "")  # kvpress's ratios
        table.append({"policy": point["policy"], "budget": point["budget"], "unit": unit,
                      "kv_kept": point["kv_kept"], "success": point["success_rate"],
                      "std": point.get("success_rate_std"), "draws": point.get("repeats"),
                      "metric": point["mean_metric"]})
    return table


def format_table(report: dict) -> str:
    lines = [f"{'policy':<10} {'budget':>10} {'KV kept':>8} {'success':>8} {'± std':>7} {'metric':>7}"]
    for row in rows(report):
        budget = "-" if row["budget"] is None else f"{row['budget']} {row['unit'].split()[-1]}"
        std = f"{row['std']:.3f}" if row["std"] is not None else ""
        kept = f"{row['kv_kept']:.3f}" if row["kv_kept"] is not None else "-"
        lines.append(f"{row['policy']:<10} {budget:>10} {kept:>8} {row['success']:>8.3f} {std:>7} "
                     f"{row['metric']:>7.1f}")
    lines.append("KV kept: the share of the model's KV cache (KV heads x prompt entries) kept, for every policy")
    return "\n".join(lines)


def draw(report: dict, path) -> Path:
    """Success rate against the share of the KV cache kept: one line per policy and kind of budget (K or B, or
    kvpress's ratios: hollow markers; random: mean ± std over the draws), the full cache a star at share 1."""
    from ..heads.plots import CURVE_SIZE, plt, save

    figure, axes = plt.subplots(figsize=CURVE_SIZE)
    for policy, (style, color) in STYLES.items():
        for by_ratio in (False, True):
            points = sorted((p for p in report["points"] if p["policy"] == policy and p["kv_kept"] is not None
                             and isinstance(p["budget"], float) == by_ratio), key=lambda p: p["kv_kept"])
            if points:
                axes.errorbar([p["kv_kept"] for p in points], [p["success_rate"] for p in points],
                              yerr=[p.get("success_rate_std", 0.0) for p in points], fmt=style, color=color,
                              capsize=3, mfc="none" if by_ratio else color,
                              label=f"{policy} ({'ratio' if by_ratio else UNITS[policy]})")
    axes.plot([1.0], [report["full"]["success_rate"]], "*", color="black", markersize=12, label="full cache")
    convention = report["settings"].get("convention", "headscope")
    widest = max([1.0] + [point["kv_kept"] for point in report["points"] if point.get("kv_kept")])  # query-head
    # selection keeps a KV head's entries once per query head: a share can pass 1, and stays on the picture
    axes.set(xlabel="share of the KV cache kept (KV heads × entries)", ylabel="success rate", xlim=(0, 1.03 * widest),
             ylim=(-0.03, 1.03), title=f"{report['task']}: success as the KV cache shrinks ({convention})")
    axes.legend(fontsize="small")
    figure.tight_layout()
    return save(figure, path)


def section(report: dict) -> dict:
    """The report's kv section from NAME_TASK_kv.json's content: the settings and the table's rows (a malformed
    file fails here, and report.companion names it)."""
    return {"samples": report["samples"], "settings": dict(report["settings"]), "rows": rows(report)}
