"""Issue 22: a run folder is a database. Fault injection on one small detect run (copied per test): one writer,
nothing lost or counted twice, nothing outside the outputs touched, one line for every bad file.

Every refusal is checked the same way: exit 2, one `headscope: error:` line on stderr naming what is wrong, no
traceback, and every byte under the test's folder (inputs, outputs, files outside the run) as it was."""
import ast
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import headscope
from headscope import answers
from headscope.runs import lock
from headscope.cli.commands import main
from headscope.errors import HeadscopeError
from toy_runs import PREFIX, detect_args

def snapshot(root: Path) -> dict:
    """Every file, link and folder under root: bytes, link targets, and which entries exist."""
    found = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            found[name] = ("link", os.readlink(path))
        else:
            found[name] = path.read_bytes() if path.is_file() else "dir"
    return found


def refused(capsys, argv, expected: str, root: Path, notes: int = 0) -> str:
    """Run the CLI and check the refusal: exit 2, one error line naming `expected` (after `notes` note lines),
    nothing changed under root."""
    before = snapshot(root)
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == notes + 1 and all(line.startswith("headscope: note: ") for line in lines[:-1]), lines
    assert lines[-1].startswith("headscope: error: ") and expected in lines[-1], lines
    assert snapshot(root) == before
    return lines[-1]


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_rows(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def edit_first_row(folder: Path, change) -> None:
    samples = folder / f"{PREFIX}_samples.jsonl"
    rows = rows_of(samples)
    change(rows[0])
    write_rows(samples, rows)


def edit_manifest(path: Path, change) -> None:
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(change(manifest)))


def split_into_shards(folder: Path, into: Path, count: int = 2) -> None:
    """The shard files `detect --shard I/N` writes for this run (rows by index mod N, manifests marked)."""
    into.mkdir(parents=True, exist_ok=True)
    rows = rows_of(folder / f"{PREFIX}_samples.jsonl")
    manifest = json.loads((folder / f"{PREFIX}_manifest.json").read_text())
    for index in range(count):
        shard = f"{index}/{count}"
        write_rows(into / f"{PREFIX}_samples.shard-{index}-of-{count}.jsonl",
                   [row for row in rows if row["index"] % count == index])
        runs = {run_folder: dict(record, shard=shard) for run_folder, record in manifest["runs"].items()}
        (into / f"{PREFIX}_manifest.shard-{index}-of-{count}.json").write_text(
            json.dumps(dict(manifest, shard=shard, runs=runs)))


# ------------------------------------------------------------------------------------- the cases

def samples_of(folder):
    return folder / f"{PREFIX}_samples.jsonl"


def not_utf8(folder, tmp):
    samples = samples_of(folder)
    samples.write_bytes(samples.read_bytes().replace(b'"id": "', b'"id": "\xff', 1))


def shards_with(corrupt):
    """A merge case: the run split into shards under tmp/shards, one of them corrupted by `corrupt`."""
    def setup(folder, tmp):
        split_into_shards(folder, tmp / "shards")
        corrupt(tmp / "shards" / f"{PREFIX}_samples.shard-0-of-2.jsonl", tmp / "shards")
    return setup


def bytes_in_shard(path, _):
    path.write_bytes(path.read_bytes().replace(b'"id": "', b'"id": "\xff', 1))


def without(field):
    return lambda folder, tmp: edit_first_row(folder, lambda row: row.pop(field))


def manifest_edit(change):
    return lambda folder, tmp: edit_manifest(folder / f"{PREFIX}_manifest.json", change)


def shard_manifest(change):
    def corrupt(_, shards):
        edit_manifest(shards / f"{PREFIX}_manifest.shard-1-of-2.json", change)
    return shards_with(corrupt)


def samples_line(text):
    def setup(folder, tmp):
        samples = samples_of(folder)
        samples.write_text(samples.read_text() + text + "\n")
    return setup


def pickled_model(folder, tmp):
    """A checkpoint whose pickle would run code: torch's safe loader refuses it (and nothing runs)."""
    class Payload:
        def __reduce__(self):
            return (print, ("the pickle ran",))

    model = tmp / "pickled"
    shutil.copytree(Path(json.loads((folder / f"{PREFIX}_manifest.json").read_text())["model_path"]), model)
    (model / "model.safetensors").unlink()
    torch.save({"weight": Payload()}, model / "pytorch_model.bin")


