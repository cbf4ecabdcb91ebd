"""`headscope check` covers what detect does (issue 20): it FAILS a model whose attention is deliberately broken
only past a 512-token sliding window, only in a left-padded batch, or only in prefill rows -- three bugs the
old check (batch of one, 256 tokens, decoding rows only) could not see -- and it PASSES Granite-SWA (sinks as a
post-softmax output scale) and an fp16 mixture-of-experts model whose tokens split at a router tie."""
import dataclasses

import pytest
import torch
from transformers import AutoTokenizer

import headscope
from headscope.attention import recorder
from headscope.families import recipes
from headscope.detection.check import run_check
from headscope.detection.loading import default_model_path
from headscope.attention.ties import router_modules
from headscope.families.toy import tiny_model

WINDOW = 512


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


def figures(report) -> dict:
    return {figure.name: figure for figure in report.figures}


def check_of(model, tokenizer, **options):
    return run_check(headscope.prepare(model, tokenizer, path="toy"), need_ablation=False, **options)


real_hide, real_query_probs = recorder.hide, recorder.query_probs


def hide_ignoring_the_window(logits, query_index, attention_mask, rule):
    """headscope's masking with keys beyond the sliding window left visible (causal order kept)."""
    distance = query_index.to(logits.device)[:, None] - torch.arange(logits.shape[-1], device=logits.device)
    out_of_window = (distance >= rule.sliding_window) if rule.sliding_window else torch.zeros_like(distance).bool()
    return torch.where(out_of_window[None, None], logits, real_hide(logits, query_index, attention_mask, rule))


def hide_ignoring_padding(logits, query_index, attention_mask, rule):
    """headscope's masking without the padding mask (causal and window only): right unless a batch is padded."""
    return real_hide(logits, query_index, None, rule)


def query_probs_wrong_in_prefill(query, key, attention_mask, rule, query_index=None):
    """Rows 5% too sharp on prefill blocks (called with query_index) only; decoding rows untouched."""
    if query_index is not None:
        rule = dataclasses.replace(rule, scaling=rule.scaling * 1.05)
    return real_query_probs(query, key, attention_mask, rule, query_index)


def test_fails_attention_broken_only_past_a_512_token_window(tokenizer, monkeypatch):
    model = tiny_model("mistral", vocab_size=len(tokenizer), num_layers=4, sliding_window=WINDOW)
    monkeypatch.setattr(recorder, "hide", hide_ignoring_the_window)
    report = check_of(model, tokenizer, prompt_tokens=96, steps=3)
    assert report.prompt_tokens > WINDOW  # the check's prompt crosses the window, whatever --prompt-tokens says
    assert not report.passed and not figures(report)["prefill"].ok, report.table()


def test_fails_attention_broken_only_in_a_padded_batch(tokenizer, monkeypatch):
    model = tiny_model("llama", vocab_size=len(tokenizer), num_layers=4)
    monkeypatch.setattr(recorder, "hide", hide_ignoring_padding)
    report = check_of(model, tokenizer, prompt_tokens=96, steps=3)
    assert not figures(report)["rows"].ok and not figures(report)["prefill"].ok, report.table()


def test_fails_attention_broken_only_in_prefill_rows(tokenizer, monkeypatch):
    model = tiny_model("llama", vocab_size=len(tokenizer), num_layers=4)
    monkeypatch.setattr(recorder, "query_probs", query_probs_wrong_in_prefill)
    report = check_of(model, tokenizer, prompt_tokens=96, steps=3)
    found = figures(report)
    assert found["rows"].ok and found["tokens"].ok and not found["prefill"].ok, report.table()


def test_passes_granite_swa_whose_eager_weights_leave_out_the_sink_scale(tokenizer):
    model = recipes.tiny_model("granite_swa", vocab_size=len(tokenizer))
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "sinks"):
                module.sinks.normal_(0.0, 2.0)  # sinks that matter
    report = check_of(model, tokenizer, prompt_tokens=96, steps=4)
    assert report.passed, report.table()


def moe_with_router_ties(tokenizer) -> torch.nn.Module:
    """A 4-layer GPT-OSS in fp16 whose routers give experts 0 and 1 logits 1e-4 apart (ties that fp16 rounding
    decides) and whose experts differ strongly, so that a split at a tie changes the tokens. Seed 1: the check's
    tokens split at step 21, at an exact router tie (gap 0) in layer 0."""
    model = tiny_model("gpt_oss", vocab_size=len(tokenizer), num_layers=4, seed=1)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for router, _ in router_modules(model):
            router.weight[1] = router.weight[0] + 1e-4 * torch.randn(router.weight.shape[1], generator=generator)
            router.bias[1] = router.bias[0]
        for name, parameter in model.named_parameters():
            if "experts" in name and parameter.dim() >= 2:
                parameter.mul_(20.0)
    return model.to(torch.float16)


def test_passes_an_fp16_moe_model_whose_tokens_split_at_a_router_tie(tokenizer):
    report = check_of(moe_with_router_ties(tokenizer), tokenizer, prompt_tokens=96, steps=24)
    tokens = figures(report)["tokens"]
    assert "routing near tie" in tokens.value and tokens.ok, report.table()
    assert report.passed, report.table()


def test_fails_attention_whose_outputs_are_wrong_while_its_rows_are_right(tokenizer, monkeypatch):
    """Gemma 2's soft-capped prefill runs on headscope's exact attention: outputs 1% off there leave every row a
    layer computes from its own inputs right, but not the model (a non-causal prefill would do the same)."""
    real = recorder.exact_attention
    monkeypatch.setattr(recorder, "exact_attention", lambda *args: real(*args) * 1.01)
    report = check_of(tiny_model("gemma2", vocab_size=len(tokenizer), num_layers=4), tokenizer, prompt_tokens=96,
                      steps=3)
    found = figures(report)
    assert found["rows"].ok and found["prefill"].ok and not found["outputs"].ok, report.table()
