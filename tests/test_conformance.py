"""The conformance matrix: headscope is exact on every family of `headscope.families.toy.FAMILIES`, at 4 layers
(an error in layer 0's cache shows in later layers' rows and in the tokens, not in a 2-layer model's logits).

Per family:
  rows    the recorded rows of decoding steps equal eager attention's rows (float32, <= 1e-5), logits <= 1e-4;
  tokens  greedy tokens with headscope installed (its decode loop, scorers attached) equal eager `generate`;
  batch   a left-padded batch gives each prompt's batch-size-1 tokens, and scores within 1e-5;
  bf16    a bfloat16 model's recorded rows equal a float32 recomputation, written here from eager attention's
          maths, from the same bf16 queries and keys (<= 1e-5).
"""
import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from headscope.attention import recorder
from headscope.detection.decode import StopRule, fresh_cache, greedy_decode, num_layers_and_heads
from headscope.scorers import PromptBatch, ReasoningScorer, RetrievalScorer
from headscope.families.toy import FAMILIES, tiny_model

LAYERS = 4
PROMPT_LEN = 40  # past the sliding windows (24) of Mistral, Starcoder2, Gemma 2/3 and GPT-OSS
STEPS = 6


def models(family, dtype=torch.float32, **shape):
    """(eager model, the same weights with headscope installed)."""
    eager = tiny_model(family, attn="eager", num_layers=LAYERS, **shape).to(dtype)
    ours = tiny_model(family, num_layers=LAYERS, **shape).to(dtype)
    ours.load_state_dict(eager.state_dict())
    assert recorder.install(ours)
    return eager, ours


def recorded_rows(model, input_ids, steps):
    """Teacher-forced decoding steps over input_ids' last `steps` tokens: each step's full rows
    (layers, batch, heads, length) and logits."""
    layers, _ = num_layers_and_heads(model)
    rec = recorder.Recorder(layers, top_k=1)
    seen = {}
    rec.row_hooks.append(lambda layer, probs, offset: seen.__setitem__(layer, (probs, offset)))
    cache = fresh_cache(model)
    rows, logits = [], []
    with torch.no_grad():
        model(input_ids[:, : input_ids.shape[1] - steps], **cache)
        for s in range(steps):
            length = input_ids.shape[1] - steps + s + 1
            with recorder.recording(model, rec, seq_len=length):
                out = model(input_ids[:, length - 1:length], **cache)
            rec.take("cpu")
            full = torch.zeros(layers, *seen[0][0].shape[:2], length)
            for layer, (probs, offset) in seen.items():
                full[layer, ..., offset:] = probs.float()
            rows.append(full)
            logits.append(out.logits[:, -1].float())
    return rows, logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rows_and_logits_equal_eager(family):
    eager, ours = models(family)
    torch.manual_seed(0)
    input_ids = torch.randint(4, 256, (1, PROMPT_LEN + STEPS))
    rows, logits = recorded_rows(ours, input_ids, STEPS)
    with torch.no_grad():
        reference = eager(input_ids, output_attentions=True)
    for s in range(STEPS):
        query = PROMPT_LEN + s
        expected = torch.stack([a[:, :, query, : query + 1] for a in reference.attentions])
        assert (rows[s] - expected).abs().max() <= 1e-5, f"step {s}"
        assert (logits[s] - reference.logits[:, query]).abs().max() <= 1e-4, f"step {s}"


def scorers_for(input_ids, span):
    """The retrieval and reasoning scorers on a batch whose span is `span` (padded coordinates, per sample)."""
    span = torch.tensor(span).T  # (2, batch)
    batch = PromptBatch(input_ids, input_ids.shape[1], span[0], span[1],
                        torch.zeros(len(input_ids), dtype=torch.long))
    scorers = [RetrievalScorer(), ReasoningScorer()]
    return batch, scorers


