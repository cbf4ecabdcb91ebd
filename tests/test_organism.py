"""End to end on the bundled organism, through the CLI: real heads, found with no flags but a small grid."""
import json

import pytest

from headscope.cli.commands import main
from headscope.organism import CHECKPOINT_DIR
from headscope.runs.outputs import ranked

pytestmark = pytest.mark.skipif(not (CHECKPOINT_DIR / "model.safetensors").exists(), reason="no organism checkpoint")


def test_retrieval_finds_a_strong_retrieval_head(tmp_path):
    assert main(["detect", "retrieval", "--out", str(tmp_path), "--quiet", "--no-plots",
                 "--context-lengths", "300,700,1200", "--num-depths", "3"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "organism_retrieval_samples.jsonl").open()]
    assert len(rows) == 3 * 3 * 5 and not any(row["error"] for row in rows)
    assert sum(row["passed"] for row in rows) >= 0.8 * len(rows)
    summary = json.loads((tmp_path / "organism_retrieval_summary.json").read_text())
    best, stats = ranked(summary)[0]
    assert stats["mean"] >= 0.5, (best, stats)


def test_reasoning_scores_are_real_and_reproducible(tmp_path):
    tops = []
    for run in ("a", "b"):
        assert main(["detect", "reasoning", "--out", str(tmp_path / run), "--quiet", "--no-plots",
                     "--num-samples", "10", "--seed", "3"]) == 0
        summary = json.loads((tmp_path / run / "organism_reasoning_summary.json").read_text())
        assert sum(stats["mean"] > 0 for stats in summary.values()) >= 5
        tops.append([key for key, _ in ranked(summary)[:5]])
    assert tops[0] == tops[1]


def test_masking_the_retrieval_heads_breaks_retrieval_and_random_heads_do_not(tmp_path):
    grid = ["--quiet", "--no-plots", "--context-lengths", "300,1200", "--num-depths", "3"]
    assert main(["detect", "retrieval", "--out", str(tmp_path), *grid]) == 0
    assert main(["ablate", "retrieval", "--scores", str(tmp_path / "organism_retrieval_heads.json"), "--top", "auto",
                 "--repeats", "3", "--out", str(tmp_path), *grid]) == 0
    report = json.loads((tmp_path / "organism_retrieval_ablation.json").read_text())
    none, top, random_ = (report[arm]["success_rate"] for arm in ("none", "top", "random"))
    num_heads = len(json.loads((tmp_path / "organism_retrieval_summary.json").read_text()))
    assert report["top"]["k"] <= num_heads // 5  # a small fraction of the heads chosen by the data
    assert none >= 0.9 and top <= none - 0.5 and random_ >= none - 0.1, (none, top, random_)
