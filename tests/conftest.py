"""Shared fixtures: a small random-weight model saved like a hub model, and small data files."""
import json

import pytest

from headscope.families.toy import tiny_model, word_tokenizer

WORDS = "red blue green gold fish bird tree stone river code key is the of what".split()


def query_records(extra_documents=()) -> list[dict]:
    """Four query-task records over WORDS: questions of different lengths (batches of two are left-padded),
    each with two gold documents (the last document and one more), the last with one."""
    documents = [" ".join(WORDS[i:i + 4]) + " ." for i in range(0, 12, 3)] + list(extra_documents)
    last = len(documents) - 1
    return [{"id": f"q{g}", "documents": documents, "gold": [g, last] if g < 3 else g,
             "question": f"what is the {WORDS[g]} of the {' '.join(WORDS[g + 5:g + 6 + g])} ?", "answer": WORDS[g]}
            for g in range(4)]


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    """A 3-layer random Llama over a 15-word vocabulary: small enough that heads copy by chance."""
    path = tmp_path_factory.mktemp("toy")
    tokenizer = word_tokenizer(WORDS + ["book", "based", "on", "content", "question", "answer", "context"])
    model = tiny_model("llama", vocab_size=len(tokenizer), num_layers=3, num_heads=4, seed=5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    (path / "haystack").mkdir()
    filler = " ".join(["the red fish of the blue river is gold .", "the green bird is the key of the tree ."] * 40)
    (path / "haystack" / "a.txt").write_text(filler)
    # A long needle answer over a tiny vocabulary, so that random heads land on it and copy by chance.
    answer = " ".join(WORDS[(7 * i) % 12] for i in range(30))
    needles = [{"needle": f"the code of the stone is {answer} .", "question": "what is the code of the stone ?",
                "real_needle": answer}]
    (path / "needles.jsonl").write_text("\n".join(json.dumps(n) for n in needles))
    records = [{"id": f"q{i}", "context": " ".join(WORDS[i:] + WORDS[:i]) + " .",
                "question": f"what is the {WORDS[i]} ?", "answer": WORDS[i]} for i in range(4)]
    (path / "reasoning.json").write_text(json.dumps(records))
    return path


def refuse_headscope_attention(model):
    """Make `model` one whose attention cannot be switched to headscope's function (a model off the interface)."""
    from headscope.attention import recorder

    switch = model.set_attn_implementation

    def set_attn_implementation(name, **kwargs):
        if name in (recorder.ATTN_SDPA, recorder.ATTN_FLASH):
            raise ValueError(f"{type(model).__name__} cannot use {name}")
        return switch(name, **kwargs)

    model.set_attn_implementation = set_attn_implementation


@pytest.fixture(scope="session")
def toy_run(toy_dir, data_dir, tmp_path_factory):
    """One finished retrieval run of 3 samples on the toy model (every sample passes: each head has a value)."""
    from headscope.cli.commands import main
    from toy_runs import detect_args

    out = tmp_path_factory.mktemp("toy_run") / "run"
    assert main(detect_args(toy_dir, data_dir, out)) == 0
    return out


@pytest.fixture
def run_folder(toy_run, tmp_path):
    """A copy of `toy_run` for one test to change."""
    import shutil

    shutil.copytree(toy_run, tmp_path / "run")
    return tmp_path / "run"
