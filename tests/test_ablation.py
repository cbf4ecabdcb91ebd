"""headscope ablate: the arms, the report's format, K = 0, and bad input."""
import json

import pytest

import headscope
from headscope.experiments.ablation import ablate
from headscope.cli.commands import main

GRID = dict(context_lengths=[260, 300], depths=[0, 100], success_threshold=-1, max_new_tokens=6, quiet=True)


@pytest.fixture(scope="module")
def detected(toy_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("detected")
    result = headscope.detect("retrieval", model=str(toy_dir), out=str(out), haystack=str(data_dir / "haystack"),
                              needles=str(data_dir / "needles.jsonl"), **GRID)
    return result


def run(toy_dir, data_dir, out, scores, *extra):
    return main(["ablate", "retrieval", "--scores", str(scores), "--model", str(toy_dir), "--out", str(out), "--quiet",
                 "--haystack", str(data_dir / "haystack"), "--needles", str(data_dir / "needles.jsonl"),
                 "--context-lengths", "260,300", "--depths", "0,100", "--success-threshold", "-1",
                 "--max-new-tokens", "6", *extra])


def test_report_has_the_three_arms(toy_dir, data_dir, detected, tmp_path, capsys):
    assert run(toy_dir, data_dir, tmp_path, detected.paths["heads"], "--top", "2", "--repeats", "2") == 0
    report = json.loads((tmp_path / f"{toy_dir.name}_retrieval_ablation.json").read_text())
    assert report["none"]["k"] == 0 and report["none"]["heads"] == []
    assert report["top"]["k"] == 2 and len(report["top"]["heads"]) == 2
    top = [key for key, _ in headscope.runs.outputs.ranked(detected.summary)[:2]]
    assert report["top"]["heads"] == top
    random_arm = report["random"]
    assert random_arm["repeats"] == 2 and len(random_arm["heads"]) == 2
    assert all(len(heads) == 2 and not set(heads) & set(top) for heads in random_arm["heads"])
    assert 0 <= random_arm["success_rate"] <= 1 and "success_rate_std" in random_arm
    assert set(report["none"]["cells"]) == {"260-0", "260-100", "300-0", "300-100"}
    assert "random-2" in capsys.readouterr().out
    assert (tmp_path / f"{toy_dir.name}_retrieval_ablation_niah.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_k_zero_reproduces_the_unmasked_run(toy_dir, data_dir, detected, tmp_path):
    report = ablate("retrieval", detected.paths["heads"], [0], model=str(toy_dir), out=str(tmp_path),
                    haystack=str(data_dir / "haystack"), needles=str(data_dir / "needles.jsonl"), **GRID)
    assert report["top"] == report["none"] | {"k": 0}
    assert report["none"]["mean_metric"] == pytest.approx(
        sum(r["score"] for r in detected.samples) / len(detected.samples))


def test_sweep_gives_one_object_per_k_and_a_curve(toy_dir, data_dir, detected, tmp_path):
    assert run(toy_dir, data_dir, tmp_path, detected.paths["heads"], "--top", "1,3", "--repeats", "1") == 0
    report = json.loads((tmp_path / f"{toy_dir.name}_retrieval_ablation.json").read_text())
    assert [point["k"] for point in report["sweep"]] == [1, 3]
    assert all(point["random"]["k"] == point["k"] for point in report["sweep"])
    assert (tmp_path / f"{toy_dir.name}_retrieval_ablation_curve.png").exists()


def test_top_auto_takes_the_heads_above_the_cut(toy_dir, data_dir, tmp_path):
    # a hand-made score file: three heads at or above 0.1, the rest below
    scores = {f"{layer}-{head}": [0.01] for layer in range(3) for head in range(4)}
    scores.update({"1-2": [0.9], "0-3": [0.3, 0.1], "1-0": [0.1]})
    path = tmp_path / "scores.json"
    path.write_text(json.dumps(scores))
    assert run(toy_dir, data_dir, tmp_path, path, "--top", "auto", "--repeats", "1") == 0
    report = json.loads((tmp_path / f"{toy_dir.name}_retrieval_ablation.json").read_text())
    assert report["top"]["heads"] == ["1-2", "0-3", "1-0"]  # best first
    assert report["random"]["k"] == 3
    # other settings into the same folder: refused, as detect refuses, unless --overwrite
    assert run(toy_dir, data_dir, tmp_path, path, "--top", "auto", "--min-score", "0.5", "--random", "0") == 2
    assert run(toy_dir, data_dir, tmp_path, path, "--top", "auto", "--min-score", "0.5", "--random", "0",
               "--overwrite") == 0
    report = json.loads((tmp_path / f"{toy_dir.name}_retrieval_ablation.json").read_text())
    assert report["top"]["heads"] == ["1-2"] and "random" not in report


@pytest.mark.parametrize("case", ["unknown head", "no head above the cut", "k too large", "not a score file", "other model"])
def test_bad_input(case, toy_dir, data_dir, detected, tmp_path, capsys):
    scores = tmp_path / "scores.json"
    top = "2"
    if case == "unknown head":
        scores.write_text(json.dumps({"0-0": [1.0], "99-0": [0.5]}))
        expected = "99-0"
    elif case == "no head above the cut":
        scores.write_text(json.dumps({"0-0": [0.05], "1-1": [0.0]}))
        top, expected = "auto", "no head has a mean score of at least 0.1"
    elif case == "k too large":
        scores = detected.paths["heads"]
        top, expected = "13", "number of heads"
    elif case == "not a score file":
        scores.write_text(json.dumps([[0, 1, 0.5]]))
        expected = "not a heads or summary file"
    else:
        scores.write_text(json.dumps({f"{l}-{h}": [0.1] for l in range(3) for h in range(8)}))
        expected = "another model"
    assert run(toy_dir, data_dir, tmp_path / "out", scores, "--top", top) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_an_interrupted_ablation_resumes_without_losing_or_repeating(toy_dir, data_dir, detected, tmp_path,
                                                                    monkeypatch):
    from headscope.experiments import ablation

    arguments = dict(model=str(toy_dir), haystack=str(data_dir / "haystack"), needles=str(data_dir / "needles.jsonl"),
                     repeats=2, **GRID)
    whole = ablate("retrieval", detected.paths["heads"], [2], out=str(tmp_path / "whole"), **arguments)
    batches, original = [], ablation.run_batch

    def interrupted(*args):
        batches.append(1)
        if len(batches) > 6:  # the 7th sample of 16 (4 arms' runs x 4 samples): mid-arm
            raise KeyboardInterrupt
        yield from original(*args)

    monkeypatch.setattr(ablation, "run_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ablate("retrieval", detected.paths["heads"], [2], out=str(tmp_path / "cut"), **arguments)
    monkeypatch.setattr(ablation, "run_batch", original)
    resumed = ablate("retrieval", detected.paths["heads"], [2], out=str(tmp_path / "cut"), **arguments)
    drop = {"path", "pictures"}
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in whole.items() if k not in drop}
    rows = [json.loads(line) for line in next((tmp_path / "cut").glob("*_ablation_samples.jsonl")).open()]
    keys = [(row["arm"], row["repeat"], row["id"]) for row in rows]
    assert len(keys) == len(set(keys)) == 16  # none (4) + top (4) + random 2 repeats (8), each once


def test_ablate_honours_no_plots_and_refuses_what_it_does_not_use(toy_dir, data_dir, detected, tmp_path, capsys):
    assert run(toy_dir, data_dir, tmp_path, detected.paths["heads"], "--top", "1", "--repeats", "1",
               "--no-plots") == 0
    assert not list(tmp_path.glob("*.png"))
    for flag in (["--scorer", "r2"], ["--shard", "0/2"], ["--append"], ["--save-prompts"]):
        with pytest.raises(SystemExit) as exit_code:  # argparse's one usage line, exit 2
            run(toy_dir, data_dir, tmp_path, detected.paths["heads"], "--top", "1", *flag)
        assert exit_code.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
    with pytest.raises(headscope.HeadscopeError, match="ablate does not use --shard"):
        ablate("retrieval", detected.paths["heads"], [1], shard="0/2", out=str(tmp_path))
