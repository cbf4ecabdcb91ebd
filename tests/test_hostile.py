"""Issue 32: inputs that do not fit, outputs that would overwrite inputs, numbers that are not numbers.

Every case is a command and its whole outcome: exit 2, one `headscope: error:` line (or argparse's one error line
naming the flag), and every file under the test's folder as it was. The numeric flags are enumerated from the
parsers themselves, so a flag added later is fed the same hostile values without a change here."""
import argparse
import json
import shutil
from pathlib import Path

import pytest

from headscope.cli import commands as cli, analysis_commands as cli_analysis
from headscope import validate
from headscope.cli.commands import main
from test_faults import refused, snapshot, split_into_shards
from toy_runs import PREFIX

HOSTILE = ["nan", "inf", "-inf", "0", "-1", "1e20", "1" + "0" * 20]


def subparsers(parser: argparse.ArgumentParser) -> dict:
    action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    return {} if action is None else action.choices


def command_parsers():
    """(the words that name the command, its parser) for every command and task: `detect retrieval`, `show`, ..."""
    for command in [*cli.COMMANDS, *cli_analysis.COMMANDS]:
        parser = subparsers(cli.build_parser(command))[command]
        tasks = subparsers(parser)
        if not tasks:
            yield [command], parser
        for task, task_parser in tasks.items():
            yield [command, task], task_parser


def takes_numbers(action: argparse.Action) -> bool:
    """A flag whose value is a number or a list of numbers (its type parses "1" to one)."""
    if not action.option_strings or action.type is None or action.choices:
        return False
    try:
        value = action.type("1")
    except (argparse.ArgumentTypeError, ValueError, TypeError, Exception):
        return False
    return bool(validate.numbers_in(value))


def required_filler(parser: argparse.ArgumentParser) -> list[str]:
    """Placeholder values of the parser's required arguments, so that parsing reaches the flag under test."""
    filler = []
    for action in parser._actions:
        if not action.option_strings and not isinstance(action, argparse._SubParsersAction):
            filler.append("x")
        elif action.required:
            value = action.choices[0] if action.choices else "1" if takes_numbers(action) else "x"
            filler += [action.option_strings[0], value]
    return filler


def numeric_flags():
    return [(words, action.option_strings[0], parser) for words, parser in command_parsers()
            for action in parser._actions if takes_numbers(action)]


def test_the_enumeration_finds_the_numeric_flags_of_every_command():
    found = {(" ".join(words), flag) for words, flag, _ in numeric_flags()}
    for expected in [("detect retrieval", "--threads"), ("detect retrieval", "--depths"), ("detect reasoning",
                     "--generated-weight"), ("kv retrieval", "--temperature"), ("kv retrieval", "--budgets"),
                     ("export", "--budget"), ("export", "--threshold"), ("show", "--bootstrap"),
                     ("check", "--prompt-tokens"), ("specificity", "--top"), ("rescore", "--threshold"),
                     ("ablate retrieval", "--min-score"), ("compare", "--top"), ("report", "--k")]:
        assert expected in found
    assert len(found) > 60


@pytest.mark.parametrize("value", HOSTILE)
def test_every_numeric_flag_refuses_what_is_not_a_number_it_can_take_in_one_line(value, capsys):
    """NaN, the infinities, 1e20 (a float, or an integer past int64's use) and values below a flag's minimum: argparse's
    one error line naming the flag, exit 2, before anything runs. A value the parser takes is a finite number within
    headscope's limits (the command's own checks then run: see the end-to-end cases below)."""
    for words, flag, parser in numeric_flags():
        try:
            args, _ = parser.parse_known_args([*required_filler(parser), f"{flag}={value}"])  # "-inf" as a value
        except SystemExit as stop:
            assert stop.code == 2, (words, flag, value)
            lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
            assert len(lines) == 1 and f"argument {flag}" in lines[0], (words, flag, value, lines)
            continue
        parsed = next(getattr(args, action.dest) for action in parser._actions if flag in action.option_strings)
        assert validate.value_problem(parsed) is None, (words, flag, value, parsed)
        assert value not in ("nan", "inf", "-inf", "1e20", "1" + "0" * 20), (words, flag, value)


# ------------------------------------------------------------------------------------- the model-free commands