def decode_with_scorers(model, input_ids, attention_mask, span, steps=STEPS):
    batch, scorers = scorers_for(input_ids, span)
    if attention_mask is not None:
        batch.pad = (attention_mask == 0).sum(-1)
    layers, heads = num_layers_and_heads(model)
    for scorer in scorers:
        scorer.begin(batch, layers, heads)
    tokens = greedy_decode(model, input_ids, attention_mask, scorers, steps, StopRule(set(), set()))
    return tokens, [scorer.result() for scorer in scorers]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_tokens_equal_eager_generate(family):
    eager, ours = models(family)
    torch.manual_seed(1)
    input_ids = torch.randint(4, 256, (1, PROMPT_LEN))
    expected = eager.generate(input_ids, max_new_tokens=STEPS, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, PROMPT_LEN:].tolist()
    tokens, _ = decode_with_scorers(ours, input_ids, None, [(5, 30)])
    assert tokens[0] == expected


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_left_padded_batch_equals_batch_size_one(family):
    _, ours = models(family, vocab_size=16)
    torch.manual_seed(2)
    lengths = [PROMPT_LEN, PROMPT_LEN - 9, PROMPT_LEN - 3]
    # A small vocabulary, so that heads land on span tokens equal to the written one: retrieval scores > 0.
    prompts = [torch.randint(0, 16, (n,)) for n in lengths]
    spans = [(2, n - 4) for n in lengths]
    width = max(lengths)
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt):] = prompt
        attention_mask[i, width - len(prompt):] = 1
    padded_spans = [(a + width - n, b + width - n) for (a, b), n in zip(spans, lengths)]
    tokens, scores = decode_with_scorers(ours, input_ids, attention_mask, padded_spans)
    assert scores[0].sum() > 0, "retrieval scores are all zero: the comparison would be empty"
    for i, prompt in enumerate(prompts):
        alone_tokens, alone_scores = decode_with_scorers(ours, prompt[None], None, [spans[i]])
        assert tokens[i] == alone_tokens[0], f"sample {i}"
        for batched, alone in zip(scores, alone_scores):
            assert (batched[i] - alone[0]).abs().max() <= 1e-5, f"sample {i}"


def reference_probs(query, key, attention_mask, scaling, softcap=None, sliding_window=None, s_aux=None, **_):
    """Eager attention's maths for the last query, in float32 from the given (bf16) q and k: (batch, heads, kv)."""
    group = query.shape[1] // key.shape[1]
    key = key.float().repeat_interleave(group, dim=1)
    logits = (query[:, :, -1:].float() @ key.transpose(-1, -2))[:, :, 0] * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    kv_len = key.shape[2]
    visible = torch.ones(kv_len, dtype=torch.bool)
    if sliding_window is not None:
        visible[: kv_len - sliding_window] = False
    if attention_mask is not None:
        visible = visible & attention_mask[:, 0, -1, -kv_len:]
    logits = logits.masked_fill(~visible, float("-inf"))
    if s_aux is not None:
        sink = s_aux.float().view(1, -1, 1).expand(logits.shape[0], -1, 1)
        return torch.softmax(torch.cat([logits, sink], -1), -1)[..., :-1]
    return torch.softmax(logits, -1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_rows_equal_float32_recomputation(family):
    _, ours = models(family, torch.bfloat16)
    headscope_attention = AttentionInterface._global_mapping[recorder.ATTN_SDPA]
    expected = {}

    def spy(module, query, key, value, attention_mask, **kwargs):
        if query.shape[2] == 1:
            expected[module.layer_idx] = reference_probs(query, key, attention_mask, **kwargs)
        return headscope_attention(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("test_spy", spy)
    AttentionMaskInterface.register("test_spy", sdpa_mask)
    ours.set_attn_implementation("test_spy")
    torch.manual_seed(3)
    input_ids = torch.randint(4, 256, (1, PROMPT_LEN + 2))
    rows, _ = recorded_rows(ours, input_ids, 2)
    for layer in range(LAYERS):
        row, kv_len = rows[-1][layer], expected[layer].shape[-1]  # a window's cache may keep only the window
        assert (row[..., -kv_len:] - expected[layer]).abs().max() <= 1e-5, f"layer {layer}"
        assert (row[..., : row.shape[-1] - kv_len] == 0).all()
