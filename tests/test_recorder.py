"""The recorded rows are eager attention's last rows, and the logits are eager's, for every family."""
import pytest
import torch
from transformers import DynamicCache

from headscope import recorder
from headscope.decode import StopRule, greedy_decode
from headscope.scorers import PromptBatch, Scorer
from headscope.toy import FAMILIES, tiny_model

PROMPT_LEN = 40
STEPS = 6


def decode_rows(model, input_ids, steps, eager_fallback=False):
    """Our decoding, returning the full recorded rows and the logits of each step."""
    num_layers = model.config.get_text_config().num_hidden_layers
    rec = recorder.Recorder(num_layers, top_k=1)
    step_rows, step_logits = [], []
    rows = {}
    rec.row_hooks.append(lambda layer, probs, offset: rows.__setitem__(layer, (probs, offset)))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids[:, : input_ids.shape[1] - steps - 1], cache=cache, use_cache=True)
        if eager_fallback:
            model.set_attn_implementation("eager")
        for s in range(steps):
            length = input_ids.shape[1] - steps + s  # feed the given continuation (teacher forcing)
            with recorder.recording(rec, seq_len=length):
                out = model(input_ids[:, length - 1 : length], cache=cache, use_cache=True,
                            output_attentions=eager_fallback)
            if eager_fallback:
                rec.add_eager_attentions(out.attentions)
            rec.take("cpu")
            full = torch.zeros(num_layers, *rows[0][0].shape[:2], length)
            for layer, (probs, offset) in rows.items():
                full[layer, ..., offset:] = probs
            step_rows.append(full)
            step_logits.append(out.logits[:, -1])
    return step_rows, step_logits


def eager_rows(family, input_ids, steps):
    model = tiny_model(family, attn="eager")
    rows, logits = [], []
    with torch.no_grad():
        out = model(input_ids, output_attentions=True)
    for s in range(steps):
        position = input_ids.shape[1] - steps + s - 1
        rows.append(torch.stack([a[:, :, position, : position + 1] for a in out.attentions]))
        logits.append(out.logits[:, position])
    return rows, logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rows_and_logits_equal_eager(family):
    model = tiny_model(family)
    assert recorder.install(model)
    torch.manual_seed(0)
    # Long enough to pass the sliding windows (24) of Mistral and Gemma 2.
    input_ids = torch.randint(4, 256, (1, PROMPT_LEN + STEPS))
    ours, our_logits = decode_rows(model, input_ids, STEPS)
    reference, reference_logits = eager_rows(family, input_ids, STEPS)
    for step in range(STEPS):
        assert (ours[step] - reference[step]).abs().max() <= 1e-5, f"step {step}"
        assert (our_logits[step] - reference_logits[step]).abs().max() <= 1e-4, f"step {step}"
        assert torch.allclose(ours[step].sum(-1), torch.ones(()), atol=1e-5)


def test_eager_fallback_rows_equal_interface_rows():
    """A model off the interface falls back to eager output_attentions on decoding steps only."""
    torch.manual_seed(0)
    input_ids = torch.randint(4, 256, (1, PROMPT_LEN + STEPS))
    on_interface = tiny_model("llama")
    recorder.install(on_interface)
    off_interface = tiny_model("llama")
    off_interface._supports_attention_backend = False
    assert not recorder.install(off_interface)
    ours, _ = decode_rows(on_interface, input_ids, STEPS)
    fallback, _ = decode_rows(off_interface, input_ids, STEPS, eager_fallback=True)
    for a, b in zip(ours, fallback):
        assert (a - b).abs().max() <= 1e-5


def test_sliding_window_rows_are_right_aligned():
    """Mistral's cache keeps only the window: positions must still be absolute, and zero outside it."""
    model = tiny_model("mistral")
    recorder.install(model)
    torch.manual_seed(1)
    input_ids = torch.randint(4, 256, (1, 60))
    rows, _ = decode_rows(model, input_ids, 2)
    window = model.config.sliding_window
    last = rows[-1]
    assert last[..., : last.shape[-1] - window].abs().max() == 0
    assert last[..., -window:].sum(-1).allclose(torch.ones(()))


def test_greedy_decode_matches_generate():
    """Our greedy loop (prefill all but one token, then single-query steps) picks generate()'s tokens."""
    model = tiny_model("qwen2")
    torch.manual_seed(3)
    input_ids = torch.randint(4, 256, (1, 30))
    expected = model.generate(input_ids, max_new_tokens=8, do_sample=False, eos_token_id=None)[0, 30:].tolist()
    recorder.install(model)

    class Nothing(Scorer):
        def step(self, view):
            pass

    scorer = Nothing()
    scorer.begin(PromptBatch(input_ids, 30, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)), 2, 4)
    tokens = greedy_decode(model, input_ids, None, [scorer], 8, StopRule(set(), set()))
    assert tokens[0] == expected
