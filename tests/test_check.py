"""`headscope check` passes on every family of the conformance matrix, in float32 and bf16, and fails --
exit 1, the failing figure shown -- on a model whose attention is deliberately broken; `detect` and
`ablate` refuse such a model unless --no-check."""
import json

import pytest
import torch
from transformers import AutoTokenizer

import headscope
from headscope.detection import check
from headscope.attention import recorder, reference
from headscope.experiments.ablation import ablate
from headscope.detection.check import run_check
from headscope.cli.commands import main
from headscope.detection.loading import default_model_path
from headscope.families.toy import FAMILIES, tiny_model

from conftest import refuse_headscope_attention


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())  # the organism's words: the check prompt's text


def loaded_toy(family, tokenizer, dtype=torch.float32):
    model = tiny_model(family, vocab_size=len(tokenizer), num_layers=4).to(dtype)
    return headscope.prepare(model, tokenizer, path=f"toy-{family}")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_check_passes_on_every_family(family, tokenizer):
    report = run_check(loaded_toy(family, tokenizer), prompt_tokens=96, steps=4)
    assert report.passed, report.table()
    assert [figure.name for figure in report.figures] == ["rows", "prefill", "outputs", "tokens", "ablation"]


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_oss"])
def test_check_passes_in_bf16(family, tokenizer):
    report = run_check(loaded_toy(family, tokenizer, torch.bfloat16), prompt_tokens=96, steps=4)
    assert report.passed, report.table()


@pytest.fixture
def toy_model_dir(tmp_path, tokenizer):
    model = tiny_model("qwen2", vocab_size=len(tokenizer), num_layers=4)
    model.save_pretrained(tmp_path / "toy")
    tokenizer.save_pretrained(tmp_path / "toy")
    return str(tmp_path / "toy")


def broken_logits(query, key, scaling):  # a deliberately wrong scaling: 5% off
    return torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling * 1.05


def test_check_fails_on_broken_attention(toy_model_dir, monkeypatch, capsys):
    assert main(["check", "--model", toy_model_dir, "--prompt-tokens", "64", "--steps", "3"]) == 0
    assert "verdict: PASS" in capsys.readouterr().out
    monkeypatch.setattr(recorder, "attention_logits", broken_logits)
    assert main(["check", "--model", toy_model_dir, "--prompt-tokens", "64", "--steps", "3"]) == 1
    out = capsys.readouterr().out
    rows = next(line for line in out.splitlines() if line.startswith("rows"))
    assert rows.endswith("NO") and "mass moved" in rows
    assert "verdict: FAIL (rows" in out


def test_detect_refuses_a_failing_model_unless_no_check(toy_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(recorder, "attention_logits", broken_logits)
    out = tmp_path / "out"
    command = ["detect", "reasoning", "--model", toy_model_dir, "--out", str(out), "--quiet", "--no-plots",
               "--num-samples", "1", "--max-new-tokens", "2"]
    assert main(command) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "headscope check --model" in error and "--no-check" in error
    assert not out.exists()
    assert main(command + ["--success-threshold", "-1", "--no-check"]) == 0  # every sample counts: it ran


def test_ablation_refused_off_the_interface(tokenizer, tmp_path):
    model = tiny_model("llama", vocab_size=len(tokenizer), num_layers=4)
    refuse_headscope_attention(model)
    loaded = headscope.prepare(model, tokenizer, path="off-interface")
    report = run_check(loaded, prompt_tokens=64, steps=3)
    assert report.passed and "ablation" not in [f.name for f in report.figures]
    scores = tmp_path / "toy_reasoning_heads.json"
    scores.write_text(json.dumps({f"{layer}-{head}": [float(head)] for layer in range(4) for head in range(4)}))
    with pytest.raises(headscope.HeadscopeError, match="cannot mask its heads"):
        ablate("reasoning", str(scores), [1], loaded=loaded, out=str(tmp_path))


def test_check_fails_when_the_model_has_no_eager_reference(tokenizer, monkeypatch):
    loaded = loaded_toy("llama", tokenizer)
    monkeypatch.setattr(reference, "model_eager_attention", lambda module: None)
    report = run_check(loaded, prompt_tokens=64, steps=2, need_ablation=False)
    assert [f.name for f in report.failing()] == ["rows", "prefill", "outputs"]
    assert all("no eager reference" in f.value for f in report.failing())