def analysis_argv(words, flag, value, folder: Path, tmp: Path) -> list[str]:
    """The command with its required arguments and the flag under test last."""
    heads = str(folder / f"{PREFIX}_heads.json")
    command = words[0]
    if command == "export":
        duo = ["--to", "duo", "--num-kv-heads", "2"] + ([] if flag in ("--threshold", "--sparsity") else
                                                         ["--sparsity", "0.5"])
        target = duo if flag in ("--threshold", "--sparsity", "--sink-size", "--recent-size", "--num-kv-heads") \
            else ["--to", "headkv"]
        return ["export", heads, *target, "--out", str(exported(tmp, flag)), f"{flag}={value}"]
    if command == "compare":
        return ["compare", heads, heads, "--plot", str(tmp / "scatter.png"), f"{flag}={value}"]
    if command == "report":
        return ["report", str(folder), "--bootstrap", "5", "--out", str(tmp / "page.html"), f"{flag}={value}"]
    return [command, heads, f"{flag}={value}"]


def exported(tmp: Path, flag: str) -> Path:
    return tmp / f"exported{flag}"


@pytest.mark.parametrize("value", HOSTILE)
def test_the_analysis_commands_take_every_hostile_number_as_a_refusal_or_a_correct_run(value, run_folder, tmp_path,
                                                                                       capsys):
    """show, compare, plot, export and report run end to end: exit 0, or exit 2 with one line and the run's files
    as they were; never a traceback, a NaN written, or a negative budget."""
    flags = [(words, flag) for words, flag, _ in numeric_flags() if words[0] in cli_analysis.COMMANDS]
    for words, flag in flags:
        argv = analysis_argv(words, flag, value, run_folder, tmp_path)
        before = snapshot(run_folder)
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert code in (0, 2), (argv, code)
        after = snapshot(run_folder)
        assert after == before if code == 2 else {name: after[name] for name in before} == before, argv
        if code == 2:
            assert len(err) == 1, (argv, err)
        if code == 0 and flag in ("--budget", "--beta", "--temperature"):  # HeadKV's budgets: never negative
            assert all(budget >= 1 for budget in json.loads(exported(tmp_path, flag).read_text()).values()), argv


# ------------------------------------------------------------------------------------- merge checks first

def shard_rows(tmp: Path, index: int) -> Path:
    return tmp / "shards" / f"{PREFIX}_samples.shard-{index}-of-2.jsonl"


def edit_shard_rows(tmp: Path, index: int, change) -> None:
    path = shard_rows(tmp, index)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    change(rows)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def edit_shard_manifests(tmp: Path, change, indexes=(0, 1)) -> None:
    for index in indexes:
        path = tmp / "shards" / f"{PREFIX}_manifest.shard-{index}-of-2.json"
        path.write_text(json.dumps(change(json.loads(path.read_text()))))


def fewer_head_scores(tmp):
    edit_shard_rows(tmp, 1, lambda rows: [layer.pop() for layer in rows[0]["head_scores"]])


def huge_scores(tmp):
    edit_shard_rows(tmp, 0, lambda rows: rows[0]["head_scores"][0].__setitem__(0, 1e308))


def one_id_at_two_indexes(tmp):
    edit_shard_rows(tmp, 0, lambda rows: rows[1].__setitem__("id", rows[0]["id"]))  # indexes 0 and 2


def grid_edited_smaller(tmp):
    """Shard 0 lost its sample at index 2 and both manifests say the grid is 2: covered, but not the grid the
    run's --depths 0,50,100 make."""
    edit_shard_rows(tmp, 0, lambda rows: rows.pop())
    edit_shard_manifests(tmp, lambda m: dict(m, runs={r: dict(v, grid_size=2) for r, v in m["runs"].items()}))


def a_row_of_another_task(tmp):
    edit_shard_rows(tmp, 1, lambda rows: rows[0].__setitem__("task", "reasoning"))


def a_manifest_of_another_task(tmp):
    edit_shard_manifests(tmp, lambda m: dict(m, task="reasoning"), indexes=(1,))


def a_pass_its_score_contradicts(tmp):
    edit_shard_rows(tmp, 0, lambda rows: rows[0].__setitem__("passed", False))


