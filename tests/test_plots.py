"""Every figure is a valid PNG of the expected pixel size, written whole; bad input is one clear error."""
import json
from pathlib import Path

import matplotlib.image
import pytest

from headscope.heads import plots
from headscope.cli.commands import main
from headscope.errors import HeadscopeError
from headscope.heads import HeadScores
from headscope.runs.outputs import summarize

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def pixels(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width = matplotlib.image.imread(path).shape[:2]
    return width, height


def size(inches):
    return round(inches[0] * plots.DPI), round(inches[1] * plots.DPI)


def scores(layers=3, heads=4):
    return HeadScores.from_summary(summarize({f"{l}-{h}": [float(l * heads + h)] for l in range(layers)
                                              for h in range(heads)}))


def niah_rows(task="retrieval"):
    return [{"id": str(i), "task": task, "context_length": length, "depth_percent": depth,
             "score": float((length + depth) % 101), "passed": True, "error": None}
            for i, (length, depth) in enumerate((l, d) for l in (100, 200, 400) for d in (0, 50, 100))]


def test_heatmap(tmp_path):
    path = plots.heatmap(scores(), tmp_path / "h.png", "title", top=3)
    assert pixels(path) == size(plots.HEATMAP_SIZE)
    assert [p.name for p in tmp_path.iterdir()] == ["h.png"]  # no temporary file left behind


def test_niah_grid_and_arms(tmp_path):
    rows = niah_rows() + [{**niah_rows()[0], "error": "could not locate", "score": 0.0}]  # not measured: left out
    scores, lengths, depths = plots.niah_matrix(rows)
    assert lengths == [100, 200, 400] and depths == [0, 50, 100]
    assert scores[1, 2] == (400 + 50) % 101
    assert pixels(plots.niah_grid(rows, tmp_path / "n.png")) == size(plots.NIAH_SIZE)
    arms = {"full": rows, "top-10 ablated": rows, "random-10 ablated": rows}
    width, height = size(plots.NIAH_SIZE)
    assert pixels(plots.niah_grids_side_by_side(arms, tmp_path / "arms.png")) == (round(width * 3 * 0.6), height)
    sweep = {"none": rows} | {f"{arm}-{k}": rows for k in (1, 2, 4, 8, 16) for arm in ("top", "random")}  # 11 arms
    assert pixels(plots.niah_grids_side_by_side(sweep, tmp_path / "sweep.png")) == (round(width * 3 * 0.6),
                                                                                     height * 4)  # 3 a row
    with pytest.raises(HeadscopeError, match="no retrieval samples"):
        plots.niah_grid([{"id": "q", "task": "reasoning", "score": 1.0}], tmp_path / "bad.png")


def test_ablation_curve_and_scatter(tmp_path):
    sweep = [{"k": k, "top": 1 - k / 40, "random": 0.95, "random_std": 0.02} for k in (0, 5, 10, 20)]
    assert pixels(plots.ablation_curve(sweep, tmp_path / "a.png")) == size(plots.CURVE_SIZE)
    with pytest.raises(HeadscopeError, match="random_std"):
        plots.ablation_curve([{"k": 1, "top": 0.5}], tmp_path / "bad.png")
    assert pixels(plots.scatter(scores(), scores(), tmp_path / "s.png", ("a", "b"))) == size(plots.SCATTER_SIZE)
    with pytest.raises(HeadscopeError, match="different heads"):
        plots.scatter(scores(), scores(2, 4), tmp_path / "bad.png")


def test_plot_run_draws_the_niah_grid_for_retrieval_only(tmp_path, capsys):
    for task in ("retrieval", "reasoning"):
        heads = {f"{l}-{h}": [0.1 * (l + h)] for l in range(2) for h in range(2)}
        (tmp_path / f"m_{task}_heads.json").write_text(json.dumps(heads))
        (tmp_path / f"m_{task}_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in niah_rows(task)))
    written = plots.plot_run(tmp_path / "m_retrieval_heads.json")
    assert [p.name for p in written] == ["m_retrieval_heatmap.png", "m_retrieval_niah.png"]
    assert main(["plot", str(tmp_path / "m_reasoning_heads.json")]) == 0
    assert "m_reasoning_heatmap.png" in capsys.readouterr().out
    assert not (tmp_path / "m_reasoning_niah.png").exists()
    assert pixels(tmp_path / "m_reasoning_heatmap.png") == size(plots.HEATMAP_SIZE)


def test_plot_refuses_a_broken_grid(tmp_path, capsys):
    (tmp_path / "m_heads.json").write_text(json.dumps({"0-0": [1.0], "0-1": [0.5], "99-0": [0.2]}))
    assert main(["plot", str(tmp_path / "m_heads.json")]) == 2
    assert "full layers x heads grid" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_the_scatter_does_not_depend_on_the_hash_seed(tmp_path):
    """Heads tied in the two files' summed means are annotated in one order whatever Python's hash seed (the
    annotated set used to be sorted by score alone, so tied labels went to different corners from run to run)."""
    import os
    import subprocess
    import sys

    draw = ("import sys; from headscope.heads import HeadScores, plots; from headscope.runs.outputs import summarize\n"
            "tied = HeadScores.from_summary(summarize({f'{l}-{h}': [float(h % 2)] for l in range(3) for h in range(4)}))\n"
            "plots.scatter(tied, tied, sys.argv[1], ('a', 'b'))")
    pictures = []
    for seed in ("1", "2", "3"):
        path = tmp_path / f"scatter_{seed}.png"
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        subprocess.run([sys.executable, "-c", draw, str(path)], check=True, env=env)
        pictures.append(path.read_bytes())
    assert pictures[0] == pictures[1] == pictures[2]
