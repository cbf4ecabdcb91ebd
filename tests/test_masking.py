"""Head ablation inside the attention function equals editing eager attention probabilities."""
import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from headscope.attention import masking, recorder
from headscope.families import recipes
from headscope.detection.decode import StopRule, greedy_decode
from headscope.families.toy import tiny_model

MASKED = {0: [1], 1: [0, 3], 3: [2]}  # layer 3: the 4-layer models of `recipes` only


def uniform_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The reference: eager attention whose masked heads' probabilities are set to uniform over visible keys."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    logits = torch.matmul(query, key.transpose(-1, -2)) * scaling
    q_len, kv_len = query.shape[2], key.shape[2]
    visible = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    if attention_mask is not None:
        visible = visible & attention_mask[..., -kv_len:] if attention_mask.dtype == torch.bool else visible
    logits = logits.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(logits, -1)
    for head in MASKED.get(module.layer_idx, []):
        probs[:, head] = visible / visible.sum(-1, keepdim=True)
    return torch.matmul(probs, value).transpose(1, 2), None


AttentionInterface.register("test_uniform_eager", uniform_eager)
AttentionMaskInterface.register("test_uniform_eager", sdpa_mask)  # boolean masks, sliding windows included


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_uniform_mode_equals_eager_with_uniform_probabilities(family):
    torch.manual_seed(0)
    input_ids = torch.randint(4, 256, (1, 50))
    reference = tiny_model(family, attn="eager")
    reference.set_attn_implementation("test_uniform_eager")
    with torch.no_grad():
        expected = reference(input_ids).logits[0, -1]
    model = tiny_model(family)
    recorder.install(model)
    with torch.no_grad(), masking.ablating(model, MASKED, "uniform"):
        prefill_logits = model(input_ids).logits[0, -1]
        generated = greedy_decode(model, input_ids, None, [], 1, StopRule(set(), set()))
    assert (prefill_logits - expected).abs().max() <= 1e-4
    assert generated[0][0] == int(expected.argmax())  # decoding steps are masked the same way


@pytest.mark.parametrize("model_type,config", [("llama4_text", {"attention_chunk_size": 8}), ("qwen4_exp_text", {})])
def test_uniform_mode_averages_over_the_keys_the_models_own_mask_shows(model_type, config):
    """Llama 4's chunked layers (layer 0, a prompt of 6 chunks) and Qwen4-Exp's token selection: the keys a query
    sees are the mask's, not every earlier one."""
    torch.manual_seed(0)
    input_ids = torch.randint(4, 256, (1, 50))
    reference = recipes.tiny_model(model_type, 256, **config)
    reference.set_attn_implementation("test_uniform_eager")
    with torch.no_grad():
        expected = reference(input_ids).logits[0]
    model = recipes.tiny_model(model_type, 256, attn="sdpa", **config)
    assert recorder.install(model)
    with torch.no_grad(), masking.ablating(model, MASKED, "uniform"):
        assert (model(input_ids).logits[0] - expected).abs().max() <= 1e-4


def test_zero_and_mean_modes_change_only_what_they_should():
    torch.manual_seed(1)
    input_ids = torch.randint(4, 256, (1, 30))
    model = tiny_model("llama")
    recorder.install(model)
    with torch.no_grad():
        plain = model(input_ids).logits
        with masking.ablating(model, {}, "zero"):
            assert torch.equal(model(input_ids).logits, plain)  # K = 0 changes nothing
        with masking.ablating(model, {0: [0]}, "zero"):
            zeroed = model(input_ids).logits
        with masking.ablating(model, {0: [0]}, "mean"):
            meaned = model(input_ids).logits
    assert not torch.allclose(zeroed, plain) and not torch.allclose(meaned, plain)
    assert not torch.allclose(zeroed, meaned)


def test_a_float_mask_with_a_bias_per_head_counts_its_queries_as_real():
    """Doge's dynamic mask adds a bias to the keys it shows (no entry is 0) and has one row set per head: mean
    ablation must still take every real query's output into its mean."""
    from headscope.attention.masking import _query_validity

    bias = torch.rand(1, 4, 5, 5) + 0.1
    hidden = torch.ones(5, 5).triu(1).bool()
    mask = bias.masked_fill(hidden, torch.finfo(torch.float32).min)
    mask[:, 1:, 0] = torch.finfo(torch.float32).min  # query 0 hidden in heads 1-3 only: still a real query
    output = torch.zeros(1, 5, 4, 2)
    assert _query_validity(mask, output, 5).tolist() == [[1.0] * 5]
