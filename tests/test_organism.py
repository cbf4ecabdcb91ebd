"""End to end on the bundled organism, through the CLI: real heads, found with no flags but a small grid."""
import json

import pytest

from headscope.cli import main
from headscope.organism import CHECKPOINT_DIR
from headscope.outputs import ranked

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