MERGE_CASES = {
    "a row with fewer head scores than the model's heads": (fewer_head_scores, "has 9 head scores, and the run's "
                                                                               "manifest lists 12 heads"),
    "head scores of 1e308": (huge_scores, "1e+308 is too large"),
    "one id at two indexes": (one_id_at_two_indexes, "is at indexes 0 and 2"),
    "grid_size edited smaller in both manifests": (grid_edited_smaller, "grid_size 2 is smaller than the 3 samples"),
    "a row of another task": (a_row_of_another_task, "is a row of task 'reasoning'"),
    "a manifest of another task": (a_manifest_of_another_task, "shard 1's manifest is of task 'reasoning'"),
    "passed: false with a passing score": (a_pass_its_score_contradicts, "says passed: false, but its score"),
}


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merge_checks_everything_before_writing_anything(case, run_folder, tmp_path, capsys):
    corrupt, expected = MERGE_CASES[case]
    split_into_shards(run_folder, tmp_path / "shards")
    corrupt(tmp_path)
    capsys.readouterr()
    refused(capsys, ["merge", str(tmp_path / "shards"), "--out", str(tmp_path / "merged")], expected, tmp_path)
    assert not (tmp_path / "merged").exists() or not any((tmp_path / "merged").iterdir())


def test_a_merge_refused_for_its_head_scores_is_not_stuck_once_the_shard_is_fixed(run_folder, tmp_path, capsys):
    """Finding 5: the refusal wrote nothing, so merging the fixed shard into the same folder is a merge, not
    "already holds a whole run"."""
    split_into_shards(run_folder, tmp_path / "shards")
    good = shard_rows(tmp_path, 1).read_bytes()
    fewer_head_scores(tmp_path)
    refused(capsys, ["merge", str(tmp_path / "shards")], "has 9 head scores", tmp_path)
    shard_rows(tmp_path, 1).write_bytes(good)
    assert main(["merge", str(tmp_path / "shards")]) == 0
    merged = tmp_path / "shards" / f"{PREFIX}_heads.json"
    assert merged.read_bytes() == (run_folder / f"{PREFIX}_heads.json").read_bytes()


# ------------------------------------------------------------------------------------- outputs off the inputs

def heads_of(folder: Path) -> str:
    return str(folder / f"{PREFIX}_heads.json")


def hard_link_to_heads(folder, tmp):
    (tmp / "hard.json").hardlink_to(folder / f"{PREFIX}_heads.json")


def link_to_samples(folder, tmp):
    (tmp / "page.html").symlink_to(folder / f"{PREFIX}_samples.jsonl")


OUTPUT_CASES = {  # name: (setup(folder, tmp), argv(folder, tmp), what the one line must name)
    "report --out the run's samples file": (
        lambda f, t: None,
        lambda f, t: ["report", str(f), "--bootstrap", "0", "--out", str(f / f"{PREFIX}_samples.jsonl")],
        "one of the run's own files"),
    "report --out a link to the run's samples file": (
        link_to_samples, lambda f, t: ["report", str(f), "--bootstrap", "0", "--out", str(t / "page.html")],
        f"is {PREFIX}_samples.jsonl, one of the run's own files"),
    "export --out its own heads file": (
        lambda f, t: None, lambda f, t: ["export", heads_of(f), "--to", "topk", "--out", heads_of(f)],
        "an input of this command"),
    "export --out a hard link to its heads file": (
        hard_link_to_heads, lambda f, t: ["export", heads_of(f), "--to", "headkv", "--out", str(t / "hard.json")],
        "an input of this command"),
    "compare --plot the run's manifest": (
        lambda f, t: None, lambda f, t: ["compare", heads_of(f), heads_of(f), "--plot",
                                         str(f / f"{PREFIX}_manifest.json")],
        "one of the run's own files"),
    "report --out ''": (lambda f, t: None, lambda f, t: ["report", str(f), "--bootstrap", "0", "--out", ""],
                        "--out is empty"),
    "export --out ''": (lambda f, t: None, lambda f, t: ["export", heads_of(f), "--to", "topk", "--out", ""],
                        "--out is empty"),
}


@pytest.mark.parametrize("case", list(OUTPUT_CASES))
def test_no_output_lands_on_an_input_or_a_run_file(case, run_folder, tmp_path, capsys, monkeypatch):
    setup, argv, expected = OUTPUT_CASES[case]
    monkeypatch.chdir(tmp_path)  # an empty --out would write here
    setup(run_folder, tmp_path)
    capsys.readouterr()
    refused(capsys, argv(run_folder, tmp_path), expected, tmp_path)