def truncated_model(folder, tmp):
    model = tmp / "truncated"
    shutil.copytree(Path(json.loads((folder / f"{PREFIX}_manifest.json").read_text())["model_path"]), model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def nan_in_summary(folder, tmp):
    summary = folder / f"{PREFIX}_summary.json"
    summary.write_text(summary.read_text().replace('"mean": ', '"mean": NaN, "was": ', 1))


def infinity_in_heads(folder, tmp):
    heads = folder / f"{PREFIX}_heads.json"
    data = json.loads(heads.read_text())
    data["0-0"][0] = 1e999  # json writes it as Infinity
    heads.write_text(json.dumps(data))


def head_outside_the_model(folder, tmp):
    heads = folder / f"{PREFIX}_heads.json"
    data = json.loads(heads.read_text())
    data["99-0"] = [0.5]
    heads.write_text(json.dumps(data))


def needles_not_utf8(folder, tmp):
    (tmp / "needles.jsonl").write_bytes(b'{"needle": "caf\xe9 .", "question": "q ?", "real_needle": "caf"}\n')


def samples_link_outside(folder, tmp):
    """The samples file is a link to a file outside the folder whose last line is cut: it must not be cut."""
    outside = tmp / "elsewhere.jsonl"
    outside.write_bytes(samples_of(folder).read_bytes() + b'{"run": "cut sho')
    samples_of(folder).unlink()
    samples_of(folder).symlink_to(outside)


def rescore_link_outside(folder, tmp):
    (tmp / "elsewhere").mkdir()
    (folder / "rescore").symlink_to(tmp / "elsewhere")


def whole_run_and_other_shards(folder, tmp):
    """Finding 4: `detect --shard` into a folder that holds a finished whole run (here: other settings)."""
    split_into_shards(folder, folder)
    for path in folder.glob("*.shard-*"):
        path.write_text(path.read_text().replace(json.loads((folder / f"{PREFIX}_manifest.json").read_text())["run"],
                                                 "0123456789ab"))


def mixed_runs(folder, tmp):
    """Finding 5: shard 1 of another run (another id and success_threshold)."""
    split_into_shards(folder, tmp / "shards")
    shard = tmp / "shards" / f"{PREFIX}_samples.shard-1-of-2.jsonl"
    run_folder = rows_of(shard)[0]["run"]
    for path in (shard, tmp / "shards" / f"{PREFIX}_manifest.shard-1-of-2.json"):
        path.write_text(path.read_text().replace(run_folder, "0123456789ab").replace('"success_threshold": -1.0',
                                                                             '"success_threshold": 50.0'))


def duplicate_in_one_shard(path, _):
    path.write_text(path.read_text() + path.read_text().splitlines()[0] + "\n")


def cut_line_in_shard(path, _):
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:40])


