"""headscope kv: the curve's points, its file, table, picture and report section, resume, and bad input."""
import json

import pytest

import headscope
from headscope.experiments import kv_curve as curve_module
from headscope.cli.commands import main
from headscope.heads import HeadScores
from headscope.experiments.kv_curve import kv_curve

GRID = dict(context_lengths=[260, 300], depths=[0, 100], success_threshold=-1, max_new_tokens=6, quiet=True)
KV_HEADS = 6  # the toy model: 3 layers x 2 KV heads (4 query heads each)


@pytest.fixture(scope="module")
def detected(toy_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("detected")
    return headscope.detect("retrieval", model=str(toy_dir), out=str(out), haystack=str(data_dir / "haystack"),
                            needles=str(data_dir / "needles.jsonl"), **GRID)


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    """A heads file for the toy model with distinct positive scores (its detected retrieval scores are all 0, and
    HeadKV's budgets need scores to share the pool by)."""
    path = tmp_path_factory.mktemp("scores") / "toy_heads.json"
    path.write_text(json.dumps({f"{l}-{h}": [0.05 + ((7 * l + 3 * h) % 12) / 12] for l in range(3) for h in range(4)}))
    return path


def arguments(toy_dir, data_dir, **extra):
    return dict(model=str(toy_dir), haystack=str(data_dir / "haystack"), needles=str(data_dir / "needles.jsonl"),
                check=False, **GRID) | extra


def cli(toy_dir, data_dir, out, scores, *extra):
    return main(["kv", "retrieval", "--scores", str(scores), "--model", str(toy_dir), "--out", str(out), "--quiet",
                 "--haystack", str(data_dir / "haystack"), "--needles", str(data_dir / "needles.jsonl"),
                 "--context-lengths", "260,300", "--depths", "0,100", "--success-threshold", "-1",
                 "--max-new-tokens", "6", *extra])


def log_rows(folder):
    return [json.loads(line) for line in next(folder.glob("*_kv_samples.jsonl")).open()]


def test_every_head_full_and_budgets_covering_the_prompt_equal_the_unmasked_run(toy_dir, data_dir, detected,
                                                                                  scores, tmp_path):
    kv_curve("retrieval", scores, out=str(tmp_path), budgets=[KV_HEADS], sink=2, recent=8,
             **arguments(toy_dir, data_dir))
    report = kv_curve("retrieval", scores, out=str(tmp_path), policy="headkv,snapkv", budgets=[400], sink=2,
                      recent=8, **arguments(toy_dir, data_dir, plots=False))  # the curve's shared settings
    unmasked = {row["id"]: row["response"] for row in detected.samples}
    rows = log_rows(tmp_path)
    for arm in ("full", f"duo-{KV_HEADS}", "headkv-400", "snapkv-400"):
        assert {row["id"]: row["response"] for row in rows if row["arm"] == arm} == unmasked, arm
        assert {row["kv_kept"] for row in rows if row["arm"] == arm} == {1.0}
    # the streaming baseline at duo-6's memory keeps the whole prompt too; no random arm can be drawn at K = 6
    assert [(p["policy"], p["budget"]) for p in report["points"]] == [
        ("duo", KV_HEADS), ("streaming", KV_HEADS), ("headkv", 400), ("snapkv", 400)]
    assert all(p["kv_kept"] == 1.0 and p["success_rate"] == report["full"]["success_rate"] for p in report["points"])


def test_the_curve_its_file_table_picture_and_report_section(toy_dir, data_dir, detected, scores, tmp_path, capsys):
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(detected.paths["heads"].parent, folder)  # the report shows the kv file of the run's folder
    assert cli(toy_dir, data_dir, folder, scores, "--budgets", "0,2", "--sink", "2",
               "--recent", "16", "--repeats", "2", "--no-check") == 0
    printed = capsys.readouterr().out
    report = json.loads(next(folder.glob("*_kv.json")).read_text())
    points = {(p["policy"], p["budget"]): p for p in report["points"]}
    assert list(points) == [("duo", 0), ("duo", 2), ("random", 2), ("streaming", 0), ("streaming", 2)]
    top = points[("duo", 2)]["full_heads"]
    kv_scores = headscope.heads.analysis.kv_head_scores(HeadScores.load(scores).means, 2)
    best = sorted(((l, g) for l in range(3) for g in range(2)), key=lambda lg: -kv_scores[lg])[:2]
    assert top == [f"{l}-{g}" for l, g in sorted(best)]  # export --to duo's two best KV heads
    drawn = points[("random", 2)]
    assert drawn["repeats"] == 2 and all(len(heads) == 2 and not set(heads) & set(top) for heads in drawn["full_heads"])
    assert drawn["kv_kept"] == points[("duo", 2)]["kv_kept"]  # the same memory, other heads
    assert abs(points[("streaming", 2)]["kv_kept"] - points[("duo", 2)]["kv_kept"]) < 0.01
    assert points[("duo", 0)]["kv_kept"] < points[("duo", 2)]["kv_kept"] < 1 == report["full"]["kv_kept"]
    assert set(report["full"]["cells"]) == {"260-0", "260-100", "300-0", "300-100"}
    assert "streaming" in printed and "KV kept" in printed and "± std" in printed
    assert next(folder.glob("*_kv.png")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a later run with the same shared settings adds its points to the same curve
    assert cli(toy_dir, data_dir, folder, scores, "--policy", "headkv,snapkv",
               "--budgets", "8", "--sink", "2", "--recent", "16", "--no-check", "--no-plots") == 0
    report = json.loads(next(folder.glob("*_kv.json")).read_text())
    assert [(p["policy"], p["budget"]) for p in report["points"]][-2:] == [("headkv", 8), ("snapkv", 8)]
    assert len(report["points"]) == 7
    from headscope.cli.report import report as write_report

    page = write_report(folder, bootstrap=0)[0].read_text()
    assert '<section id="kv">' in page and "snapkv" in page and "share of the KV cache kept" in page


def test_an_interrupted_curve_resumes_without_losing_or_repeating(toy_dir, data_dir, scores, tmp_path, monkeypatch):
    settings = dict(budgets=[1], sink=2, recent=8, repeats=2, plots=False)
    whole = kv_curve("retrieval", scores, out=str(tmp_path / "whole"),
                     **arguments(toy_dir, data_dir, **settings))
    batches, original = [], curve_module.run_batch

    def interrupted(*args):
        batches.append(1)
        if len(batches) > 9:  # mid-point: 5 points' runs x 4 samples in all
            raise KeyboardInterrupt
        yield from original(*args)

    monkeypatch.setattr(curve_module, "run_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        kv_curve("retrieval", scores, out=str(tmp_path / "cut"), **arguments(toy_dir, data_dir,
                                                                                            **settings))
    monkeypatch.setattr(curve_module, "run_batch", original)
    resumed = kv_curve("retrieval", scores, out=str(tmp_path / "cut"),
                       **arguments(toy_dir, data_dir, **settings))
    assert {k: v for k, v in resumed.items() if k != "path"} == {k: v for k, v in whole.items() if k != "path"}
    keys = [(row["arm"], row["repeat"], row["id"]) for row in log_rows(tmp_path / "cut")]
    assert len(keys) == len(set(keys)) == 20  # full, duo-1, random-1 x 2 draws, streaming-1: 4 samples each
    with pytest.raises(headscope.HeadscopeError, match="holds a run with other settings"):
        kv_curve("retrieval", scores, out=str(tmp_path / "cut"),
                 **arguments(toy_dir, data_dir, **settings | {"recent": 9}))


def test_batches_give_the_rows_batch_size_one_gives(toy_dir, data_dir, scores, tmp_path):
    settings = dict(policy="streaming", budgets=[1], sink=2, recent=8, plots=False)  # a window per prompt length
    one = kv_curve("retrieval", scores, out=str(tmp_path / "one"), **arguments(toy_dir, data_dir,
                                                                                             **settings))
    four = kv_curve("retrieval", scores, out=str(tmp_path / "four"),
                    **arguments(toy_dir, data_dir, batch_size=4, **settings))
    assert one["points"] == four["points"]
    responses = [{(r["arm"], r["id"]): (r["response"], r["kv_kept"]) for r in log_rows(tmp_path / name)}
                 for name in ("one", "four")]
    assert responses[0] == responses[1]


@pytest.mark.parametrize("case", ["mixed families", "budgets and threshold", "even kernel", "k too large",
                                  "other model", "negative scores", "unknown policy", "no budgets",
                                  "ratios without kvpress", "ratio of 1", "headkv at a ratio", "ratios and budgets"])
def test_bad_input_is_one_line_and_writes_nothing(case, toy_dir, data_dir, scores, tmp_path, capsys):
    extra = []
    if case == "mixed families":
        extra, expected = ["--policy", "duo,headkv", "--budgets", "2"], "each family in its own command"
    elif case == "budgets and threshold":
        extra, expected = ["--budgets", "2", "--threshold", "0.1"], "exactly one of --budgets"
    elif case == "even kernel":
        extra, expected = ["--policy", "snapkv", "--budgets", "8", "--kernel", "4"], "--kernel must be odd"
    elif case == "k too large":
        extra, expected = ["--budgets", "7"], "number of KV heads (6)"
    elif case == "other model":
        scores = tmp_path / "scores.json"
        scores.write_text(json.dumps({f"{l}-{h}": [0.1] for l in range(3) for h in range(8)}))
        extra, expected = ["--budgets", "2"], "another model"
    elif case == "negative scores":
        scores = tmp_path / "scores.json"
        scores.write_text(json.dumps({f"{l}-{h}": [-0.1] for l in range(3) for h in range(4)}))
        extra, expected = ["--policy", "headkv", "--budgets", "8"], "non-negative scores"
    elif case == "unknown policy":
        extra, expected = ["--policy", "duo,pyramid", "--budgets", "2"], "pyramid"
    elif case == "ratios without kvpress":
        extra, expected = ["--ratios", "0.5"], "give --convention kvpress"
    elif case == "ratio of 1":
        extra, expected = ["--convention", "kvpress", "--ratios", "0.5,1"], "1.0 is not a compression ratio"
    elif case == "headkv at a ratio":
        extra, expected = ["--convention", "kvpress", "--policy", "headkv", "--ratios", "0.5"], "no HeadKV press"
    elif case == "ratios and budgets":
        extra, expected = ["--convention", "kvpress", "--ratios", "0.5", "--budgets", "2"], "cannot be combined"
    else:
        expected = "exactly one of --budgets"
    assert cli(toy_dir, data_dir, tmp_path / "out", scores, "--no-check", *extra) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_kvpress_convention_at_ratio_0_is_the_full_cache_and_its_settings_are_the_curves(toy_dir, data_dir,
                                                                                           detected, scores, tmp_path):
    """kvpress's presses at ratio 0 keep everything: every policy gives the unmasked run's responses, sample for
    sample, and keeps the whole cache. The convention and SnapKVPress's defaults are the curve's settings (and so in
    its id: headscope's convention in the same folder is another curve)."""
    report = kv_curve("retrieval", scores, out=str(tmp_path), convention="kvpress", ratios=[0.0],
                      policy="duo,random,streaming,snapkv", sink=2, recent=8, **arguments(toy_dir, data_dir))
    unmasked = {row["id"]: row["response"] for row in detected.samples}
    assert [(p["policy"], p["budget"]) for p in report["points"]] == [("duo", 0.0), ("streaming", 0.0),
                                                                      ("snapkv", 0.0)]  # no random at K = all
    for arm in ("full", "duo-0.0", "streaming-0.0", "snapkv-0.0"):
        assert {row["id"]: row["response"] for row in log_rows(tmp_path) if row["arm"] == arm} == unmasked, arm
    assert all(p["kv_kept"] == 1.0 for p in report["points"])
    assert report["settings"] | {"kv_heads": None} == {
        "convention": "kvpress", "sink": 2, "recent": 8, "window": 64, "kernel": 5, "pooling": "avg",
        "selection": "kv-head", "beta": 1.2, "temperature": 1.0, "kv_heads": None}
    with pytest.raises(headscope.HeadscopeError, match="holds a run with other settings"):
        kv_curve("retrieval", scores, out=str(tmp_path), budgets=[1], sink=2, recent=8,
                 **arguments(toy_dir, data_dir, plots=False))


def test_the_context_is_the_prompt_before_its_question(toy_dir, data_dir, scores, tmp_path):
    """Retrieval's context ends where "Based on the content of the book, Question: ..." begins; a context cut
    there compresses the haystack alone, and a smaller ratio keeps more of it."""
    from headscope.detection.engine import all_items, start_run, task_options

    options = task_options("retrieval", None, **arguments(toy_dir, data_dir, out=str(tmp_path)))
    run = start_run("retrieval", options, None, command="kv")
    items = all_items(run)
    contexts = curve_module.context_lengths(run, items)
    tokenizer = run.loaded.tokenizer
    for _, sample, prompt in items:
        cut = contexts[sample.id]
        question = sample.prompt[sample.question_char:]
        assert question.startswith("\nBased on the content of the book")
        assert prompt.input_ids[cut:] == tokenizer(question, add_special_tokens=False)["input_ids"]
        assert prompt.input_ids[:cut] == tokenizer(sample.prompt[:sample.question_char])["input_ids"]
    report = kv_curve("retrieval", scores, out=str(tmp_path), convention="kvpress", ratios=[0.25, 0.75],
                      policy="snapkv", **arguments(toy_dir, data_dir, plots=False))
    kept = [p["kv_kept"] for p in report["points"]]
    assert 0 < kept[1] < kept[0] < 1


def test_reasoning_marks_where_its_question_starts(toy_dir):
    from transformers import AutoTokenizer

    from headscope.tasks.reasoning import PROMPT_MIDDLE, build_reasoning_samples

    tokenizer = AutoTokenizer.from_pretrained(toy_dir)
    record = {"id": "r", "context": "the red fish is gold .", "question": "what is the fish ?", "answer": "gold"}
    sample = build_reasoning_samples(tokenizer, [record])[0]
    assert sample.prompt[:sample.question_char].endswith(record["context"])
    assert sample.prompt[sample.question_char:].startswith(PROMPT_MIDDLE + record["question"])


@pytest.mark.parametrize("budget", [8, 0.0, 0.5, 0.25, 1e-05])
def test_an_arms_name_reads_back_as_its_policy_and_budget(budget):
    point = curve_module.Point("snapkv", budget, 0, None, lambda: None)
    assert curve_module.parse_arm(point.arm) == ("snapkv", budget)