def test_detect_refuses_an_empty_out(toy_dir, data_dir, tmp_path, capsys, monkeypatch):
    from toy_runs import detect_args

    monkeypatch.chdir(tmp_path)
    refused(capsys, detect_args(toy_dir, data_dir, ""), "--out is empty", tmp_path)


# ------------------------------------------------------------------------------------- inputs sized first

def reasoning_args(toy_dir, data, out, *extra) -> list[str]:
    return ["detect", "reasoning", "--model", str(toy_dir), "--out", str(out), "--data", str(data),
            "--max-new-tokens", "4", "--quiet", "--no-plots", *extra]


def test_a_prompt_longer_than_the_model_is_refused_before_the_model_loads(toy_dir, tmp_path, capsys,
                                                                               monkeypatch):
    """Finding 1: the check must never run the model on a prompt it cannot take (here 6,000 words on a model of
    4,096 positions); the tokenizer and config tell, so the refusal comes before the weights load, names the
    sample, and nothing is written."""
    from headscope.detection import check, loading

    monkeypatch.setattr(check, "require", lambda *a, **k: pytest.fail("the check ran before the prompt was sized"))
    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("the weights loaded before the prompt was sized"))
    words = " ".join(["the red fish is blue ."] * 1000)
    (tmp_path / "long.json").write_text(json.dumps([{"id": "long", "context": words, "question": "what is red ?",
                                                     "answer": "fish"}]))
    line = refused(capsys, reasoning_args(toy_dir, tmp_path / "long.json", tmp_path / "out"), "sample long: ",
                   tmp_path)
    assert "exceed the model's maximum context of 4096" in line


def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("name, content, flag, expected", [
    ("deep.json", deep_json(100_000), "--data", "nested too deeply"),
    ("deep.jsonl", '{"id": ' + deep_json(100_000) + "}\n", "--data", "line 1 is nested too deeply"),
    ("deep_needles.jsonl", '{"needle": ' + deep_json(100_000) + "}\n", "--needles", "line 1 is nested too deeply"),
])
def test_deeply_nested_json_is_one_line(name, content, flag, expected, toy_dir, data_dir, tmp_path, capsys):
    (tmp_path / name).write_text(content)
    if flag == "--data":
        argv = reasoning_args(toy_dir, tmp_path / name, tmp_path / "out")
    else:
        argv = ["detect", "retrieval", "--model", str(toy_dir), "--out", str(tmp_path / "out"), "--haystack",
                str(data_dir / "haystack"), "--needles", str(tmp_path / name), "--context-lengths", "260", "--quiet"]
    refused(capsys, argv, expected, tmp_path)


@pytest.mark.parametrize("flag", ["--data", "--needles"])
def test_a_device_or_a_pipe_as_data_is_not_a_regular_file(flag, toy_dir, data_dir, tmp_path, capsys):
    """/dev/zero exists: it is "not a regular file", never "not found" (and is never read)."""
    import os

    os.mkfifo(tmp_path / "fifo")
    for path in ("/dev/zero", str(tmp_path / "fifo")):
        argv = reasoning_args(toy_dir, path, tmp_path / "out") if flag == "--data" else \
            ["detect", "retrieval", "--model", str(toy_dir), "--out", str(tmp_path / "out"), "--haystack",
             str(data_dir / "haystack"), "--needles", path, "--context-lengths", "260", "--quiet"]
        refused(capsys, argv, "is not a regular file", tmp_path)


def test_a_data_file_above_the_stated_size_is_refused_before_it_is_read(toy_dir, tmp_path, capsys):
    """Finding 2: a 200 MB one-line --data file was read and tokenized whole (8.76 GB). A sparse file above the
    limit is refused by its size alone."""
    big = tmp_path / "big.json"
    with open(big, "wb") as file:
        file.truncate(validate.LARGEST_DATA_FILE + 1)
    refused(capsys, reasoning_args(toy_dir, big, tmp_path / "out"), "takes at most 64 MB", tmp_path)


def test_a_huge_haystack_file_is_read_only_as_far_as_the_grid_needs(toy_dir, data_dir, tmp_path, monkeypatch):
    """Finding 2: a 1 GB sparse .txt in the haystack folder: only the grid's longest context (x CHARS_PER_TOKEN
    characters) is read, and the run's prompts are those of the haystack's first characters."""
    from headscope.tasks import retrieval

    haystack = tmp_path / "haystack"
    haystack.mkdir()
    text = (data_dir / "haystack" / "a.txt").read_text()
    (haystack / "a.txt").write_text(text)
    with open(haystack / "b.txt", "wb") as file:  # after a.txt: a gigabyte of NUL characters, never needed
        file.truncate(2**30)
    read = retrieval.load_haystack(haystack, 260 * retrieval.CHARS_PER_TOKEN)
    assert read.startswith(text) and len(read) <= 260 * retrieval.CHARS_PER_TOKEN + 1
    assert retrieval.load_haystack(data_dir / "haystack", 10**9) == text  # a small folder is read whole