def remote_code_model(folder, tmp):
    """A manifest whose model needs custom code: importing it would create tmp/ran."""
    model = tmp / "remote"
    model.mkdir()
    config = {"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}
    (model / "config.json").write_text(json.dumps(config))
    (model / "configuration_evil.py").write_text(f"open({str(tmp / 'ran')!r}, 'w').write('ran')\n")
    edit_manifest(folder / f"{PREFIX}_manifest.json", lambda m: dict(m, model_path=str(model)))


def heads_file(folder):
    return str(folder / f"{PREFIX}_heads.json")


RESCORE = ["--metric", "f1", "--threshold", "50", "--no-plots"]
CASES = {  # name: (setup(folder, tmp), argv(folder, tmp), what the one line must name)
    "non-UTF-8 samples: show --bootstrap": (not_utf8, lambda f, t: ["show", heads_file(f), "--bootstrap", "5"],
                                            "line 1 is not UTF-8 text"),
    "non-UTF-8 samples: report": (not_utf8, lambda f, t: ["report", str(f), "--bootstrap", "0"], "line 1 is not UTF-8"),
    "non-UTF-8 samples: rescore": (not_utf8, lambda f, t: ["rescore", str(f), *RESCORE], "line 1 is not UTF-8"),
    "non-UTF-8 samples: merge": (shards_with(bytes_in_shard), lambda f, t: ["merge", str(t / "shards")],
                                 "line 1 is not UTF-8"),
    "non-UTF-8 samples: detect resume": (not_utf8, lambda f, t: detect_args(t / "toy0", t, f),
                                         "line 1 is not UTF-8"),
    "non-UTF-8 needles": (needles_not_utf8, lambda f, t: detect_args(t / "toy0", t, t / "new"),
                          "needles file"),
    "no passed: report": (without("passed"), lambda f, t: ["report", str(f)], "line 1: field 'passed' is missing"),
    "no passed: rescore": (without("passed"), lambda f, t: ["rescore", str(f), *RESCORE], "'passed' is missing"),
    "no passed: merge": (shards_with(lambda p, _: write_rows(p, [{k: v for k, v in r.items() if k != "passed"}
                                                                 for r in rows_of(p)])),
                         lambda f, t: ["merge", str(t / "shards"), "--out", str(t / "merged")], "'passed' is missing"),
    "no passed: detect resume": (without("passed"), lambda f, t: detect_args(t / "toy0", t, f),
                                 "'passed' is missing"),
    "no error: rescore": (without("error"), lambda f, t: ["rescore", str(f), *RESCORE], "'error' is missing"),
    "no response: rescore": (without("response"), lambda f, t: ["rescore", str(f), *RESCORE], "no 'response' field"),
    "a row that is a list": (samples_line("[1, 2]"), lambda f, t: ["report", str(f)], "line 4: expected a JSON object"),
    "a string in head_scores": (lambda f, t: edit_first_row(f, lambda r: r["head_scores"][0].__setitem__(0, "x")),
                                lambda f, t: ["show", heads_file(f), "--bootstrap", "5"], "field 'head_scores'"),
    "a 5000-digit integer": (lambda f, t: samples_of(f).write_text(samples_of(f).read_text().replace(
                                 '"score": ', '"score": 1' + "0" * 5000 + ', "was": ', 1)),
                             lambda f, t: ["report", str(f)], "too many digits"),
    "a shard row without an integer index": (shards_with(lambda p, _: write_rows(p, [dict(r, index="0")
                                                                                     for r in rows_of(p)])),
                                             lambda f, t: ["merge", str(t / "shards")], "field 'index'"),
    "an excerpt that is not 3 strings": (lambda f, t: edit_first_row(f, lambda r: r.update(excerpt=["a", "b"])),
                                         lambda f, t: ["report", str(f)], "field 'excerpt'"),
    "manifest heads not a list": (manifest_edit(lambda m: dict(m, heads={"0-0": 1})),
                                  lambda f, t: ["rescore", str(f), *RESCORE], "field 'heads'"),
    "manifest options not an object": (manifest_edit(lambda m: dict(m, options=[1])),
                                       lambda f, t: ["rescore", str(f), *RESCORE], "field 'options'"),
    "shard manifest that is []": (shard_manifest(lambda m: []), lambda f, t: ["merge", str(t / "shards")],
                                  "expected a JSON object"),
    "shard manifest without heads": (shard_manifest(lambda m: {k: v for k, v in m.items() if k != "heads"}),
                                     lambda f, t: ["merge", str(t / "shards")], "field 'heads' is missing"),
    "NaN in head_scores: show --bootstrap": (samples_line('{"id": "x", "passed": true, "error": null, "score": 1, '
                                                          '"head_scores": [[NaN]]}'),
                                             lambda f, t: ["show", heads_file(f), "--bootstrap", "5"],
                                             "NaN is not a finite number"),
    "NaN in head_scores: detect resume": (samples_line('{"id": "x", "passed": true, "error": null, "score": 1, '
                                                       '"head_scores": [[NaN]]}'),
                                          lambda f, t: detect_args(t / "toy0", t, f), "line 4: NaN"),
    "NaN in a summary: show": (nan_in_summary, lambda f, t: ["show", str(f / f"{PREFIX}_summary.json")], "NaN"),
    "Infinity in heads: export": (infinity_in_heads, lambda f, t: ["export", heads_file(f), "--to", "topk"],
                                  "Infinity is not a finite number"),
    "a head outside the model: show": (head_outside_the_model, lambda f, t: ["show", heads_file(f)],
                                       "it has head 99-0, which the model does not have"),
    "pickled weights": (pickled_model, lambda f, t: ["check", "--model", str(t / "pickled")], "never unpickles"),
    "truncated safetensors": (truncated_model, lambda f, t: ["check", "--model", str(t / "truncated")],
                              "safetensors file cannot be read"),
    "a full disk": (lambda f, t: None, lambda f, t: ["export", heads_file(f), "--to", "topk", "--out", "/dev/full"],
                    "No space left on device"),
    "report --out a folder": (lambda f, t: (t / "folder").mkdir(),
                              lambda f, t: ["report", str(f), "--out", str(t / "folder")], "is a folder"),
    "samples linked outside: report": (samples_link_outside, lambda f, t: ["report", str(f)], "is a symbolic link"),
    "samples linked outside: rescore": (samples_link_outside, lambda f, t: ["rescore", str(f), *RESCORE],
                                        "is a symbolic link"),
    "samples linked outside: resume": (samples_link_outside, lambda f, t: detect_args(t / "toy0", t, f),
                                       "is a symbolic link"),
    "rescore folder linked outside": (rescore_link_outside, lambda f, t: ["rescore", str(f), *RESCORE],
                                      "rescore is a symbolic link"),
    "merge over a whole run": (whole_run_and_other_shards, lambda f, t: ["merge", str(f)],
                               "already holds a whole run, which merge never replaces"),
    "merge of shards of two runs": (mixed_runs, lambda f, t: ["merge", str(t / "shards")], "shards of different runs"),
    "merge of a duplicate inside one shard": (shards_with(duplicate_in_one_shard),
                                              lambda f, t: ["merge", str(t / "shards")], "twice in shard 0"),
    "merge of a shard with a cut last line": (shards_with(cut_line_in_shard), lambda f, t: ["merge", str(t / "shards")],
                                              "is in no shard (shard 0 of 2 is incomplete", 1),  # the note: it is cut
    "remote code named by a manifest: show --kv-heads": (remote_code_model,
                                                         lambda f, t: ["show", heads_file(f), "--kv-heads", "max"],
                                                         "--trust-remote-code"),
    "remote code as the metric model: rescore": (remote_code_model,
                                                 lambda f, t: ["rescore", str(f), "--metric", "embedding",
                                                               "--metric-model", str(t / "remote"), "--no-plots"],
                                                 "--trust-remote-code"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_fault_is_one_line_exit_2_and_nothing_changed(case, run_folder, tmp_path, toy_dir, data_dir, capsys):
    setup, argv, expected, *notes = CASES[case]
    shutil.copytree(data_dir, tmp_path, dirs_exist_ok=True)  # the data, where the detect cases read it
    shutil.copytree(toy_dir, tmp_path / "toy0")  # the model, beside the run (its manifest's model_path is elsewhere)
    setup(run_folder, tmp_path)
    capsys.readouterr()
    refused(capsys, argv(run_folder, tmp_path), expected, tmp_path, *notes)
    assert not (tmp_path / "ran").exists()  # no remote code ran


def test_a_pathological_answer_pattern_stops_the_run_naming_it_and_leaves_no_file(toy_dir, data_dir, tmp_path,
                                                                                   monkeypatch, capsys):
    """The toy's responses are a few words, too short to make a pattern backtrack for long: the limit is cut to
    nothing here, so the first response meets it (the test below shows a real pattern stopped at the real limit)."""
    monkeypatch.setattr(answers, "REGEX_SECONDS", 1e-9)
    refused(capsys, detect_args(toy_dir, data_dir, tmp_path / "out", "--answer-from", r"regex:(\w|\s)*\d"),
            r"--answer-from regex:(\w|\s)*\d ran for more than", tmp_path)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- one writer

def test_two_concurrent_detects_leave_one_row_per_sample(toy_dir, data_dir, tmp_path):
    """Finding 3: both at once on one --out. One holds the run's lock; the other is refused naming its pid (or,
    if it starts after the first finished, finds the run complete). Every sample is in the file once."""
    command = [sys.executable, "-m", "headscope", *detect_args(toy_dir, data_dir, tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for _ in range(2)]
    results = [(process.wait(timeout=300), process.stderr.read()) for process in processes]
    assert sorted(code for code, _ in results) in ([0, 0], [0, 2]), results
    for code, err in results:
        if code == 2:
            assert "is being written by another headscope process (pid " in err and len(err.strip().splitlines()) == 1
    ids = [row["id"] for row in rows_of(samples_of(tmp_path))]
    assert len(ids) == len(set(ids)) == 3
    assert all(len(scores) == 3 for scores in json.loads((tmp_path / f"{PREFIX}_heads.json").read_text()).values())
    assert not list(tmp_path.glob(".*.lock"))  # released and removed


def test_a_writer_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(run_folder, toy_dir, data_dir, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from headscope.runs.lock import writer_lock\n"
                               f"with writer_lock({str(run_folder)!r}, {PREFIX!r}):\n print('held', flush=True); "
                               "time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        err = refused(capsys, ["rescore", str(run_folder), *RESCORE], f"(pid {holder.pid})", run_folder)
        assert f"for run {PREFIX}" in err
        refused(capsys, detect_args(toy_dir, data_dir, run_folder, "--overwrite"), f"(pid {holder.pid})", run_folder)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    stale = run_folder / f".{PREFIX}.lock"
    assert stale.read_text().strip() == str(holder.pid)  # a killed holder leaves its file behind ...
    assert main(["rescore", str(run_folder), *RESCORE]) == 0  # ... and its lock is simply taken over
    assert not stale.exists()


def test_a_lock_file_removed_by_its_holder_is_not_shared(tmp_path):
    """The race the lock's design closes: a process that locked a file its holder has just removed retries on the
    path's current file, so two writers never hold "the" lock at once."""
    with lock.writer_lock(tmp_path, "run"):
        opened = os.open(tmp_path / ".run.lock", os.O_RDWR)  # a second process's open, before the holder leaves
    assert not lock._still_at(tmp_path / ".run.lock", opened)  # removed: lock._acquire would open the new one
    os.close(opened)
    with lock.writer_lock(tmp_path, "run"):
        with pytest.raises(HeadscopeError, match=f"pid {os.getpid()}"):
            with lock.writer_lock(tmp_path, "run"):
                pass


# ------------------------------------------------------------------------------------- data not lost

def test_merge_of_the_runs_shards_equals_the_run_and_merging_again_changes_nothing(run_folder, tmp_path, capsys):
    split_into_shards(run_folder, tmp_path / "shards", count=2)
    assert main(["merge", str(tmp_path / "shards"), "--out", str(tmp_path / "merged")]) == 0
    for kind in ("samples.jsonl", "heads.json", "summary.json"):
        assert (tmp_path / "merged" / f"{PREFIX}_{kind}").read_bytes() == (run_folder / f"{PREFIX}_{kind}").read_bytes()
    before = snapshot(tmp_path)
    assert main(["merge", str(tmp_path / "shards"), "--out", str(tmp_path / "merged")]) == 0
    assert "already holds this merge" in capsys.readouterr().err and snapshot(tmp_path) == before


def test_a_cut_last_line_is_left_out_by_every_reader_alike_and_cut_off_only_by_its_writer(run_folder, toy_dir, data_dir,
                                                                                          capsys):
    samples = samples_of(run_folder)
    toy_run = samples.read_bytes()
    lines = toy_run.decode().splitlines(keepends=True)
    cut = "".join(lines[:2]) + lines[2][:60]  # killed while writing the third sample
    samples.write_text(cut)
    sample = json.loads(lines[2])["id"]
    for argv in (["show", heads_file(run_folder), "--bootstrap", "5"], ["report", str(run_folder), "--bootstrap", "0"],
                 ["rescore", str(run_folder), *RESCORE]):
        assert main(argv) == 0
        err = capsys.readouterr().err
        assert f"ends in a cut line (a run killed while writing it): it is left out; resuming the run re-runs "\
               f"sample {sample}" in err, argv
        assert samples.read_text() == cut  # a reader never repairs
    assert main(detect_args(toy_dir, data_dir, run_folder)) == 0
    assert f"dropped a cut last line of {samples}: sample {sample} will be re-run" in capsys.readouterr().err
    assert [row["id"] for row in rows_of(samples)] == [json.loads(line)["id"] for line in lines]


def test_a_summary_written_before_the_manifest_was_finished_is_finished_by_resuming(run_folder, toy_dir, data_dir,
                                                                                   tmp_path, capsys):
    """Finding 7: killed between the summary and the manifest's `finished`: resume finishes it (it is not
    "already complete"), and its shards are then finished shards that merge accepts."""
    manifest = run_folder / f"{PREFIX}_manifest.json"
    edit_manifest(manifest, lambda m: dict(m, finished=None, runs={r: dict(v, finished=None)
                                                                    for r, v in m["runs"].items()}))
    files = {kind: (run_folder / f"{PREFIX}_{kind}.json").read_bytes() for kind in ("heads", "summary")}
    assert main(detect_args(toy_dir, data_dir, run_folder)) == 0
    assert "already complete" not in capsys.readouterr().err
    finished = json.loads(manifest.read_text())
    assert finished["finished"] and all(record["finished"] for record in finished["runs"].values())
    assert {kind: (run_folder / f"{PREFIX}_{kind}.json").read_bytes() for kind in ("heads", "summary")} == files
    split_into_shards(run_folder, tmp_path / "shards")
    assert main(["merge", str(tmp_path / "shards")]) == 0


def test_a_full_disk_mid_run_is_one_line_and_resumes_to_the_same_files(toy_dir, data_dir, tmp_path):
    """A file size limit (what a full disk looks like to a writer) cuts the samples file mid-row: exit 2, one
    line; the next run drops the cut line and ends with an uninterrupted run's files."""
    grid = ["--depths", "0,25,50,75,100", "--context-lengths", "260,300"]  # 10 rows, about 1 kB each
    assert main(detect_args(toy_dir, data_dir, tmp_path / "whole", *grid)) == 0
    limit = (tmp_path / "whole" / f"{PREFIX}_manifest.json").stat().st_size + 1500  # more than the manifest, less
    assert limit < samples_of(tmp_path / "whole").stat().st_size          # than the rows: a row is cut by the limit

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    command = [sys.executable, "-m", "headscope", *detect_args(toy_dir, data_dir, tmp_path / "cut", *grid)]
    result = subprocess.run(command, capture_output=True, text=True, preexec_fn=small_disk, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 2 and result.stderr.strip() == "headscope: error: File too large", result.stderr
    cut = samples_of(tmp_path / "cut").read_bytes()
    assert len(cut) == limit and not cut.endswith(b"\n")  # the disk filled in the middle of a row
    assert main(detect_args(toy_dir, data_dir, tmp_path / "cut", *grid)) == 0
    for kind in ("heads.json", "summary.json"):
        cut, whole = (tmp_path / folder / f"{PREFIX}_{kind}" for folder in ("cut", "whole"))
        assert cut.read_bytes() == whole.read_bytes()


# ------------------------------------------------------------------------------------- the report keeps going

@pytest.mark.parametrize("companion, content", [
    ("ablation.json", '{"none": {"success_rate": 1.0}, "sweep": [{"k": 1}]}'),
    ("ablation.json", '{"none": NaN}'),
    ("rescore/rescore.json", '{"runs": {"toy0_retrieval": {"settings": [{"metric": "f1"}]}}}'),
    ("specificity.json", '{"tasks": ["retrieval"], "matrix": {"a": {"retrieval": {"none": 1}}}}'),
])
def test_a_malformed_companion_file_drops_its_section_with_a_note(run_folder, companion, content, capsys):
    owner = PREFIX if "ablation" in companion else "toy0"  # ablation: NAME_TASK_; specificity: NAME_
    path = run_folder / (companion if "/" in companion else f"{owner}_{companion}")
    path.parent.mkdir(exist_ok=True)
    path.write_text(content)
    assert main(["report", str(run_folder), "--bootstrap", "0"]) == 0
    err = capsys.readouterr().err
    section = companion.split("/")[-1].removesuffix(".json")
    assert f"the {section} section is left out of the report" in err and str(path) in err
    html = (run_folder / "report.html").read_text()
    assert f"the {section} section is left out" in html and f'<section id="{section}">' not in html


# ------------------------------------------------------------------------------------- rules on the code

def test_every_from_pretrained_passes_trust_remote_code():
    """No code path can prompt for or run remote code without --trust-remote-code: every from_pretrained call in
    the package passes the user's flag (transformers asks on a terminal when it is left out)."""
    missing = []
    for path in Path(headscope.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "from_pretrained":
                names = {keyword.arg for keyword in node.keywords}
                if "trust_remote_code" not in names and None not in names:  # None: **options
                    missing.append(f"{path.name}:{node.lineno}")
    assert not missing


def test_a_pathological_pattern_is_stopped_and_named():
    started = time.time()
    with pytest.raises(HeadscopeError, match=r"regex:\(a\|aa\)\+\$ ran for more than"):
        answers.extract_answer("a" * 40 + "!" + "a" * 5000, r"regex:(a|aa)+$")
    assert time.time() - started < 10
    assert answers.extract_answer("so the answer is 42 .", r"regex:answer is (\d+)") == "42"
    with pytest.raises(HeadscopeError, match="needs a pattern"):
        answers.parse_answer_from("regex:")
