"""Issue 26: the same numbers on a fresh machine and on every re-run -- a pad id the embedding has, a families
table that knows its transformers version, and a run that knows its model, tokenizer, data and versions."""
import json

import pytest
import torch

from headscope.cli.commands import main
from headscope.families.toy import tiny_model, word_tokenizer

from conftest import WORDS


@pytest.fixture(scope="module")
def pad_past_embedding(tmp_path_factory):
    """A model whose tokenizer's pad token has no embedding row (added after the model was built, not resized:
    what transformers 5.25's Qwen2 tokenizer class does to a word-level tokenizer that has no pad token)."""
    path = tmp_path_factory.mktemp("padpast")
    tokenizer = word_tokenizer(WORDS)
    model = tiny_model("llama", vocab_size=len(tokenizer), num_layers=2, num_heads=4, seed=3)
    tokenizer.add_special_tokens({"pad_token": "<|endoftext|>"})
    assert tokenizer.pad_token_id >= model.get_input_embeddings().weight.shape[0]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_pad_id_past_the_embedding_changes_nothing(pad_past_embedding, tmp_path):
    word = lambda n: WORDS[n % len(WORDS)]  # noqa: E731
    records = [{"id": f"q{n}", "context": " ".join((WORDS * 3)[:n]) + " .", "question": f"what is the {word(n)} ?",
                "answer": word(n)} for n in (3, 7, 11, 15, 19)]  # five lengths: a batch of 8 is left-padded
    (tmp_path / "data.json").write_text(json.dumps(records))
    options = ["detect", "reasoning", "--model", str(pad_past_embedding), "--data", str(tmp_path / "data.json"),
               "--success-threshold", "-1", "--max-new-tokens", "5", "--no-stop-at-newline", "--quiet", "--no-plots"]
    rows = {}
    for size in (1, 8):  # the check (on by default) pads its second prompt too
        out = tmp_path / f"batch{size}"
        assert main([*options, "--out", str(out), "--batch-size", str(size)]) == 0
        rows[size] = {row["id"]: row for row in map(json.loads, open(out / "padpast0_reasoning_samples.jsonl"))}
    assert len({row["prompt_tokens"] for row in rows[1].values()}) == 5
    for sample_id, row in rows[1].items():
        assert rows[8][sample_id]["response"] == row["response"]
        assert torch.allclose(torch.tensor(rows[8][sample_id]["head_scores"]), torch.tensor(row["head_scores"]),
                              atol=1e-6)
    assert main(["check", "--model", str(pad_past_embedding)]) == 0


# ------------------------------------------------------------------------------------------ the locked install

def load_deps():
    import importlib.util

    from headscope.detection.sweep_table import ROOT

    spec = importlib.util.spec_from_file_location("deps", ROOT / "scripts" / "deps.py")
    deps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(deps)
    return deps


def test_the_lock_pins_every_dependency_and_the_families_tables_transformers():
    """A dependency added to pyproject.toml without a pin would be resolved afresh on every machine."""
    import re

    tomllib = pytest.importorskip("tomllib")
    from headscope.detection import sweep_table

    deps = load_deps()
    project = tomllib.loads((sweep_table.ROOT / "pyproject.toml").read_text())["project"]
    named = project["dependencies"] + [need for extra in project["optional-dependencies"].values() for need in extra]
    locked = deps.parse(deps.LOCK.read_text())
    for need in named:
        name = deps.canonical(re.match(r"[A-Za-z0-9._-]+", need)[0])
        assert name == "torch" or name in locked, f"{name} is not in constraints.txt"
    assert "torch" not in locked  # installed first, on its own
    assert locked["transformers"] == sweep_table.load().transformers  # CI tests the release the table was made on


def test_a_drifted_environment_is_named_package_by_package():
    deps = load_deps()
    locked = deps.parse("# comment\nnumpy==2.4.6\nJinja2==3.1.6\n-e /somewhere\ntorch==2.13.0+cpu\n")
    assert locked == {"numpy": "2.4.6", "jinja2": "3.1.6", "torch": "2.13.0"}
    assert deps.differences(locked, dict(locked)) == []
    assert deps.differences(locked, {"numpy": "2.5.0", "jinja2": "3.1.6", "torch": "2.13.0", "new-dep": "1.0"}) == [
        "new-dep: locked -, installed 1.0", "numpy: locked 2.4.6, installed 2.5.0"]


# ------------------------------------------------------------------------------------------ a run's identity

@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """Two checkpoints of one architecture and tokenizer, trained apart (other seeds), in folders of one name:
    m1/ckpt and m2/ckpt. Their files differ only in the weights' bytes."""
    root = tmp_path_factory.mktemp("checkpoints")
    tokenizer = word_tokenizer(WORDS + ["book", "based", "on", "content", "question", "answer", "context"])
    for seed, folder in ((5, "m1"), (6, "m2")):
        model = tiny_model("llama", vocab_size=len(tokenizer), num_layers=3, num_heads=4, seed=seed)
        model.save_pretrained(root / folder / "ckpt")
        tokenizer.save_pretrained(root / folder / "ckpt")
    return root / "m1" / "ckpt", root / "m2" / "ckpt"


