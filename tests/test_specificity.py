"""headscope specificity: one matrix of (score file x task) ablations, on the organism."""
import json

import headscope
from headscope.cli.commands import main


def test_specificity_matrix_on_the_organism(tmp_path, capsys):
    detected = tmp_path / "detected"
    headscope.detect("retrieval", out=str(detected), quiet=True, context_lengths=[300], depths=[50])
    headscope.detect("reasoning", out=str(detected), quiet=True, num_samples=2)
    files = [str(detected / "organism_retrieval_heads.json"), str(detected / "organism_reasoning_heads.json")]
    out = tmp_path / "spec"
    assert main(["specificity", "--scores", ",".join(files), "--top", "8", "--repeats", "1", "--out", str(out),
                 "--context-lengths", "300", "--depths", "50", "--num-samples", "2", "--quiet"]) == 0
    report = json.loads((out / "organism_specificity.json").read_text())
    assert report["k"] == 8 and report["tasks"] == ["retrieval", "reasoning"] and report["files"] == files
    retrieval_file = report["matrix"][files[0]]
    for task in report["tasks"]:  # nothing masked is one arm per task, shared by the files
        assert report["matrix"][files[0]][task]["none"] == report["matrix"][files[1]][task]["none"]
        assert all(0 <= report["matrix"][f][task][arm] <= 1 for f in files for arm in ("none", "top", "random"))
    # the organism's ground truth: its eight retrieval heads are all of needle retrieval
    assert retrieval_file["retrieval"]["none"] == 1.0 and retrieval_file["retrieval"]["top"] == 0.0
    assert sorted(retrieval_file["retrieval"]["top_heads"]) == [f"1-{h}" for h in range(8)]  # all of layer 1
    assert (out / "organism_specificity.png").read_bytes()[:4] == b"\x89PNG"
    assert "retrieval none/top/random" in capsys.readouterr().out
