"""Issue 29, a new user's second day: the Python API as fast as the command line, every task's --num-samples
refused beyond its data, one line per argparse mistake, messages that say what is true. On the toy model (conftest)
and the organism."""
import os

import pytest
import torch

import headscope
from headscope import engine
from headscope.cli import main
from toy_runs import detect_args


# ---------------------------------------------------------------------------- 1. the API's threads are the CLI's

def threads_during_runs(monkeypatch) -> list[int]:
    """torch's threads while each run decodes, on a machine made to look like 2 idle cores."""
    seen = []
    run_and_write = engine.run_and_write

    def recording(run, *args):
        seen.append(torch.get_num_threads())
        return run_and_write(run, *args)

    monkeypatch.setattr(engine, "run_and_write", recording)
    monkeypatch.setattr(engine, "TORCH_THREADS", 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    return seen


def test_the_api_picks_the_cli_threads_and_puts_them_back(toy_dir, data_dir, tmp_path, monkeypatch):
    seen = threads_during_runs(monkeypatch)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the caller's own setting, unlike the threads either picks
    try:
        assert main(detect_args(toy_dir, data_dir, tmp_path / "cli")) == 0
        assert torch.get_num_threads() == 1
        headscope.detect("retrieval", model=str(toy_dir), out=str(tmp_path / "api"), haystack=str(data_dir / "haystack"),
                         needles=str(data_dir / "needles.jsonl"), context_lengths=[260], depths=[0, 50, 100],
                         success_threshold=-1, max_new_tokens=24, stop_at_newline=False, quiet=True, plots=False)
        assert torch.get_num_threads() == 1
        headscope.detect("retrieval", model=str(toy_dir), out=str(tmp_path / "api1"),
                         haystack=str(data_dir / "haystack"), needles=str(data_dir / "needles.jsonl"),
                         context_lengths=[260], depths=[0], success_threshold=-1, max_new_tokens=4, quiet=True,
                         plots=False, threads=3)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert seen == [2, 2, 3]  # the CLI's choice, the API's default (the same), the API's threads=3