def copied_data(data_dir, tmp_path):
    """The shared data files, copied so that a test may edit them."""
    import shutil

    shutil.copytree(data_dir, tmp_path / "data")
    return tmp_path / "data"


def retrieval_args(model, data, out, *extra):
    return ["detect", "retrieval", "--model", str(model), "--out", str(out), "--haystack", str(data / "haystack"),
            "--needles", str(data / "needles.jsonl"), "--context-lengths", "260", "--depths", "0,100",
            "--success-threshold", "-1", "--max-new-tokens", "6", "--quiet", "--no-plots", "--no-check", *extra]


def edit_needles(data):
    needles = data / "needles.jsonl"
    needles.write_text(needles.read_text().replace("the code of the stone is", "the code of the stone was"))


def test_another_checkpoint_of_the_same_name_is_never_joined(two_checkpoints, data_dir, tmp_path, capsys):
    m1, m2 = two_checkpoints
    out = tmp_path / "out"
    assert main(retrieval_args(m1, data_dir, out)) == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    capsys.readouterr()
    assert main(retrieval_args(m2, data_dir, out)) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("headscope: error: ") and "\n" not in error
    assert "made with other model (its config or weights) than this run" in error
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert main(retrieval_args(m2, data_dir, out, "--append")) == 2  # not pooled either
    assert "made with other model" in capsys.readouterr().err


def test_shards_of_two_checkpoints_or_of_edited_data_are_not_merged(two_checkpoints, data_dir, tmp_path, capsys):
    m1, m2 = two_checkpoints
    assert main(retrieval_args(m1, data_dir, tmp_path / "a", "--shard", "0/2")) == 0
    assert main(retrieval_args(m2, data_dir, tmp_path / "a", "--shard", "1/2")) == 0
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "a")]) == 2
    assert "shards 0 and 1 of 2 were made with other model (its config or weights)" in capsys.readouterr().err
    assert not list((tmp_path / "a").glob("*_heads.json"))

    data = copied_data(data_dir, tmp_path)
    assert main(retrieval_args(m1, data, tmp_path / "b", "--shard", "0/2")) == 0
    edit_needles(data)
    assert main(retrieval_args(m1, data, tmp_path / "b", "--shard", "1/2")) == 0
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "b")]) == 2
    assert "were made with other data (needles.jsonl)" in capsys.readouterr().err
    assert not list((tmp_path / "b").glob("*_heads.json"))


def test_an_edited_data_file_is_not_resumed_into_the_run_it_made(two_checkpoints, data_dir, tmp_path, capsys):
    data = copied_data(data_dir, tmp_path)
    out = tmp_path / "out"
    assert main(retrieval_args(two_checkpoints[0], data, out)) == 0
    edit_needles(data)
    capsys.readouterr()
    assert main(retrieval_args(two_checkpoints[0], data, out)) == 2
    assert "made with other data (needles.jsonl) than this run: --append adds this run beside it when its samples" \
           " are new ones" in capsys.readouterr().err


def test_an_edited_data_file_between_two_kv_arms_is_refused(two_checkpoints, data_dir, tmp_path, capsys):
    scores = tmp_path / "scores_heads.json"
    scores.write_text(json.dumps({f"{l}-{h}": [0.05 + ((7 * l + 3 * h) % 12) / 12] for l in range(3) for h in range(4)}))
    data = copied_data(data_dir, tmp_path)
    kv = ["kv", "retrieval", "--scores", str(scores), "--model", str(two_checkpoints[0]), "--out", str(tmp_path / "kv"),
          "--quiet", "--haystack", str(data / "haystack"), "--needles", str(data / "needles.jsonl"),
          "--context-lengths", "260", "--depths", "0", "--success-threshold", "-1", "--max-new-tokens", "4",
          "--no-check", "--no-plots", "--sink", "2", "--recent", "8"]
    assert main([*kv, "--policy", "duo", "--budgets", "4"]) == 0
    log = next((tmp_path / "kv").glob("*_kv_samples.jsonl"))
    before = log.read_bytes()
    edit_needles(data)
    capsys.readouterr()
    assert main([*kv, "--policy", "snapkv", "--budgets", "64"]) == 2
    assert "holds a run made with other data (needles.jsonl)" in capsys.readouterr().err
    assert log.read_bytes() == before


def test_the_manifest_records_what_made_the_numbers(two_checkpoints, data_dir, tmp_path):
    out = tmp_path / "out"
    assert main(retrieval_args(two_checkpoints[0], data_dir, out)) == 0
    manifest = json.loads(next(out.glob("*_manifest.json")).read_text())
    made = manifest["identity"]
    assert set(made["model"]["files"]) == {"config.json", "generation_config.json", "model.safetensors"}
    assert set(made["tokenizer"]["files"]) >= {"tokenizer.json", "tokenizer_config.json"}
    assert set(made["data"]["files"]) == {str(data_dir / "haystack" / "a.txt"), str(data_dir / "needles.jsonl")}
    assert set(manifest["versions"]) >= {"torch", "transformers", "tokenizers", "headscope"}
    assert manifest["device"].startswith("cpu") and manifest["dtype"] == "float32"