def test_a_shard_with_no_sample_of_the_grid_exits_0_saying_so_and_merges(toy_dir, data_dir, tmp_path, capsys):
    """Finding 9: --shard 3/4 of a 3-sample grid holds nothing; an array job must not read that as a failure."""
    from toy_runs import detect_args

    for index in range(4):
        assert main(detect_args(toy_dir, data_dir, tmp_path, "--shard", f"{index}/4", "--no-check")) == 0
        out = capsys.readouterr().out
        assert ("holds no sample of this grid" in out) == (index >= 3), (index, out)
    assert main(["merge", str(tmp_path)]) == 0
    rows = (tmp_path / f"{PREFIX}_samples.jsonl").read_text().splitlines()
    assert [json.loads(row)["index"] for row in rows] == [0, 1, 2]


# ------------------------------------------------------------------------------------- what reaches the console

HOSTILE_TEXT = "\x1b]0;PWNED\x07\x1b[2J\u202eevil\nline"


def test_control_and_bidi_characters_of_an_id_reach_no_console_raw(run_folder, capsys):
    """Finding 8: the duplicate-id error quoted the id raw (a terminal title set, the screen cleared)."""
    samples = run_folder / f"{PREFIX}_samples.jsonl"
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    for row in rows[:2]:
        row["id"] = HOSTILE_TEXT
    samples.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["report", str(run_folder), "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "holds sample \\x1b]0;PWNED\\x07\\x1b[2J\\u202eevil line twice" in err
    assert not any(char in err.strip() for char in "\x1b\x07\u202e\n")


def test_a_model_folder_named_with_control_characters_is_printed_escaped(toy_dir, data_dir, tmp_path, capsys):
    """Finding 8: the `wrote` lines named the model folder raw (its name held ESC and a newline)."""
    from toy_runs import detect_args

    model = tmp_path / "toy\x1b[2J\nx"
    shutil.copytree(toy_dir, model)
    assert main(detect_args(model, data_dir, tmp_path / "out", "--no-check")) == 0
    out = capsys.readouterr().out
    assert "toy\\x1b[2J\\nx_retrieval_heads.json" in out and "\x1b" not in out


# ------------------------------------------------------------------------------------- report on many runs

def copies_of_the_run(folder: Path, count: int) -> None:
    """`count` more runs in the folder: the run's samples and manifest under other model names."""
    for index in range(1, count + 1):
        for kind in ("samples.jsonl", "manifest.json"):
            shutil.copy(folder / f"{PREFIX}_{kind}", folder / f"toy{index}_retrieval_{kind}")


def test_report_on_more_runs_than_it_makes_at_once_asks_for_run(run_folder, tmp_path, capsys):
    from headscope.cli import report

    copies_of_the_run(run_folder, report.MOST_PAGES)
    capsys.readouterr()
    refused(capsys, ["report", str(run_folder)], f"holds {report.MOST_PAGES + 1} runs", tmp_path)


def test_report_on_several_runs_shows_its_progress(run_folder, capsys):
    from headscope.cli import report

    copies_of_the_run(run_folder, report.SHOWN_PROGRESS - 1)
    assert main(["report", str(run_folder), "--bootstrap", "0"]) == 0
    err = capsys.readouterr().err
    assert "report: reading runs" in err and "report: writing pages" in err
    assert len(list(run_folder.glob("*_report.html"))) == report.SHOWN_PROGRESS


def test_a_page_made_while_its_run_is_written_says_so(run_folder, capsys):
    """Finding 9: the page of a run in progress said "unfinished", as if it had been killed."""
    import subprocess
    import sys

    manifest = run_folder / f"{PREFIX}_manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(dict(data, finished=None, runs={r: dict(v, finished=None)
                                                                    for r, v in data["runs"].items()})))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from headscope.runs.lock import writer_lock\n"
                               f"with writer_lock({str(run_folder)!r}, {PREFIX!r}):\n print('held', flush=True); "
                               "time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["report", str(run_folder), "--bootstrap", "0"]) == 0
    finally:
        holder.kill()
        holder.wait()
    page = (run_folder / "report.html").read_text()
    assert f"in progress when this page was made (pid {holder.pid})" in page
    assert f"{PREFIX} is being written (pid {holder.pid})" in capsys.readouterr().err
    assert main(["report", str(run_folder), "--bootstrap", "0"]) == 0  # the writer is gone: a run left unfinished
    assert "in progress" not in (run_folder / "report.html").read_text()


