"""KV cache policies on families whose attention is their own: two attention calls per layer (DiffLlama), a mask
that is not causal order (Llama 4's chunked attention, past the chunk; Qwen4-Exp's token selection).

The reference is a cache that really holds only the kept entries: per layer and KV head the positions kept,
fed one token per forward pass and trimmed as the policy says. Every attention call of a pass (DiffLlama makes
two, on the same query and key) attends over the entries its cache holds, masked by the model's own mask for
that token -- the chunk, the indexer's selection -- with its own values. headscope's replay must give the same
logits, whether it reads the sequence in one pass or the engine's way (prefill, then one token at a time).
"""
import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from headscope import kv, recipes, recorder
from headscope.caches import fresh_cache
from test_kv import padded_logits

REFERENCE = {}  # the reference attention's current cache (tests only)
VOCAB = 256


class StreamingCache:
    """DuoAttention's cache: a streaming KV head keeps its first `sink` and last `recent` positions, a full one
    (`full`: {layer: KV heads}) all. `now`: the position of the token the current pass feeds (set by the driver)."""

    def __init__(self, full, sink, recent):
        self.full, self.sink, self.recent = full, sink, recent
        self.held = {}  # (layer, KV head) -> kept positions
        self.fed = {}  # layer -> the position its cache last took
        self.now = 0

    def forward(self, module, query, key, value, attention_mask, rule):
        layer, kv_heads, kv_len = module.layer_idx, key.shape[1], key.shape[2]
        assert query.shape[2] == 1  # one token per pass
        first_key = self.now + 1 - kv_len  # the model's own cache may hold only its last keys (a chunked layer)
        if self.fed.get(layer) != self.now:  # the layer's first call in this pass: the cache takes the token
            self.fed[layer] = self.now
            for head in range(kv_heads):
                held = self.held.setdefault((layer, head), [])
                held.append(self.now)
                if head not in self.full.get(layer, ()):
                    held[:] = [p for p in held if p < self.sink or self.now - p < self.recent]
        group = query.shape[1] // kv_heads
        output = torch.zeros(1, 1, query.shape[1], value.shape[-1], dtype=value.dtype)
        for head in range(query.shape[1]):
            index = torch.tensor([p - first_key for p in self.held[(layer, head // group)] if p >= first_key])
            logits = query[0, head, 0].float() @ key[0, head // group, index].float().T * rule["scaling"]
            if attention_mask is not None:  # the model's own mask for this token: the chunk, the selection
                logits = logits.masked_fill(~attention_mask[0, 0, -1, index - kv_len + attention_mask.shape[-1]],
                                            float("-inf"))
            output[0, 0, head] = torch.softmax(logits, -1).to(value.dtype) @ value[0, head // group, index]
        return output


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    return REFERENCE["cache"].forward(module, query, key, value, attention_mask, dict(kwargs, scaling=scaling)), None


AttentionInterface.register("test_kv_families", reference_attention)
AttentionMaskInterface.register("test_kv_families", sdpa_mask)

# type -> config overrides: DiffLlama (two calls per layer), Llama 4 with a chunk of 8 (the prompt crosses it four
# times), Qwen4-Exp (its indexer selects 16 of the visible tokens, in blocks of 4)
FAMILIES = {"diffllama": {}, "llama4_text": {"attention_chunk_size": 8}, "qwen4_exp_text": {}}
PROMPT, STEPS = 30, 5


def model_of(model_type):
    return recipes.tiny_model(model_type, VOCAB, attn="sdpa", **FAMILIES[model_type])


def tokens():
    torch.manual_seed(0)
    return torch.randint(4, VOCAB, (1, PROMPT + STEPS))


def reference_logits(model_type, cache, ids):
    """Every position's logits from the reduced cache, fed one token per pass."""
    model = model_of(model_type)
    model.set_attn_implementation("test_kv_families")
    REFERENCE["cache"], past, logits = cache, fresh_cache(model), []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            cache.now = t
            logits.append(model(ids[:, t:t + 1], position_ids=torch.tensor([[t]]), **past).logits[0, -1])
    return torch.stack(logits)


def replayed_logits(model_type, policy, ids, steps=True):
    """headscope's: the whole sequence in one pass (steps False), or the engine's way -- the prompt but its last
    token in one pass, then one token at a time -- from the last prompt token on."""
    model = model_of(model_type)
    assert recorder.install(model)
    past = fresh_cache(model)
    with torch.no_grad(), kv.replaying(model, policy, kv.Layout(PROMPT if steps else ids.shape[1], (0,))):
        if not steps:
            return model(ids, **past).logits[0]
        model(ids[:, :PROMPT - 1], **past)
        return torch.stack([model(ids[:, t:t + 1], position_ids=torch.tensor([[t]]), **past).logits[0, -1]
                            for t in range(PROMPT - 1, ids.shape[1])])


def plain_logits(model_type, ids):
    model = model_of(model_type)
    with torch.no_grad():
        return model(ids).logits[0]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_streaming_equals_a_cache_that_holds_only_sinks_and_recent(model_type, monkeypatch):
    monkeypatch.setattr(kv, "PREFILL_BLOCK", 8)  # several query blocks in the one-pass prefill
    ids, sink, recent = tokens(), 3, 10
    expected = reference_logits(model_type, StreamingCache({}, sink, recent), ids)
    whole = replayed_logits(model_type, kv.StreamingHeads({}, sink, recent), ids, steps=False)
    assert (whole - expected).abs().max() < 1e-4
    stepped = replayed_logits(model_type, kv.StreamingHeads({}, sink, recent), ids)
    assert (stepped - expected[PROMPT - 1:]).abs().max() < 1e-4
    assert (expected - plain_logits(model_type, ids)).abs().max() > 1e-2  # the policy changes the model


@pytest.mark.parametrize("model_type", FAMILIES)
def test_a_policy_that_keeps_everything_equals_the_model(model_type):
    """A window as long as the sequence changes nothing, in one pass and the engine's way (DiffLlama's second call
    of a pass is the same pass, not one further on)."""
    ids = tokens()
    plain = plain_logits(model_type, ids)
    everything = replayed_logits(model_type, kv.StreamingHeads({}, 2, PROMPT + STEPS), ids)
    assert (everything - plain[PROMPT - 1:]).abs().max() < 1e-4
    whole = replayed_logits(model_type, kv.StreamingHeads({}, 2, PROMPT + STEPS), ids, steps=False)
    assert (whole - plain).abs().max() < 1e-4
    prompts = [ids[0, :PROMPT].tolist(), ids[0, :PROMPT - 9].tolist()]  # left-padded by 9: sinks are real tokens
    model = model_of(model_type)
    assert recorder.install(model)
    padded = padded_logits(model, kv.StreamingHeads({}, 2, PROMPT + STEPS), prompts)
    assert (padded - padded_logits(model, None, prompts)).abs().max() < 1e-4
