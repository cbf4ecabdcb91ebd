"""Never lose a result: resume after SIGKILL, refuse mixed runs, legacy files, shards, torchrun, batching."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import headscope
from headscope.cli.commands import main
from headscope.runs.outputs import atomic_write_json


def grid(toy_dir, data_dir, out):
    return ["--model", str(toy_dir), "--out", str(out), "--haystack", str(data_dir / "haystack"),
            "--needles", str(data_dir / "needles.jsonl"), "--context-lengths", "260,300,330",
            "--depths", "0,25,50,75,100", "--success-threshold", "-1", "--max-new-tokens", "24",
            "--no-stop-at-newline"]


def files(out, toy_dir, task="retrieval"):
    name = f"{toy_dir.name}_{task}"
    return {kind: (out / f"{name}_{kind}.json").read_bytes() for kind in ("heads", "summary")}


def sample_rows(out, toy_dir, task="retrieval"):
    lines = (out / f"{toy_dir.name}_{task}_samples.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "duration_s"} for line in lines]


@pytest.fixture(scope="module")
def uninterrupted(toy_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    assert main(["detect", "retrieval", *grid(toy_dir, data_dir, out), "--quiet"]) == 0
    return out


def run_and_kill(toy_dir, data_dir, out, kill_after):
    """Start a detection in another process and SIGKILL it once `kill_after` samples are on disk."""
    samples = out / f"{toy_dir.name}_retrieval_samples.jsonl"
    command = [sys.executable, "-m", "headscope", "detect", "retrieval", *grid(toy_dir, data_dir, out), "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if samples.exists() and samples.read_bytes().count(b"\n") >= kill_after:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert 0 < samples.read_bytes().count(b"\n") < 15


def test_sigkill_at_a_random_sample_then_resume_equals_uninterrupted(toy_dir, data_dir, tmp_path, uninterrupted):
    run_and_kill(toy_dir, data_dir, tmp_path, kill_after=random.Random(os.getpid()).randint(1, 12))
    assert main(["detect", "retrieval", *grid(toy_dir, data_dir, tmp_path), "--quiet"]) == 0
    assert files(tmp_path, toy_dir) == files(uninterrupted, toy_dir)
    assert sample_rows(tmp_path, toy_dir) == sample_rows(uninterrupted, toy_dir)


def test_a_line_cut_short_by_a_kill_is_dropped_and_redone(toy_dir, data_dir, tmp_path, uninterrupted):
    samples = tmp_path / f"{toy_dir.name}_retrieval_samples.jsonl"
    lines = (uninterrupted / samples.name).read_text().splitlines(keepends=True)
    samples.write_text("".join(lines[:4]) + lines[4][:37])  # killed while writing line 5
    assert main(["detect", "retrieval", *grid(toy_dir, data_dir, tmp_path), "--quiet"]) == 0
    assert files(tmp_path, toy_dir) == files(uninterrupted, toy_dir)
    assert len(samples.read_text().splitlines()) == 15


def test_legacy_heads_file_is_merged_exactly_once(toy_dir, data_dir, tmp_path, uninterrupted):
    whole = json.loads((uninterrupted / f"{toy_dir.name}_retrieval_heads.json").read_text())
    legacy = {key: [0.25, 0.5] for key in whole}  # an older Retrieval_Head-format file in the folder
    heads = tmp_path / f"{toy_dir.name}_retrieval_heads.json"
    atomic_write_json(heads, legacy)
    run_and_kill(toy_dir, data_dir, tmp_path, kill_after=5)
    assert main(["detect", "retrieval", *grid(toy_dir, data_dir, tmp_path), "--quiet"]) == 0
    assert main(["detect", "retrieval", *grid(toy_dir, data_dir, tmp_path), "--quiet"]) == 0  # and once more
    assert json.loads(heads.read_text()) == {key: legacy[key] + whole[key] for key in whole}


def test_shards_merged_equal_a_single_run(toy_dir, data_dir, tmp_path, uninterrupted):
    for index in range(3):
        assert main(["detect", "retrieval", *grid(toy_dir, data_dir, tmp_path / f"job{index}"), "--quiet",
                     "--shard", f"{index}/3"]) == 0
    assert main(["merge", str(tmp_path / "job0"), str(tmp_path / "job1"), str(tmp_path / "job2"),
                 "--out", str(tmp_path / "merged")]) == 0
    assert files(tmp_path / "merged", toy_dir) == files(uninterrupted, toy_dir)
    assert sample_rows(tmp_path / "merged", toy_dir) == sample_rows(uninterrupted, toy_dir)


def test_merge_refuses_a_missing_shard(toy_dir, data_dir, tmp_path, capsys):
    assert main(["detect", "retrieval", *grid(toy_dir, data_dir, tmp_path), "--quiet", "--shard", "1/2"]) == 0
    assert main(["merge", str(tmp_path)]) == 2
    assert "shard 0 of 2 is missing" in capsys.readouterr().err


def test_torchrun_two_processes_gloo_equal_a_single_run(toy_dir, data_dir, tmp_path, uninterrupted):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
               "-m", "headscope", "detect", "retrieval", *grid(toy_dir, data_dir, tmp_path), "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert files(tmp_path, toy_dir) == files(uninterrupted, toy_dir)
    assert sample_rows(tmp_path, toy_dir) == sample_rows(uninterrupted, toy_dir)


@pytest.mark.parametrize("task", ["retrieval", "reasoning"])
def test_batch_size_4_equals_batch_size_1(task, toy_dir, data_dir, tmp_path):
    options = dict(model=str(toy_dir), success_threshold=-1, quiet=True, max_new_tokens=10, stop_at_newline=False)
    if task == "retrieval":
        options.update(haystack=str(data_dir / "haystack"), needles=str(data_dir / "needles.jsonl"),
                       context_lengths=[260, 300, 330], depths=[0, 50, 100])
    else:
        options.update(data=str(data_dir / "reasoning.json"))
    one = headscope.detect(task, out=str(tmp_path / "one"), batch_size=1, **options)
    four = headscope.detect(task, out=str(tmp_path / "four"), batch_size=4, **options)
    assert [r["response"] for r in one.samples] == [r["response"] for r in four.samples]
    assert one.heads.keys() == four.heads.keys()
    for key in one.heads:
        assert len(one.heads[key]) == len(four.heads[key])
        assert all(abs(a - b) <= 1e-5 for a, b in zip(one.heads[key], four.heads[key])), key