# ------------------------------------------------------------------------------------- numbers from files

def uniform_heads(path: Path, score) -> str:
    path.write_text(json.dumps({f"{layer}-{head}": [score] for layer in range(3) for head in range(4)}))
    return str(path)


@pytest.mark.parametrize("score, flags, expected", [
    (0.5, ["--temperature", "1e9"], "--temperature 1e+09: the score shares to that power are all 0"),
    (1e308, [], "1e+308 is too large (at most 1e15 in magnitude)"),
    (0.5, ["--temperature", "nan"], "argument --temperature: nan is not a finite number"),
])
def test_headkv_budgets_are_never_negative(score, flags, expected, tmp_path, capsys):
    """Finding 4: a temperature that underflows every share, or scores of 1e308, gave every head a budget of
    -9223372036854775785 with exit 0."""
    heads = uniform_heads(tmp_path / "heads.json", score)
    before = snapshot(tmp_path)
    try:
        code = main(["export", heads, "--to", "headkv", "--budget", "128", "--out", str(tmp_path / "b.json"), *flags])
    except SystemExit as stop:
        code = stop.code
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert snapshot(tmp_path) == before


def numeric_fields():
    """(options class, field) for every number (or list of numbers) an options dataclass takes."""
    from dataclasses import fields

    from headscope.experiments.ablation import AblationSettings
    from headscope.experiments.kv_curve import KVSettings
    from headscope.tasks import TASKS

    classes = {task.options for task in TASKS.values()} | {AblationSettings, KVSettings}
    return sorted({(cls, spec.name) for cls in classes for spec in fields(cls)
                   if any(kind in str(spec.type) for kind in ("int", "float")) and "help" in spec.metadata},
                  key=lambda pair: (pair[0].__name__, pair[1]))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 10**20, 1e20])
def test_the_python_api_refuses_the_same_numbers(value):
    """An options object built in Python is checked by the same validator as the flags (options.validate)."""
    from dataclasses import fields

    from headscope.errors import HeadscopeError
    from headscope.options import validate as validate_options

    checked = 0
    for cls, name in numeric_fields():
        spec = next(spec for spec in fields(cls) if spec.name == name)
        given = [value] if "list" in str(spec.type) else value
        if "int" in str(spec.type) and isinstance(value, float) and "float" not in str(spec.type):
            continue  # a float where an int is wanted: argparse's int() refuses it; Python callers get a TypeError
        required = {other.name: "x" for other in fields(cls) if other.metadata.get("required") and other.name != name}
        with pytest.raises(HeadscopeError, match=spec.metadata.get("flag", "--" + name.replace("_", "-"))):
            validate_options(cls(**required, **{name: given}))
        checked += 1
    assert checked >= 10


def test_a_loaded_model_sizes_every_prompt_before_the_check(toy_dir, tmp_path, monkeypatch):
    """With the model already loaded (the Python API), the prompts are sized before the check runs on any."""
    from headscope.detection import check, engine, loading
    from headscope.errors import HeadscopeError

    loaded = loading.load(str(toy_dir))
    monkeypatch.setattr(check, "require", lambda *a, **k: pytest.fail("the check ran before the prompt was sized"))
    records = [{"id": f"r{i}", "context": "the red fish is blue .", "question": "what is red ?", "answer": "fish"}
               for i in range(3)] + [{"id": "long", "context": " ".join(["the red fish is blue ."] * 1000),
                                      "question": "what is red ?", "answer": "fish"}]
    (tmp_path / "data.json").write_text(json.dumps(records))
    with pytest.raises(HeadscopeError, match="sample long: .* exceed the model's maximum context"):
        engine.detect("reasoning", loaded=loaded, data=str(tmp_path / "data.json"), out=str(tmp_path / "out"),
                      max_new_tokens=4, quiet=True)
    assert not (tmp_path / "out").exists()
