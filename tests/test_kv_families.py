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

from headscope.attention import kv, recorder
from headscope.families import recipes
from headscope.attention.caches import fresh_cache
from test_kv import padded_logits

REFERENCE = {}  # the reference attention's current cache (tests only)
VOCAB = 256


class ReducedCache:
    """Per layer and KV head the positions kept; `now`: the position of the last token the current pass feeds (set
    by the driver). Every call attends over the positions its KV head keeps, with the call's own values, masked by
    the model's own mask -- the chunk, the indexer's selection."""

    def __init__(self):
        self.held = {}  # (layer, KV head) -> kept positions
        self.fed = {}  # layer -> the position its cache last took
        self.now = 0

    def attend(self, module, query, key, value, attention_mask, rule):
        layer, kv_heads, kv_len = module.layer_idx, key.shape[1], key.shape[2]
        first_key = self.now + 1 - kv_len  # the model's own cache may hold only its last keys (a chunked layer)
        group = query.shape[1] // kv_heads
        output = torch.zeros(1, 1, query.shape[1], value.shape[-1], dtype=value.dtype)
        for head in range(query.shape[1]):
            index = torch.tensor([p - first_key for p in self.held[(layer, head // group)] if p >= first_key])
            logits = query[0, head, -1].float() @ key[0, head // group, index].float().T * rule["scaling"]
            if attention_mask is not None:
                logits = logits.masked_fill(~attention_mask[0, 0, -1, index - kv_len + attention_mask.shape[-1]],
                                            float("-inf"))
            output[0, 0, head] = torch.softmax(logits, -1).to(value.dtype) @ value[0, head // group, index]
        return output


class StreamingCache(ReducedCache):
    """DuoAttention's cache, fed one token per pass: a streaming KV head keeps its first `sink` and last `recent`
    positions, a full one (`full`: {layer: KV heads}) all."""

    def __init__(self, full, sink, recent):
        super().__init__()
        self.full, self.sink, self.recent = full, sink, recent

    def forward(self, module, query, key, value, attention_mask, rule):
        layer = module.layer_idx
        assert query.shape[2] == 1  # one token per pass
        if self.fed.get(layer) != self.now:  # the layer's first call in this pass: the cache takes the token
            self.fed[layer] = self.now
            for head in range(key.shape[1]):
                held = self.held.setdefault((layer, head), [])
                held.append(self.now)
                if head not in self.full.get(layer, ()):
                    held[:] = [p for p in held if p < self.sink or self.now - p < self.recent]
        return self.attend(module, query, key, value, attention_mask, rule)


class SnapCache(ReducedCache):
    """SnapKV's cache: the prompt read in one pass with full attention (the model's mask); then each KV head keeps
    the `budget` prefix positions with the most max-pooled votes of the last `window` queries (each query head's,
    averaged over the KV head's query heads; ties: the earlier position), the window, and every later token."""

    def __init__(self, budget, window, kernel):
        super().__init__()
        self.budget, self.window, self.kernel = budget, window, kernel

    def forward(self, module, query, key, value, attention_mask, rule):
        layer, length = module.layer_idx, query.shape[2]
        if length == 1:
            if self.fed.get(layer) != self.now:
                self.fed[layer] = self.now
                for head in range(key.shape[1]):
                    self.held[(layer, head)].append(self.now)
            return self.attend(module, query, key, value, attention_mask, rule)
        group = query.shape[1] // key.shape[1]
        keys, values = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        logits = query.float() @ keys.float().transpose(-1, -2) * rule["scaling"]
        visible = torch.ones(length, length, dtype=torch.bool).tril()
        if attention_mask is not None:
            visible = visible & attention_mask[0, 0]
        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1)
        if layer not in self.fed:  # DiffLlama's second call: the same rows, selected already
            self.fed[layer] = length - 1
            prefix = length - self.window
            votes = probs[0, :, -self.window:, :prefix].sum(1)  # (query heads, prefix)
            pooled = torch.nn.functional.max_pool1d(votes[None], self.kernel, padding=self.kernel // 2, stride=1)[0]
            for head, scores in enumerate(pooled.view(key.shape[1], group, prefix).mean(1)):
                order = sorted(range(prefix), key=lambda p: (-float(scores[p]), p))
                self.held[(layer, head)] = sorted(order[:self.budget]) + list(range(prefix, length))
        return (probs.to(values.dtype) @ values).transpose(1, 2)


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


def reference_logits(model_type, cache, ids, prompt=1):
    """The reduced cache's logits: the first `prompt` tokens in one pass, then one token per pass; from the
    prompt's last position on."""
    model = model_of(model_type)
    model.set_attn_implementation("test_kv_families")
    REFERENCE["cache"], past = cache, fresh_cache(model)
    with torch.no_grad():
        cache.now = prompt - 1
        logits = [model(ids[:, :prompt], **past).logits[0, -1]]
        for t in range(prompt, ids.shape[1]):
            cache.now = t
            logits.append(model(ids[:, t:t + 1], position_ids=torch.tensor([[t]]), **past).logits[0, -1])
    return torch.stack(logits)


def replayed_logits(model_type, policy, ids, steps=True):
    """headscope's: the whole sequence in one pass (steps False), or the engine's way -- the prompt but its last
    token in one pass, then one token at a time -- from the last prompt token on (the prompt's last token then
    reads the full cache, as SnapKV's selection has not happened yet)."""
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
def test_snapkv_equals_a_cache_compressed_after_the_prompt(model_type):
    """One selection per KV head from the window's rows as the model's mask shows them, and decoding steps over
    the kept entries as the mask shows them (Llama 4: past the prompt's last chunk)."""
    ids = tokens()
    expected = reference_logits(model_type, SnapCache(6, 8, 5), ids, PROMPT)
    policy = kv.SnapSelection(torch.full((recipes.LAYERS, 2), 6), 6, 8, 5)
    replayed = replayed_logits(model_type, policy, ids)
    assert (replayed - expected).abs().max() < 1e-4
    assert (replayed - plain_logits(model_type, ids)[PROMPT - 1:]).abs().max() > 1e-2  # the policy changes the model


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


@pytest.mark.parametrize("model_type", ["diffllama", "llama4_text"])
def test_the_family_sweeps_kv_check(model_type, tmp_path):
    """The sweep's step 4 (sweep.kv_replay_check) on the saved type: the replay against the model's own eager
    attention with the keys outside the window masked out."""
    from headscope.families import sweep

    tokenizer = sweep.sweep_tokenizer()
    model, why = sweep.build(model_type, len(tokenizer))
    assert model is not None, why
    assert sweep.kv_replay_check(sweep.save(model, model_type, tokenizer, tmp_path)).startswith("exact")
