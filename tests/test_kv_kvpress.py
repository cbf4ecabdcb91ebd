"""kvpress's convention (`headscope kv --convention kvpress`) against kvpress's own presses, transcribed.

kvpress (NVIDIA/kvpress 0.5.4, tests/references.py) compresses the cache once, after a layer's prefill of the
context -- every context query reads the full context -- and feeds the question after it, uncompressed, then
decodes. The reference here does exactly that: an attention function whose cache holds, per layer and KV head,
the context positions kvpress's scoring keeps (`ScorerPress.compress`'s top-k of `SnapKVPress.score` or
`StreamingLLMPress.score`; `DuoAttentionPress.compress`'s masked keys), plus every token from the question on.
headscope replays the same policy through the engine's way (the prompt but its last token in one pass, then one
token at a time) with the context's length in its Layout. Where the conventions differ the logits differ:
headscope's own convention (the prompt compressed with the question, a sliding window) is shown not to match.
"""
import numpy as np
import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import references
from headscope.attention import kv, recorder
from headscope.attention.caches import fresh_cache
from headscope.families.toy import tiny_model
from test_kv import padded_logits

REFERENCE = {}
CONTEXT, QUESTION, STEPS = 40, 6, 4  # tokens; the prompt is context + question
PROMPT = CONTEXT + QUESTION
HEAD_SCORES = np.array([[0.9, 0.2], [0.4, 0.7]])  # DuoAttention's pattern for the tiny Llama's 2 x 2 KV heads


