"""Issue 26: the same numbers on a fresh machine and on every re-run -- a pad id the embedding has, a families
table that knows its transformers version, and a run that knows its model, tokenizer, data and versions."""
import json

import pytest
import torch

from headscope.cli import main
from headscope.toy import tiny_model, word_tokenizer

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

    from headscope.sweep_table import ROOT

    spec = importlib.util.spec_from_file_location("deps", ROOT / "scripts" / "deps.py")
    deps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(deps)
    return deps


def test_the_lock_pins_every_dependency_and_the_families_tables_transformers():
    """A dependency added to pyproject.toml without a pin would be resolved afresh on every machine."""
    import re

    tomllib = pytest.importorskip("tomllib")
    from headscope import sweep_table

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
