"""The CLI end to end on a small model: the files it writes, merging, and every bad input."""
import json

import pytest
import transformers

from headscope.cli.commands import main


def detect(task, toy_dir, data_dir, out, *extra):
    data = (["--haystack", str(data_dir / "haystack"), "--needles", str(data_dir / "needles.jsonl"),
             "--context-lengths", "260", "--depths", "0,100"] if task == "retrieval"
            else ["--data", str(data_dir / "reasoning.json")])
    return main(["detect", task, "--model", str(toy_dir), "--out", str(out), "--quiet", "--max-new-tokens", "4",
                 *data, *extra])


@pytest.mark.parametrize("task", ["retrieval", "reasoning"])
def test_detect_writes_the_four_files(task, toy_dir, data_dir, tmp_path, capsys):
    assert detect(task, toy_dir, data_dir, tmp_path, "--success-threshold", "-1", "--save-prompts") == 0
    name = toy_dir.name
    heads = json.loads((tmp_path / f"{name}_{task}_heads.json").read_text())
    summary = json.loads((tmp_path / f"{name}_{task}_summary.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / f"{name}_{task}_samples.jsonl").read_text().splitlines()]
    manifest = json.loads((tmp_path / f"{name}_{task}_manifest.json").read_text())
    assert sorted(heads) == sorted(f"{l}-{h}" for l in range(3) for h in range(4))
    assert set(summary["0-0"]) == {"mean", "std", "count", "max"}
    expected_samples = 2 if task == "retrieval" else 4
    assert len(rows) == expected_samples
    for row in rows:
        assert {"id", "task", "prompt_tokens", "span", "response", "score", "passed", "error", "duration_s",
                "prompt"} <= set(row)
        assert row["passed"] and row["error"] is None
    if task == "retrieval":
        assert all(len(scores) == expected_samples for scores in heads.values())  # zeros are kept
        assert {row["depth_percent"] for row in rows} == {0, 100}
        assert all(row["context_length"] == 260 for row in rows)
    assert manifest["attention"] == "headscope+sdpa" and manifest["task"] == task
    assert manifest["versions"]["transformers"] == transformers.__version__
    assert "layer head" in capsys.readouterr().out


def test_rerun_resumes_append_pools_only_like_runs_overwrite_replaces(toy_dir, data_dir, tmp_path, capsys):
    path = tmp_path / f"{toy_dir.name}_retrieval_heads.json"
    detect("retrieval", toy_dir, data_dir, tmp_path, "--success-threshold", "-1")  # depths 0 and 100
    first = json.loads(path.read_text())
    detect("retrieval", toy_dir, data_dir, tmp_path, "--success-threshold", "-1")  # same settings: resumes, no-op
    assert json.loads(path.read_text()) == first
    # other settings are refused; --append adds a run that measures the same thing on other samples, nothing else
    assert detect("retrieval", toy_dir, data_dir, tmp_path, "--success-threshold", "-1", "--depths", "50") == 2
    assert "--append" in capsys.readouterr().err
    assert detect("retrieval", toy_dir, data_dir, tmp_path, "--success-threshold", "-2", "--depths", "50",
                  "--append") == 2
    assert "measures something else (--success-threshold is -2.0" in capsys.readouterr().err
    assert detect("retrieval", toy_dir, data_dir, tmp_path, "--success-threshold", "-1", "--depths", "0,50",
                  "--append") == 2
    assert "sample n0-L260-d0 is already in" in capsys.readouterr().err
    assert detect("retrieval", toy_dir, data_dir, tmp_path, "--success-threshold", "-1", "--depths", "50",
                  "--append") == 0
    pooled = json.loads(path.read_text())
    assert all(pooled[key][:2] == first[key] and len(pooled[key]) == 3 for key in first)  # one more sample each
    files = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir() if p.is_file()}
    capsys.readouterr()
    # Re-running either finished run, with or without --append (a retry script, a SLURM requeue), reports it
    # complete, exits 0 and rewrites nothing.
    for depths, extra in (("50", ["--append"]), ("50", []), ("0,100", []), ("0,100", ["--append"])):
        assert detect("retrieval", toy_dir, data_dir, tmp_path, "--success-threshold", "-1", "--depths", depths,
                      *extra) == 0
        assert "already complete" in capsys.readouterr().err
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir() if p.is_file()} == files
    manifest = json.loads((tmp_path / f"{toy_dir.name}_retrieval_manifest.json").read_text())
    assert sorted(run["options"]["depths"] for run in manifest["runs"].values()) == [[0.0, 100.0], [50.0]]
    detect("retrieval", toy_dir, data_dir, tmp_path, "--success-threshold", "-1", "--overwrite")
    assert json.loads(path.read_text()) == first