class KvpressCache:
    """Per layer and KV head the context positions kvpress keeps, chosen by `keep(layer, query, key)` on the
    context's prefill; every later query reads those and every key from the context's end on."""

    def __init__(self, keep):
        self.keep, self.kept = keep, {}

    def forward(self, module, query, key, value, rule):
        layer, q_len, kv_len = module.layer_idx, query.shape[2], key.shape[2]
        group = query.shape[1] // key.shape[1]
        if layer not in self.kept:  # the context's prefill: full causal attention, then compress
            assert q_len == kv_len == CONTEXT
            self.kept[layer] = self.keep(layer, query, key)  # (kv_heads, n) positions
            keys, values = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
            logits = (query.float() @ keys.float().transpose(-1, -2) * rule["scaling"])
            logits = logits.masked_fill(~torch.ones(q_len, q_len, dtype=torch.bool).tril(), float("-inf"))
            return (torch.softmax(logits, -1).to(values.dtype) @ values).transpose(1, 2)
        output = torch.zeros(1, q_len, query.shape[1], value.shape[-1], dtype=value.dtype)
        for row in range(q_len):
            position = kv_len - q_len + row
            for head in range(query.shape[1]):
                index = torch.cat([self.kept[layer][head // group].sort().values,
                                   torch.arange(CONTEXT, position + 1)])
                logits = query[0, head, row].float() @ key[0, head // group, index].float().T * rule["scaling"]
                output[0, row, head] = torch.softmax(logits, -1).to(value.dtype) @ value[0, head // group, index]
        return output


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    return REFERENCE["cache"].forward(module, query, key, value, dict(kwargs, scaling=scaling)), None


AttentionInterface.register("test_kvpress_reference", reference_attention)
AttentionMaskInterface.register("test_kvpress_reference", sdpa_mask)


def snapkv(ratio, window, kernel):
    def keep(layer, query, key):
        weights = references.kvpress_window_attention(query[:, :, -window:], key, window, query.shape[-1])
        scores = references.kvpress_snapkv_scores(weights, key.shape[1], window, kernel)
        return references.kvpress_kept_indices(scores, ratio)[0]
    return keep


def streaming(ratio, n_sink):
    def keep(layer, query, key):
        return references.kvpress_kept_indices(references.kvpress_streaming_scores(key, n_sink, ratio), ratio)[0]
    return keep


def duo(ratio, sink, recent):
    streaming_mask = references.kvpress_duo_streaming_mask(HEAD_SCORES, ratio)

    def keep(layer, query, key):
        masked = references.kvpress_duo_masked_keys(key, streaming_mask[layer], sink, recent, ratio)[0]
        return [torch.nonzero(~row).flatten() for row in masked]
    return keep


def duo_full_heads(ratio):
    """The KV heads DuoAttentionPress keeps full at this head compression ratio: {layer: [KV heads]}."""
    streaming_mask = references.kvpress_duo_streaming_mask(HEAD_SCORES, ratio)
    return {layer: [g for g in range(2) if not streaming_mask[layer, g]] for layer in range(2)}


def tokens():
    torch.manual_seed(5)
    return torch.randint(4, 256, (1, PROMPT + STEPS))


def reference_logits(keep, ids):
    """kvpress's pipeline: the context in one pass (compressed after it), the question in one pass, then one token
    at a time. Logits from the question's last token on."""
    model = tiny_model("llama", num_layers=2)
    model.set_attn_implementation("test_kvpress_reference")
    REFERENCE["cache"], past = KvpressCache(keep), fresh_cache(model)
    with torch.no_grad():
        model(ids[:, :CONTEXT], **past)
        logits = [model(ids[:, CONTEXT:PROMPT], position_ids=torch.arange(CONTEXT, PROMPT)[None], **past).logits[0, -1]]
        logits += [model(ids[:, t:t + 1], position_ids=torch.tensor([[t]]), **past).logits[0, -1]
                   for t in range(PROMPT, ids.shape[1] - 1)]
    return torch.stack(logits)


def replayed_logits(policy, ids, context=(CONTEXT,)):
    """headscope's engine: prompt[:-1] in one pass, then one token at a time; logits from the last prompt token on."""
    model = tiny_model("llama", num_layers=2)
    recorder.install(model)
    past = fresh_cache(model)
    with torch.no_grad(), kv.replaying(model, policy, kv.Layout(PROMPT, (0,), context)):
        model(ids[:, :PROMPT - 1], **past)
        return torch.stack([model(ids[:, t:t + 1], position_ids=torch.tensor([[t]]), **past).logits[0, -1]
                            for t in range(PROMPT - 1, ids.shape[1] - 1)])


CASES = {  # name -> (kvpress's press, transcribed; headscope's policy under kvpress's convention)
    "SnapKVPress(0.5, window 8, kernel 5)": (snapkv(0.5, 8, 5),
                                            lambda: kv.SnapSelection(None, 0, 8, 5, "avg", ratio=0.5)),
    "SnapKVPress(0.75, window 8, kernel 3)": (snapkv(0.75, 8, 3),
                                             lambda: kv.SnapSelection(None, 0, 8, 3, "avg", ratio=0.75)),
    "StreamingLLMPress(0.6, n_sink 4)": (streaming(0.6, 4),
                                         lambda: kv.ContextWindow({}, 4, lambda c: int(c * (1 - 0.6)) - 4)),
    "DuoAttentionPress(0.5, sink 3, recent 10)": (duo(0.5, 3, 10),
                                                  lambda: kv.ContextWindow(duo_full_heads(0.5), 3, 10)),
}


@pytest.mark.parametrize("name", CASES)
def test_kvpress_convention_equals_kvpress_presses(name):
    press, policy = CASES[name]
    ids = tokens()
    expected = reference_logits(press, ids)
    assert (replayed_logits(policy(), ids) - expected).abs().max() < 1e-5
    # headscope's own convention (the whole prompt compressed, the question with it) is another cache
    assert (replayed_logits(policy(), ids, context=None) - expected).abs().max() > 1e-3


def test_the_share_kept_counts_the_compressed_context_and_the_question_whole():
    """kvpress's ratio is of the context; the share is of the prompt's cache: (kept context + question) / prompt."""
    ids = tokens()
    snap = kv.SnapSelection(None, 0, 8, 5, "avg", ratio=0.5)
    replayed_logits(snap, ids)
    assert snap.shares() == [pytest.approx((int(CONTEXT * 0.5) + QUESTION) / PROMPT)]
    window = kv.ContextWindow(duo_full_heads(0.5), 3, 10)
    replayed_logits(window, ids)
    assert window.shares() == [pytest.approx((2 * PROMPT + 2 * (3 + 10 + QUESTION)) / (4 * PROMPT))]


@pytest.mark.parametrize("name", ["SnapKVPress(0.5, window 8, kernel 5)", "DuoAttentionPress(0.5, sink 3, recent 10)"])
def test_a_left_padded_batch_compresses_each_context_as_alone(name):
    """Contexts of different lengths in one batch: each prompt is cut at its own context's end."""
    torch.manual_seed(6)
    prompts = [torch.randint(4, 256, (length,)).tolist() for length in (PROMPT, PROMPT - 9)]
    contexts = (CONTEXT, CONTEXT - 7)
    model = tiny_model("llama", num_layers=2)
    recorder.install(model)
    batched = padded_logits(model, CASES[name][1](), prompts, context=contexts)
    for index, prompt in enumerate(prompts):
        alone = padded_logits(model, CASES[name][1](), [prompt], context=contexts[index:index + 1])
        assert (alone - batched[index:index + 1]).abs().max() < 1e-5
