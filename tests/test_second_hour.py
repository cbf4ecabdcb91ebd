"""Issue 23, a new user's second hour: runs never pooled by accident, empty results said plainly, refusals before
the work, links written through where the user named them, threads and help. On the toy model (conftest)."""
import functools
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import headscope
from headscope.detection import engine, loading
from headscope.heads import plots
from headscope.experiments.ablation import ablate
from headscope.cli.commands import main
from headscope.experiments.rescore import draw
from toy_runs import PREFIX, detect_args


def reasoning(toy_dir, data_dir, out, *extra):
    return ["detect", "reasoning", "--model", str(toy_dir), "--out", str(out),
            "--data", str(data_dir / "reasoning.json"), "--success-threshold", "-1", "--max-new-tokens", "4", "--quiet", "--no-plots", *extra]


def one_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("headscope: error: ") and "\n" not in err, err
    return err


def no_model_load(monkeypatch):
    """The refusals below come before any weights load: loading them fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(loading, "load", refuse)


# ---------------------------------------------------------------------------- 1. runs never pooled by accident

def test_append_refuses_a_run_that_measures_something_else(toy_dir, data_dir, tmp_path, capsys):
    assert main(reasoning(toy_dir, data_dir, tmp_path)) == 0
    err = one_error(capsys, reasoning(toy_dir, data_dir, tmp_path, "--exclude-current-token", "--append"))
    assert "measures something else (--exclude-current-token is True in one and False in the other)" in err
    heads = json.loads((tmp_path / "toy0_reasoning_heads.json").read_text())
    assert all(len(scores) <= 4 for scores in heads.values())  # 4 questions, each counted once at most


@pytest.mark.parametrize("command", [["report"], ["rescore", "--metric", "f1", "--threshold", "50", "--no-plots"]])
def test_a_folder_pooling_unlike_runs_is_refused_by_its_readers(run_folder, command, capsys):
    """A folder written before --append checked what it pooled: report and rescore refuse it."""
    manifest = run_folder / f"{PREFIX}_manifest.json"
    data = json.loads(manifest.read_text())
    [(run_id, record)] = data["runs"].items()
    other = dict(record, options=dict(record["options"], max_new_tokens=50))
    manifest.write_text(json.dumps(dict(data, runs={run_id: record, "0123456789ab": other})))
    err = one_error(capsys, [command[0], str(run_folder), *command[1:]])
    assert "which measure different things (--max-new-tokens is 24 in one and 50 in the other)" in err
    assert not (run_folder / "rescore").exists() and not (run_folder / "report.html").exists()


# ---------------------------------------------------------------------------- 2. a single-K ablation is reported

def test_report_shows_a_single_k_ablation(run_folder, toy_dir, data_dir):
    ablate("retrieval", str(run_folder / f"{PREFIX}_heads.json"), [2], model=str(toy_dir), out=str(run_folder),
           repeats=1,
           haystack=str(data_dir / "haystack"), needles=str(data_dir / "needles.jsonl"), context_lengths=[260],
           depths=[50], quiet=True, plots=False)
    assert main(["report", str(run_folder), "--bootstrap", "0"]) == 0
    html = (run_folder / "report.html").read_text()
    assert '<section id="ablation">' in html and "<tr><td>2</td>" in html


# ---------------------------------------------------------------------------- 3. links: named ones written through

def test_outputs_the_user_names_are_written_through_links(run_folder, tmp_path, capfd):
    heads = str(run_folder / f"{PREFIX}_heads.json")
    assert main(["export", heads, "--to", "topk", "--top", "2", "--out", "/dev/stdout"]) == 0
    out, err = capfd.readouterr()
    assert len(json.loads(out)) == 2 and "wrote /dev/stdout" in err  # the JSON alone on stdout
    assert os.path.islink("/dev/stdout")  # still the system's link
    for argv, name in ((["export", heads, "--to", "topk", "--out"], "top.json"),
                       (["report", str(run_folder), "--bootstrap", "0", "--out"], "page.html"),
                       (["compare", heads, heads, "--plot"], "scatter.png")):
        target, link = tmp_path / f"target-{name}", tmp_path / f"link-{name}"
        target.write_text("old")
        link.symlink_to(target)
        assert main([*argv, str(link)]) == 0
        assert link.is_symlink() and os.readlink(link) == str(target) and target.read_bytes() != b"old"


def test_a_link_where_headscope_names_the_file_is_refused(run_folder, tmp_path, capsys):
    (tmp_path / "elsewhere.html").write_text("mine")
    (run_folder / "report.html").symlink_to(tmp_path / "elsewhere.html")
    assert "report.html is a symbolic link" in one_error(capsys, ["report", str(run_folder), "--bootstrap", "0"])
    assert (tmp_path / "elsewhere.html").read_text() == "mine"


# ---------------------------------------------------------------------------- 4. no value is not 0

def no_value_file(path, layers=3, heads=4, valued=None):
    """A heads file whose heads have no value except those in `valued` ({key: score})."""
    data = {f"{l}-{h}": [] for l in range(layers) for h in range(heads)}
    for key, score in (valued or {}).items():
        data[key] = [score]
    path.write_text(json.dumps(data))
    return str(path)


def test_show_ranks_heads_with_no_value_last_and_shows_null(tmp_path, capsys):
    path = no_value_file(tmp_path / "m_heads.json", valued={"2-3": -0.5, "0-1": 0.25})
    assert main(["show", path]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert lines[0].split()[:3] == ["0", "1", "0.2500"] and lines[1].split()[:3] == ["2", "3", "-0.5000"]
    assert all(line.split()[2:4] == ["null", "null"] for line in lines[2:])  # below a negative mean, not as 0


def test_bootstrap_shows_a_head_with_no_value_as_a_dash(run_folder, capsys):
    samples = run_folder / f"{PREFIX}_samples.jsonl"
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    for row in rows:
        row["head_scores"][2][3] = None  # no sample gave head 2-3 a value
    samples.write_text("".join(json.dumps(row) + "\n" for row in rows))
    heads = run_folder / f"{PREFIX}_heads.json"
    heads.write_text(json.dumps(dict(json.loads(heads.read_text()), **{"2-3": []})))
    assert main(["show", str(heads), "--bootstrap", "20", "--top", "12"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.split()[:2] == ["2", "3"])
    assert row.split()[2:5] == ["-", "-", "-"]


def test_export_and_ablate_never_take_a_head_with_no_value(tmp_path, toy_dir, data_dir, capsys, monkeypatch):
    path = no_value_file(tmp_path / "m_heads.json", valued={"1-1": 0.5, "0-0": 0.1})
    assert main(["export", path, "--to", "topk"]) == 0  # the default K: the heads with a value
    assert json.loads((tmp_path / "m_topk.json").read_text()) == [[1, 1, 0.5], [0, 0, 0.1]]
    assert "only 2 of the 12 heads have a value" in one_error(capsys, ["export", path, "--to", "topk", "--top", "3"])
    empty = no_value_file(tmp_path / "empty_heads.json")
    no_model_load(monkeypatch)
    err = one_error(capsys, ["ablate", "retrieval", "--model", str(toy_dir), "--scores", empty, "--top", "2",
                             "--out", str(tmp_path / "out")])
    assert "only 0 of the 12 heads have a value" in err and not (tmp_path / "out").exists()
    other = no_value_file(tmp_path / "other_heads.json", layers=2, valued={"0-0": 1.0, "0-1": 1.0})
    err = one_error(capsys, ["ablate", "retrieval", "--model", str(toy_dir), "--scores", other, "--top", "2"])
    assert "scores 2 layers x 4 heads, and the model being run has 3 layers x 4 heads (it lacks head 2-0)" in err


# ---------------------------------------------------------------------------- 5. refusals before the work

def test_refusals_come_before_the_model_loads(run_folder, toy_dir, data_dir, tmp_path, capsys, monkeypatch):
    no_model_load(monkeypatch)
    assert "holds a run with other settings" in one_error(capsys, detect_args(toy_dir, data_dir, run_folder,
                                                                             "--max-new-tokens", "5"))
    heads = str(run_folder / f"{PREFIX}_heads.json")
    err = one_error(capsys, ["specificity", "--model", str(toy_dir), "--scores", heads, "--tasks", "retrieval",
                             "--top", "100", "--out", str(tmp_path / "spec")])
    assert "K = 100 is larger than the number of heads (12)" in err and not (tmp_path / "spec").exists()


def test_a_run_refused_after_the_model_loaded_leaves_no_file(toy_dir, data_dir, tmp_path, capsys):
    """A prompt too long for the model is found once the prompts are built: nothing was written yet."""
    err = one_error(capsys, detect_args(toy_dir, data_dir, tmp_path / "out", "--max-new-tokens", "100000"))
    assert "exceed the model's maximum context" in err and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- 6. flags that conflict

@pytest.mark.parametrize("flags, expected", [
    (["--overwrite", "--append"], "--overwrite and --append cannot be combined"),
    (["--min-length", "100"], "--context-lengths and --min-length cannot be combined"),
    (["--num-depths", "3"], "--depths and --num-depths cannot be combined"),
    (["--success-threshold", "150"], "--success-threshold 150: a sample counts when its metric is above"),
    (["--answer-from", "regex:"], "regex: needs a pattern"),
])
def test_conflicting_or_empty_flags_are_refused(flags, expected, toy_dir, data_dir, tmp_path, capsys, monkeypatch):
    no_model_load(monkeypatch)
    try:
        code = main(detect_args(toy_dir, data_dir, tmp_path / "out", *flags))
    except SystemExit as exit_:  # argparse's own line (a value its type function refuses)
        code = exit_.code
    assert code == 2 and expected in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("task", ["query", "pattern"])
def test_filter_flags_on_a_task_without_a_filter_are_refused(task, toy_dir, tmp_path, capsys, monkeypatch):
    no_model_load(monkeypatch)
    err = one_error(capsys, ["detect", task, "--model", str(toy_dir), "--out", str(tmp_path), "--metric", "f1"])
    assert f"the {task} task has no success filter (every sample counts): --metric does nothing there" in err


def test_the_python_api_refuses_conflicts_too(tmp_path):
    with pytest.raises(headscope.HeadscopeError, match="--context-lengths and --num-lengths cannot be combined"):
        headscope.detect("retrieval", out=str(tmp_path), context_lengths=[300], num_lengths=3)


# ---------------------------------------------------------------------------- 7. paths, advice, empty results

def test_the_manifest_keeps_the_model_path_absolute(toy_dir, data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(toy_dir.parent)
    assert main(detect_args(toy_dir.name, data_dir, tmp_path / "run")) == 0
    manifest = json.loads((tmp_path / "run" / f"{PREFIX}_manifest.json").read_text())
    assert manifest["model_path"] == str(toy_dir)
    monkeypatch.chdir(tmp_path)  # another folder: the manifest's model is still found
    assert main(["show", str(tmp_path / "run" / f"{PREFIX}_heads.json"), "--kv-heads", "max"]) == 0


def test_a_shard_is_told_to_merge_not_to_report(toy_dir, data_dir, tmp_path, capsys):
    assert main(detect_args(toy_dir, data_dir, tmp_path, "--shard", "0/2")) == 0
    out = capsys.readouterr().out
    assert f"when every shard has finished: headscope merge {tmp_path}" in out and "report" not in out


def test_a_tokenizer_error_is_one_whole_sentence(toy_dir, tmp_path, capsys):
    model = tmp_path / "no-tokenizer"
    shutil.copytree(toy_dir, model, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    err = one_error(capsys, ["check", "--model", str(model)])
    assert err.endswith("(3) an equivalent slow tokenizer class to instantiate and convert.")


def test_a_run_where_no_sample_passes_says_so_and_exits_1(toy_dir, data_dir, tmp_path, capsys):
    assert main(detect_args(toy_dir, data_dir, tmp_path, "--success-threshold", "50")) == 1
    out, err = capsys.readouterr()
    assert "0 of 3 samples passed the success filter (rouge1 > 50): no head has a value" in err
    assert "null" not in out and "layer head" not in out  # no table of nulls


# ---------------------------------------------------------------------------- 8. rescores accumulate

def test_a_second_rescore_adds_its_settings(run_folder):
    assert main(["rescore", str(run_folder), "--metric", "f1", "--threshold", "50", "--no-plots"]) == 0
    assert main(["rescore", str(run_folder), "--metric", "contains,f1", "--threshold", "50", "--no-plots"]) == 0
    report = json.loads((run_folder / "rescore" / "rescore.json").read_text())
    settings = report["runs"][PREFIX]["settings"]
    assert [(s["metric"], s["threshold"]) for s in settings] == [("contains", 50), ("f1", 50)]  # f1 redone once


# ---------------------------------------------------------------------------- 9. threads and a fast --help

def test_help_imports_no_torch():
    code = "import sys\nfrom headscope.cli.commands import main\ntry:\n main(['--help'])\nexcept SystemExit:\n pass\n"\
           "print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "False" and "detect" in result.stdout


def test_threads_given_or_the_idle_cores(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert engine.use_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setattr(engine, "TORCH_THREADS", 8)
        monkeypatch.setattr(engine, "idle_cores", functools.lru_cache(maxsize=1)(engine.idle_cores.__wrapped__))
        monkeypatch.setattr(os, "getloadavg", lambda: (5.2, 0.0, 0.0))
        assert engine.use_threads(None) == 3  # 8 cores, 5 kept busy by other work
        monkeypatch.setattr(os, "getloadavg", lambda: (11.0, 0.0, 0.0))
        assert engine.idle_cores.__wrapped__() == 1
        # read once per process: a later run does not count headscope's own threads in the load as other work
        assert engine.use_threads(None) == 3
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------- 10. help and multi-scorer output

def help_of(argv, capsys) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_help_says_what_each_command_does(capsys):
    specificity = help_of(["specificity"], capsys)
    assert "--no-plots do not draw the specificity matrix" in specificity
    assert "decoding budget (default 50 for retrieval, 100 for reasoning)" in specificity
    assert "how heads are masked (default uniform)" in specificity
    assert specificity.count(" data: ") == 1
    assert "--no-plots do not draw the arms' NIAH grids and the ablation curve" in help_of(["ablate", "retrieval"],
                                                                                           capsys)
    assert "retrieval, or module:Class" in help_of(["detect", "retrieval"], capsys)  # the scorers, listed


def test_a_run_of_several_scorers_prints_each_table_and_every_file(toy_dir, data_dir, tmp_path, capsys):
    assert main(detect_args(toy_dir, data_dir, tmp_path, "--scorer", "retrieval,r2")) == 0
    out = capsys.readouterr().out
    assert "retrieval:\nlayer head" in out and "r2:\nlayer head" in out
    for label in ("retrieval", "retrieval_r2"):
        for kind in ("heads.json", "summary.json", "samples.jsonl", "manifest.json"):
            assert f"wrote {tmp_path / f'toy0_{label}_{kind}'}" in out


# ---------------------------------------------------------------------------- 11. cosmetic, said plainly

def test_changes_in_points_never_read_minus_zero():
    assert [plots.change(value) for value in (-12.4, 3.2, -0.2, 0.0)] == ["-12", "+3", "0", "0"]


def test_the_rescore_picture_shows_its_thresholds_and_says_which_lines_coincide(monkeypatch, tmp_path):
    seen = {}

    def keep(figure, path, follow=False):
        axes = figure.axes[0]
        seen.update(ticks=list(axes.get_xticks()), labels=axes.get_legend_handles_labels()[1])
        return path

    monkeypatch.setattr(plots, "save", keep)
    report = {"runs": {"m": {"settings": [
        {"metric": "f1", "threshold": 50, "top_k": [{"k": 10, "jaccard": 1.0}]},
        {"metric": "bleu", "threshold": 50, "top_k": [{"k": 10, "jaccard": 1.0}]}]}}}
    draw(report, tmp_path)
    assert seen["ticks"] == [50] and seen["labels"] == ["f1", "bleu (the same as f1)"]


def test_the_niah_axis_gives_the_setting_and_the_prompts_tokens(run_folder):
    assert main(["report", str(run_folder), "--bootstrap", "0"]) == 0
    html = (run_folder / "report.html").read_text()
    spec = json.loads(html.split('id="report-data">')[1].split("</script>")[0])["charts"]["niah"]
    rows = [json.loads(line) for line in (run_folder / f"{PREFIX}_samples.jsonl").open()]
    tokens = round(np.mean([row["prompt_tokens"] for row in rows]))
    assert {cell["length"] for cell in spec["data"]["values"]} == {f"260 ({tokens})"}
    assert "overflow-wrap: anywhere" in html  # a long unbroken response wraps instead of widening the page


def test_quiet_prints_no_loading_bar(toy_dir, data_dir, tmp_path, capfd):
    headscope.detect("retrieval", model=str(toy_dir), out=str(tmp_path), quiet=True, plots=False,
                     haystack=str(data_dir / "haystack"), needles=str(data_dir / "needles.jsonl"),
                     context_lengths=[260], depths=[50], max_new_tokens=2)
    out, err = capfd.readouterr()
    assert out == "" and "Loading" not in err and "%|" not in err


def test_library_retry_lines_are_silenced():
    from headscope.cli.commands import quiet_libraries

    quiet_libraries()
    assert logging.getLogger("huggingface_hub").getEffectiveLevel() >= logging.ERROR


def test_a_sparsity_quota_filled_with_zero_scores_is_said(tmp_path, capsys):
    path = tmp_path / "m_heads.json"
    path.write_text(json.dumps({f"{l}-{h}": [1.0 if (l, h) == (0, 0) else 0.0] for l in range(2) for h in range(4)}))
    assert main(["export", str(path), "--to", "duo", "--sparsity", "0.5", "--num-kv-heads", "4"]) == 0
    assert "keeps 4 of 8 KV heads, but only 1 score above 0: the other 3 kept are zero-score heads" in\
           capsys.readouterr().err