def test_success_filter_drops_failed_samples(toy_dir, data_dir, tmp_path):
    """A random model never answers: with the default threshold nothing passes and the lists stay empty."""
    detect("retrieval", toy_dir, data_dir, tmp_path)
    heads = json.loads((tmp_path / f"{toy_dir.name}_retrieval_heads.json").read_text())
    assert all(scores == [] for scores in heads.values())
    rows = (tmp_path / f"{toy_dir.name}_retrieval_samples.jsonl").read_text().splitlines()
    assert len(rows) == 2 and not any(json.loads(r)["passed"] for r in rows)


def write(path, text):
    path.write_text(text)
    return path


BAD_INPUTS = {
    "missing needles": (["--needles", "{tmp}/nope.jsonl"], "retrieval", "nope.jsonl"),
    "malformed needles": (["--needles", "{tmp}/bad.jsonl"], "retrieval", "line 2"),
    "missing data": (["--data", "{tmp}/nope.json"], "reasoning", "nope.json"),
    "malformed data": (["--data", "{tmp}/broken.json"], "reasoning", "broken.json"),
    "missing field": (["--data", "{tmp}/nofield.json"], "reasoning", "answer"),
    "empty context": (["--data", "{tmp}/empty.json"], "reasoning", "context"),
    "unknown model": (["--model", "{tmp}/no-such-model"], "retrieval", "no such model folder"),
    "not a causal LM": (["--model", "{tmp}/resnet"], "retrieval", "not a causal language model"),
    "context too long": (["--context-lengths", "5000"], "retrieval", "maximum"),
    "bad metric": (["--metric", "meteor"], "retrieval", "invalid choice"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_no_file(case, toy_dir, data_dir, tmp_path, capsys):
    write(tmp_path / "bad.jsonl", '{"needle": "a b .", "question": "q ?", "real_needle": "b"}\n{"needle": \n')
    write(tmp_path / "broken.json", '[{"id": 1, "context": ')
    write(tmp_path / "nofield.json", json.dumps([{"id": "a", "context": "c", "question": "q"}]))
    write(tmp_path / "empty.json", json.dumps([{"id": "a", "context": "", "question": "q", "answer": "x"}]))
    transformers.ResNetConfig().save_pretrained(tmp_path / "resnet")
    flags, task, expected = BAD_INPUTS[case]
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    out = tmp_path / "out"
    model = [] if "--model" in flags else ["--model", str(toy_dir)]
    data = {"retrieval": ["--haystack", str(data_dir / "haystack"), "--needles", str(data_dir / "needles.jsonl"),
                          "--context-lengths", "260", "--depths", "50"],
            "reasoning": ["--data", str(data_dir / "reasoning.json")]}[task]
    with pytest.raises(SystemExit) if case == "bad metric" else _no_raise():
        code = main(["detect", task, *model, *data, "--out", str(out), "--quiet", *flags])
        assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 or case == "bad metric", err
    assert expected in err
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_output_piped_into_head_stops_quietly(tmp_path):
    import subprocess
    import sys

    scores = tmp_path / "big_heads.json"  # a table larger than a pipe's buffer
    scores.write_text(json.dumps({f"{layer}-{head}": [layer + head / 100] for layer in range(64) for head in range(64)}))
    result = subprocess.run(f"{sys.executable} -m headscope show {scores} --top 5000 | head -n 1", shell=True,
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["layer", "head", "mean", "std", "count"]
    assert result.stderr == ""
