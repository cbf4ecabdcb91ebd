"""Prefill rows, delivered block by block, and full decoding rows equal eager attention's rows, every
wanted query position exactly once: grouped-query (Llama), sliding-window (Mistral), soft-capped
(Gemma 2) and plain multi-head (GPT-2) attention."""
import pytest
import torch

from headscope.attention import recorder
from headscope.detection.decode import StopRule, greedy_decode
from headscope.scorers import Scorer
from headscope.families.toy import tiny_model

PROMPT_LEN = 60  # past Mistral's sliding window (24)


class RowCollector(Scorer):
    """Keeps every row it is handed: {(layer, position): (batch, heads, kv_len)}."""

    full_rows = True

    def __init__(self, start):
        self.start = start
        self.rows, self.step_rows_seen = {}, []

    def prefill_queries(self):
        return self.start, self.batch.prompt_len

    def prefill_rows(self, layer, query_start, probs):
        assert probs.dtype == torch.float32 and probs.shape[2] <= recorder.PREFILL_BLOCK
        for r in range(probs.shape[2]):
            key = (layer, query_start + r)
            assert key not in self.rows, f"row {key} delivered twice"
            self.rows[key] = probs[:, :, r].clone()

    def step_rows(self, layer, probs, offset):
        self.step_rows_seen.append((layer, offset, probs.clone()))

    def step(self, view):
        pass


def eager_attentions(family, input_ids):
    model = tiny_model(family, attn="eager")
    with torch.no_grad():
        return model(input_ids, output_attentions=True).attentions


def run(family, input_ids, attention_mask, start, steps=3):
    from headscope.scorers import PromptBatch

    model = tiny_model(family)
    assert recorder.install(model)
    collector = RowCollector(start)
    batch = PromptBatch(input_ids, input_ids.shape[1], torch.zeros(len(input_ids), dtype=torch.long),
                        torch.zeros(len(input_ids), dtype=torch.long))
    collector.begin(batch, model.config.num_hidden_layers, model.config.num_attention_heads)
    generated = greedy_decode(model, input_ids, attention_mask, [collector], steps, StopRule(set(), set()))
    return collector, generated


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gpt2"])
def test_prefill_rows_equal_eager_rows(family, monkeypatch):
    monkeypatch.setattr(recorder, "PREFILL_BLOCK", 7)  # several blocks, one ragged
    torch.manual_seed(1)
    input_ids = torch.randint(4, 256, (1, PROMPT_LEN))
    collector, generated = run(family, input_ids, None, start=3)
    layers = len(eager_attentions(family, input_ids))
    assert set(collector.rows) == {(l, p) for l in range(layers) for p in range(3, PROMPT_LEN)}
    full = torch.cat([input_ids, torch.tensor([generated[0][:-1]])], dim=1)
    attentions = eager_attentions(family, full)
    for (layer, position), row in collector.rows.items():
        expected = attentions[layer][:, :, position, : position + 1]
        torch.testing.assert_close(row[..., : position + 1], expected, atol=1e-5, rtol=0)
        assert not row[..., position + 1:].any()  # later keys are invisible
    # full decoding rows: step s is the row of position PROMPT_LEN - 1 + s, keys from `offset`
    assert len(collector.step_rows_seen) == 3 * layers
    for i, (layer, offset, row) in enumerate(collector.step_rows_seen):
        position = PROMPT_LEN - 1 + i // layers
        expected = attentions[layer][:, :, position, offset: position + 1]
        torch.testing.assert_close(row, expected, atol=1e-5, rtol=0)


def test_prefill_rows_of_a_left_padded_batch_equal_each_prompts_eager_rows(monkeypatch):
    monkeypatch.setattr(recorder, "PREFILL_BLOCK", 16)
    torch.manual_seed(2)
    long, short = torch.randint(4, 256, (PROMPT_LEN,)), torch.randint(4, 256, (PROMPT_LEN - 9,))
    input_ids = torch.full((2, PROMPT_LEN), 1)
    mask = torch.zeros(2, PROMPT_LEN, dtype=torch.long)
    input_ids[0], mask[0] = long, 1
    input_ids[1, 9:], mask[1, 9:] = short, 1
    collector, _ = run("llama", input_ids, mask, start=20, steps=1)
    for b, (prompt, pad) in enumerate([(long, 0), (short, 9)]):
        attentions = eager_attentions("llama", prompt[None])
        for (layer, position), row in collector.rows.items():
            expected = attentions[layer][0, :, position - pad, : position - pad + 1]
            torch.testing.assert_close(row[b, :, pad: position + 1], expected, atol=1e-5, rtol=0)
            assert not row[b, :, :pad].any()