def test_a_run_resumed_on_other_library_versions_says_so_and_records_both(two_checkpoints, data_dir, tmp_path,
                                                                           capsys):
    out = tmp_path / "out"
    assert main(retrieval_args(two_checkpoints[0], data_dir, out)) == 0
    samples, manifest_path = next(out.glob("*_samples.jsonl")), next(out.glob("*_manifest.json"))
    samples.write_text("".join(samples.read_text().splitlines(keepends=True)[:-1]))  # as if killed before the last
    manifest = json.loads(manifest_path.read_text())
    record = manifest["runs"][manifest["run"]]
    record["versions"] = record["versions"] | {"transformers": "5.0.0"}
    record["finished"] = None
    manifest_path.write_text(json.dumps(manifest | {"runs": {manifest["run"]: record}}))
    capsys.readouterr()
    assert main(retrieval_args(two_checkpoints[0], data_dir, out)) == 0
    assert f"resumes with other library versions (transformers 5.0.0 -> {transformers_version()})" in \
           capsys.readouterr().err
    seen = json.loads(manifest_path.read_text())["versions_seen"]
    assert [versions["transformers"] for versions in seen] == ["5.0.0", transformers_version()]


def transformers_version():
    import transformers

    return transformers.__version__


def test_pictures_are_drawn_under_the_runs_lock(toy_dir, data_dir, tmp_path, monkeypatch):
    """A concurrent writer cannot change the heads file while its pictures are drawn."""
    from headscope.heads import plots

    out, held = tmp_path / "out", []
    drawing = plots.plot_run
    monkeypatch.setattr(plots, "plot_run", lambda path, *a, **k: held.append(
        (out / ".toy0_retrieval.lock").exists()) or drawing(path, *a, **k))
    arguments = [arg for arg in retrieval_args(toy_dir, data_dir, out) if arg != "--no-plots"]
    assert main(arguments) == 0
    assert held == [True]


def test_shards_made_on_other_library_versions_merge_with_a_note_and_both_recorded(toy_dir, data_dir, tmp_path,
                                                                                   capsys):
    for shard in ("0/2", "1/2"):
        assert main(retrieval_args(toy_dir, data_dir, tmp_path, "--shard", shard)) == 0
    second = next(tmp_path.glob("*_manifest.shard-1-of-2.json"))
    manifest = json.loads(second.read_text())
    second.write_text(json.dumps(manifest | {"versions": manifest["versions"] | {"torch": "2.4.0"}}))
    capsys.readouterr()
    assert main(["merge", str(tmp_path)]) == 0
    assert "the shards were made with 2 sets of library versions" in capsys.readouterr().err
    merged = json.loads(next(tmp_path.glob("*_manifest.json")).read_text())
    assert [versions["torch"] for versions in merged["versions_seen"]] == [manifest["versions"]["torch"], "2.4.0"]


def test_the_data_fingerprint_is_of_the_files_the_haystack_is_read_from(tmp_path):
    """Its .txt files, links followed (a linked file's new text is new data); a file it never reads changes
    nothing."""
    from headscope.detection.engine import run_identity
    from headscope.tasks import TASKS

    (tmp_path / "elsewhere.txt").write_text("the red fish .")
    haystack = tmp_path / "haystack"
    haystack.mkdir()
    (haystack / "a.txt").symlink_to(tmp_path / "elsewhere.txt")
    options = TASKS["retrieval"].options(haystack=str(haystack), check=False)
    digest = lambda: run_identity("retrieval", options, None)["data"]["digest"]  # noqa: E731
    before = digest()
    (haystack / "notes.md").write_text("not read")
    assert digest() == before
    (tmp_path / "elsewhere.txt").write_text("the blue fish .")
    assert digest() != before


def test_a_run_of_an_earlier_headscope_is_named_as_such(toy_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(retrieval_args(toy_dir, data_dir, out)) == 0
    manifest_path, samples = next(out.glob("*_manifest.json")), next(out.glob("*_samples.jsonl"))
    manifest = json.loads(manifest_path.read_text())
    old = "0123456789ab"  # its id, made without the identity; its record has none
    record = {key: value for key, value in manifest["runs"][manifest["run"]].items() if key != "identity"}
    manifest_path.write_text(json.dumps(manifest | {"run": old, "runs": {old: record}}))
    samples.write_text(samples.read_text().replace(f'"run": "{manifest["run"]}"', f'"run": "{old}"'))
    capsys.readouterr()
    assert main(retrieval_args(toy_dir, data_dir, out)) == 2
    assert "written by an earlier headscope whose run ids did not cover the model" in capsys.readouterr().err
