"""Models whose logits depend on left padding (issue 20): the decoders of Bart, Pegasus, Marian or BigBird-Pegasus
count their learned positions from the cache and ignore position_ids, so a left-padded prompt reads shifted
positions. headscope finds that in its layout probe and decodes them one prompt at a time: --batch-size never
changes a sample's numbers; `check` runs its batch of two without padding."""
import json

import pytest
import torch

from headscope.families import recipes
from headscope.cli.commands import main
from headscope.attention.layout import pads_like_alone

from conftest import WORDS
from test_hybrid import saved


@pytest.mark.parametrize("model_type, honoured", [("llama", True), ("gpt2", True), ("bart", False),
                                                  ("bigbird_pegasus", False)])
def test_the_probe_finds_the_models_that_ignore_position_ids(model_type, honoured):
    assert pads_like_alone(recipes.tiny_model(model_type, vocab_size=64, seed=1)) is honoured


def test_position_ids_really_are_ignored_there():
    """The premise, on Bart's own eager code: the same prompt, left-padded, gives other logits."""
    model = recipes.tiny_model("bart", vocab_size=64, seed=1)
    ids = torch.arange(4, 20)[None]
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = (torch.arange(19) >= 3).long()[None]
    with torch.no_grad():
        alone = model(ids).logits[0, -1]
        shifted = model(padded, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[0, -1]
    assert (alone - shifted).abs().max() > 1e-3


def test_batch_size_does_not_change_the_numbers(tmp_path, capsys):
    model_dir = saved("bart", tmp_path / "bart")
    word = lambda n: WORDS[n % len(WORDS)]  # noqa: E731
    records = [{"id": f"q{n}", "context": " ".join((WORDS * 3)[:n]) + " .", "question": f"what is the {word(n)} ?",
                "answer": word(n)} for n in (3, 7, 11, 15)]  # prompts of four lengths: a batch of 4 is padded
    (tmp_path / "data.json").write_text(json.dumps(records))
    options = ["--model", str(model_dir), "--data", str(tmp_path / "data.json"), "--success-threshold", "-1",
               "--max-new-tokens", "6", "--quiet", "--no-stop-at-newline", "--no-plots"]
    rows = {}
    for size in (1, 4):
        out = tmp_path / f"batch{size}"
        assert main(["detect", "reasoning", *options, "--out", str(out), "--batch-size", str(size)]) == 0
        rows[size] = {row["id"]: row for row in map(json.loads, open(out / "bart_reasoning_samples.jsonl"))}
    assert "decoded one at a time, whatever --batch-size" in capsys.readouterr().err
    assert len({row["prompt_tokens"] for row in rows[1].values()}) > 1  # a batch of 4 would have been padded
    for sample_id, row in rows[1].items():
        assert rows[4][sample_id]["response"] == row["response"]
        assert torch.allclose(torch.tensor(rows[4][sample_id]["head_scores"]), torch.tensor(row["head_scores"]),
                              atol=1e-6)
    assert main(["check", "--model", str(model_dir)]) == 0
    assert "a batch of 2 without padding" in capsys.readouterr().out
