"""KV cache policies (kv.py) against a reference whose cache really holds only the kept entries.

The reference is an attention function with its own cache: per layer and head, a list of (position, key, value)
entries, appended as tokens arrive and evicted as the policy says. Keys come from the model (RoPE already applied at
their own positions), so the reduced cache has the same positions as the full one. DuoAttention's reference feeds
every token alone (a streaming head's cache is trimmed before every query); SnapKV's prefills the prompt with full
attention, selects each head's entries from the observation window's attention, then decodes one token at a time.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from headscope.attention import kv, recorder
from headscope.detection.decode import fresh_cache, positions_of
from headscope.families.toy import tiny_model

REFERENCE = {}  # the reference attention's current cache (tests only)


class ReducedCache:
    """A real per-head cache: entries[(layer, head)] = [(position, key, value), ...] holding only what is kept."""

    def __init__(self, unit_of_query_head):
        self.entries = {}
        self.position = {}  # layer -> position of the next token
        self.unit = unit_of_query_head  # (query head, group) -> the cache unit it reads (its KV head, or itself)

    def attend(self, module, query, group, rule):
        """Each query head's output over its own unit's entries (float32 softmax, the model's rule)."""
        heads, dim = query.shape[1], query.shape[-1]
        output = torch.zeros(1, 1, heads, dim, dtype=query.dtype)
        for head in range(heads):
            entries = self.entries[(module.layer_idx, self.unit(head, group))]
            key = torch.stack([k for _, k, _ in entries]).float()
            value = torch.stack([v for _, _, v in entries])
            logits = query[0, head, -1].float() @ key.T * rule["scaling"]
            if rule.get("softcap"):
                logits = torch.tanh(logits / rule["softcap"]) * rule["softcap"]
            if rule.get("s_aux") is not None:
                probs = torch.softmax(torch.cat([logits, rule["s_aux"][head].float()[None]]), -1)[:-1]
            else:
                probs = torch.softmax(logits, -1)
            output[0, 0, head] = probs.to(value.dtype) @ value
        return output


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    return REFERENCE["cache"].forward(module, query, key, value, dict(kwargs, scaling=scaling))


AttentionInterface.register("test_kv_reference", reference_attention)
AttentionMaskInterface.register("test_kv_reference", sdpa_mask)


class StreamingReference(ReducedCache):
    """DuoAttention: fed one token at a time; a streaming KV head evicts all but its sinks and last `recent`."""

    def __init__(self, full, sink, recent):
        super().__init__(lambda head, group: head // group)
        self.full, self.sink, self.recent = full, sink, recent

    def forward(self, module, query, key, value, rule):
        layer, (_, kv_heads, _, _) = module.layer_idx, key.shape
        assert query.shape[2] == 1  # one token at a time
        now = self.position.get(layer, 0)
        self.position[layer] = now + 1
        for head in range(kv_heads):
            entries = self.entries.setdefault((layer, head), [])
            entries.append((now, key[0, head, -1], value[0, head, -1]))
            if head not in self.full.get(layer, ()):
                entries[:] = [e for e in entries if e[0] < self.sink or now - e[0] < self.recent]
            if rule.get("sliding_window"):  # the model's own window evicts too
                entries[:] = [e for e in entries if now - e[0] < rule["sliding_window"]]
        return self.attend(module, query, query.shape[1] // kv_heads, rule), None


class SnapReference(ReducedCache):
    """SnapKV / HeadKV: the prompt with full attention, then per cache the top-budget prefix keys + window; a cache
    per KV head (its query heads' pooled votes averaged, as kvpress's SnapKVPress) or, `per_query_head`, one per
    query head (HeadKV repeats the KV heads)."""

    def __init__(self, budgets, average, window, kernel, pooling, per_query_head=False):
        super().__init__((lambda head, group: head) if per_query_head else (lambda head, group: head // group))
        self.budgets, self.average, self.window, self.kernel, self.pooling = budgets, average, window, kernel, pooling
        self.per_query_head = per_query_head
        self.after_prompt = 0  # entries held once the prompt is read, every layer (within the model's window)
        self.model_cache = 0  # ... and the entries the model's own cache holds then: KV heads x the prompt's window

    def forward(self, module, query, key, value, rule):
        layer = module.layer_idx
        heads, length = query.shape[1], query.shape[2]
        group = heads // key.shape[1]
        if layer not in self.position:  # the prompt: full attention, then select
            self.position[layer] = length
            return self.prefill(module, query, key, value, rule), None
        now = self.position[layer]
        self.position[layer] = now + 1
        for unit in range(heads if self.per_query_head else key.shape[1]):
            kv_head = unit // group if self.per_query_head else unit
            entries = self.entries[(layer, unit)]
            entries.append((now, key[0, kv_head, -1], value[0, kv_head, -1]))
            if rule.get("sliding_window"):
                entries[:] = [e for e in entries if now - e[0] < rule["sliding_window"]]
        return self.attend(module, query, group, rule), None

    def prefill(self, module, query, key, value, rule):
        heads, length = query.shape[1], query.shape[2]
        group = heads // key.shape[1]
        keys, values = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        logits = query.float() @ keys.float().transpose(-1, -2) * rule["scaling"]
        if rule.get("softcap"):
            logits = torch.tanh(logits / rule["softcap"]) * rule["softcap"]
        i, j = torch.arange(length)[:, None], torch.arange(length)[None]
        visible = (j <= i) & ((i - j < rule["sliding_window"]) if rule.get("sliding_window") else True)
        logits = logits.masked_fill(~visible, float("-inf"))
        if rule.get("s_aux") is not None:
            sink = rule["s_aux"].float().view(1, -1, 1, 1).expand(1, heads, length, 1)
            probs = torch.softmax(torch.cat([logits, sink], -1), -1)[..., :-1]
        else:
            probs = torch.softmax(logits, -1)
        prefix = length - self.window
        votes = probs[0, :, -self.window:, :prefix].sum(1)  # (heads, prefix)
        pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
        pooled = pool(votes[None], self.kernel, padding=self.kernel // 2, stride=1)[0]
        if not self.per_query_head:  # one score per KV head: the mean over the query heads that read it
            pooled = pooled.view(key.shape[1], group, prefix).mean(1)
        for unit in range(len(pooled)):
            kv_head = unit // group if self.per_query_head else unit
            order = sorted(range(prefix), key=lambda p: (-float(pooled[unit, p]), p))  # ties: earlier first
            kept = order[:self.budgets[module.layer_idx][unit]] if prefix >= self.average else order
            self.entries[(module.layer_idx, unit)] = [(p, key[0, kv_head, p], value[0, kv_head, p])
                                                      for p in sorted(kept) + list(range(prefix, length))]
            window = rule.get("sliding_window") or length
            self.after_prompt += sum(length - 1 - p < window for p, _, _ in self.entries[(module.layer_idx, unit)])
        self.model_cache += key.shape[1] * min(length, rule.get("sliding_window") or length)
        return (probs.to(values.dtype) @ values).transpose(1, 2)


def reference_logits(family, cache, ids, prompt_len=None):
    """The reference's logits: at every position, feeding one token at a time (prompt_len None), or from the prompt's
    last position on after prefilling the prompt in one pass."""
    model = tiny_model(family, num_layers=2)
    model.set_attn_implementation("test_kv_reference")
    REFERENCE["cache"] = cache
    past = fresh_cache(model)
    with torch.no_grad():
        if prompt_len is None:
            return torch.stack([model(ids[:, t:t + 1], position_ids=torch.tensor([[t]]), **past).logits[0, -1]
                                for t in range(ids.shape[1])])
        logits = [model(ids[:, :prompt_len], **past).logits[0, -1]]
        logits += [model(ids[:, t:t + 1], position_ids=torch.tensor([[t]]), **past).logits[0, -1]
                   for t in range(prompt_len, ids.shape[1] - 1)]
        return torch.stack(logits)


def replayed_logits(family, policy, ids, prompt_len):
    """headscope: prompt[:-1] prefilled in one pass, then one token at a time (the engine's decode), under `policy`.
    Logits from the last prompt token on."""
    model = tiny_model(family, num_layers=2)
    recorder.install(model)
    past = fresh_cache(model)
    with torch.no_grad(), kv.replaying(model, policy, kv.Layout(prompt_len, (0,))):
        model(ids[:, :prompt_len - 1], **past)
        return torch.stack([model(ids[:, t:t + 1], position_ids=torch.tensor([[t]]), **past).logits[0, -1]
                            for t in range(prompt_len - 1, ids.shape[1] - 1)])


PROMPT = 50
CONTINUATION = [7, 19, 101, 33, 8, 64]
FAMILIES = ["llama", "mistral", "gpt_oss", "gemma2"]  # GQA; window 24 < prompt; sinks + windows; soft-capping


def tokens(seed=0):
    torch.manual_seed(seed)
    return torch.cat([torch.randint(4, 256, (1, PROMPT)), torch.tensor([CONTINUATION])], dim=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_heads_equal_a_cache_that_holds_only_sinks_and_recent(family, monkeypatch):
    monkeypatch.setattr(kv, "PREFILL_BLOCK", 8)  # several query blocks in the prefill
    ids = tokens()
    full, sink, recent = {0: {1}}, 3, 10  # layer 0's KV head 1 full; every other KV head streams
    expected = reference_logits(family, StreamingReference(full, sink, recent), ids)
    # The prompt and the continuation in one pass: every position's logits (the prefill's streaming mask) ...
    model = tiny_model(family, num_layers=2)
    recorder.install(model)
    with torch.no_grad(), kv.replaying(model, kv.StreamingHeads(full, sink, recent), kv.Layout(ids.shape[1], (0,))):
        whole = model(ids).logits[0]
    assert (whole - expected).abs().max() < 1e-5
    # ... and the engine's way: prefill, then single-token steps
    stepped = replayed_logits(family, kv.StreamingHeads(full, sink, recent), ids, PROMPT)
    assert (stepped - expected[PROMPT - 1:-1]).abs().max() < 1e-5
    unmasked = replayed_logits(family, kv.StreamingHeads({0: {0, 1}, 1: {0, 1}}, sink, recent), ids, PROMPT)
    assert (unmasked - stepped).abs().max() > 1e-3  # the policy changes the model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pooling,kernel,per_query_head", [("max", 3, False), ("avg", 5, False), ("max", 3, True)])
def test_snapkv_selection_equals_a_cache_compressed_after_the_prompt(family, pooling, kernel, per_query_head):
    ids = tokens(1)
    # (layers, caches): per KV head (2) or per query head (4); HeadKV's budgets differ per cache
    budgets = [[3, 9, 0, 17], [5, 5, 12, 1]] if per_query_head else [[3, 17], [12, 1]]
    reference = SnapReference(budgets, 6, 8, kernel, pooling, per_query_head)
    expected = reference_logits(family, reference, ids, PROMPT)
    policy = kv.SnapSelection(torch.tensor(budgets), 6, 8, kernel, pooling, per_query_head)
    replayed = replayed_logits(family, policy, ids, PROMPT)
    assert (replayed - expected).abs().max() < 1e-5
    unrestricted = replayed_logits(family, kv.SnapSelection(torch.full((2, 4), PROMPT), 6, 8, kernel,
                                                            per_query_head=True), ids, PROMPT)
    assert (unrestricted - replayed).abs().max() > 1e-3  # the policy changes the model
    # the share kept is of the model's own cache: KV heads x the prompt (or its window), every layer
    assert policy.shares()[0] * reference.model_cache == pytest.approx(reference.after_prompt)


def test_budgets_covering_the_prompt_and_every_head_full_change_nothing():
    ids = tokens(2)
    plain = replayed_logits("llama", kv.StreamingHeads({0: {0, 1}, 1: {0, 1}}, 0, 1), ids, PROMPT)
    snap = kv.SnapSelection(torch.full((2, 2), PROMPT), PROMPT, 8, 7)
    assert torch.equal(replayed_logits("llama", snap, ids, PROMPT), plain)
    assert snap.shares() == [1.0]
    window = kv.StreamingHeads({}, 4, PROMPT + len(CONTINUATION))
    assert torch.equal(replayed_logits("llama", window, ids, PROMPT), plain)


def padded_logits(model, policy, prompts, steps=4, context=None):
    """The engine's decode of left-padded prompts under `policy` (None: none; `context`: each prompt's context
    length, kvpress's convention); each step feeds the same token to every sample. Returns (batch, steps, vocab)
    logits."""
    width = max(len(prompt) for prompt in prompts)
    pad = tuple(width - len(prompt) for prompt in prompts)
    ids = torch.tensor([[1] * p + prompt for p, prompt in zip(pad, prompts)])
    mask = (torch.arange(width)[None] >= torch.tensor(pad)[:, None]).long()
    padded = any(pad)
    positions, past, logits = positions_of(mask), fresh_cache(model), []
    replay = kv.replaying(model, policy, kv.Layout(width, pad, context)) if policy else contextlib.nullcontext()
    with torch.no_grad(), replay:
        model(ids[:, :-1], attention_mask=mask[:, :-1] if padded else None, position_ids=positions[:, :-1], **past)
        token, position = ids[:, -1:], positions[:, -1:]
        for step in range(steps):
            logits.append(model(token, attention_mask=mask if padded else None, position_ids=position,
                                **past).logits[:, -1])
            token, position = torch.full_like(token, CONTINUATION[step]), position + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return torch.stack(logits, dim=1)


POLICIES = {
    "duo": lambda: kv.StreamingHeads({0: {1}}, 3, 10),
    "window at duo's memory": lambda: kv.StreamingHeads({}, 3, kv.matched_recent(4, 1, 3, 10)),
    "snapkv": lambda: kv.SnapSelection(torch.tensor([[3, 17], [12, 1]]), 6, 8, 3),
    "snapkv per query head": lambda: kv.SnapSelection(torch.tensor([[3, 9, 0, 17], [5, 5, 12, 1]]), 6, 8, 3,
                                                      per_query_head=True),
}


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("name", POLICIES)
def test_a_left_padded_batch_gives_each_prompt_what_it_gets_alone(family, name):
    """Sinks are the first real tokens, windows and budgets count real tokens, shares are per sample."""
    torch.manual_seed(3)
    prompts = [torch.randint(4, 256, (length,)).tolist() for length in (50, 37)]
    model = tiny_model(family, num_layers=2)
    recorder.install(model)
    together = POLICIES[name]()
    batched = padded_logits(model, together, prompts)
    for index, prompt in enumerate(prompts):
        alone = POLICIES[name]()
        assert (padded_logits(model, alone, [prompt]) - batched[index:index + 1]).abs().max() < 1e-5
        assert together.shares()[index] == pytest.approx(alone.shares()[0])
    # of the model's cache (a KV head's entries): a cache per query head may hold more than it (2 per KV head here)
    assert 0 < min(together.shares()) < (2 if "per query head" in name else 1)


def test_the_window_at_duos_memory_keeps_as_many_entries_as_duo():
    """matched_recent: every head streaming keeps what duo with K full heads keeps, to within rounding."""
    model = tiny_model("llama", num_layers=2)  # 2 layers x 2 KV heads
    recorder.install(model)
    prompt = [torch.randint(4, 256, (50,)).tolist()]
    duo, window = kv.StreamingHeads({0: {1}}, 3, 10), kv.StreamingHeads({}, 3, kv.matched_recent(4, 1, 3, 10))
    padded_logits(model, duo, prompt, 1), padded_logits(model, window, prompt, 1)
    assert duo.shares()[0] == pytest.approx((50 + 3 * 13) / (4 * 50))
    assert abs(window.shares()[0] - duo.shares()[0]) <= 0.5 / 50


def test_entries_are_chosen_once_per_prompt_and_a_step_gathers_only_the_kept_ones(monkeypatch):
    """SnapKV's selection runs once per layer and prompt; a decoding step gathers budget + window + generated
    entries per head, whatever the prompt's length (memory linear in the context, not in its square)."""
    selections, gathered = [], []
    select, attend = kv.SnapSelection.select, kv.attend
    monkeypatch.setattr(kv.SnapSelection, "select", lambda self, call: selections.append(call.layer) or
                        select(self, call))
    monkeypatch.setattr(kv, "attend", lambda call, heads, rows, positions, *rest: gathered.append(
        (call.key.shape[2], positions.shape[-1])) or attend(call, heads, rows, positions, *rest))
    model = tiny_model("llama", num_layers=2)
    recorder.install(model)
    for length in (50, 120):
        selections.clear(), gathered.clear()
        prompt = [torch.randint(4, 256, (length,)).tolist()]
        padded_logits(model, kv.SnapSelection(torch.full((2, 2), 5), 5, 8, 3), prompt, steps=4)
        assert selections == [0, 1]
        # steps 1-3 (step 0 is the prompt's last query, read in full): 5 kept + 8 window + the generated keys
        assert [m for _, m in gathered] == [5 + 8 + g for g in (1, 2, 3) for _ in range(2)]
        assert [kv_len for kv_len, _ in gathered] == [length + g for g in (1, 2, 3) for _ in range(2)]


def test_on_gqa_duo_and_snapkv_at_the_same_share_hold_the_same_number_of_entries():
    """One unit for every policy: the share of the model's own cache (KV heads x tokens). On a 4-query / 2-KV-head
    Llama (2 layers, 200 entries after a 50-token prompt), duo with one KV head full (50 + 3 x (3 + 11)) and SnapKV
    with 15 entries + a window of 8 per KV head (4 x 23) both report 92 / 200 and both references hold 92 entries;
    SnapKV per query head, 8 caches of 23, reports 184 / 200."""
    ids = tokens(4)
    duo_reference = StreamingReference({0: {1}}, 3, 11)
    reference_logits("llama", duo_reference, ids[:, :PROMPT])
    duo = kv.StreamingHeads({0: {1}}, 3, 11)
    replayed_logits("llama", duo, ids, PROMPT)
    held = {"duo": sum(len(entries) for entries in duo_reference.entries.values())}
    shares = {"duo": duo.shares()[0]}
    for name, per_query_head in (("snapkv", False), ("snapkv per query head", True)):
        budgets = torch.full((2, 4 if per_query_head else 2), 15)
        reference = SnapReference(budgets.tolist(), 15, 8, 7, "max", per_query_head)
        reference_logits("llama", reference, ids, PROMPT)
        snap = kv.SnapSelection(budgets, 15, 8, 7, per_query_head=per_query_head)
        replayed_logits("llama", snap, ids, PROMPT)
        held[name], shares[name] = reference.after_prompt, snap.shares()[0]
    assert held == {"duo": 92, "snapkv": 92, "snapkv per query head": 184}
    assert shares == {"duo": 92 / 200, "snapkv": 92 / 200, "snapkv per query head": 184 / 200}
