"""The recorder's own paths: the eager fallback, sliding-window alignment. (Every family against eager
attention: test_conformance.py.)"""
import torch
from transformers import DynamicCache

from headscope.attention import recorder
from headscope.families.toy import tiny_model

from conftest import refuse_headscope_attention

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
            with recorder.recording(model, rec, seq_len=length):
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


def test_eager_fallback_rows_equal_interface_rows():
    """A model off the interface falls back to eager output_attentions on decoding steps only."""
    torch.manual_seed(0)
    input_ids = torch.randint(4, 256, (1, PROMPT_LEN + STEPS))
    on_interface = tiny_model("llama")
    recorder.install(on_interface)
    off_interface = tiny_model("llama")
    refuse_headscope_attention(off_interface)
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
