"""Planted heads: checks of the detectors that do not depend on any training luck.

The model is forced to write the needle answer, and one chosen head's recorded row is forced
onto the needle position holding the token written at that step: the retrieval detector must
rank exactly that head first, with score 1.0. Likewise a head forced onto the generated tokens
must top the reasoning ranking.
"""
import pytest
import torch

import headscope
from headscope.attention import recorder
from headscope.runs.outputs import ranked

PLANTED = (1, 2)  # layer, head


@pytest.fixture
def forced(toy_dir, monkeypatch):
    """The toy model, made to write `forced.answer` (then EOS), with PLANTED's row set by `forced.plant`."""
    loaded = headscope.load(str(toy_dir))
    model, tokenizer = loaded.model, loaded.tokenizer
    state = {"step": 0, "prompt_len": None, "answer": [], "plant": None}

    def force_tokens(module, args, kwargs, output):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids.shape[1] > 1:  # the prefill: a new sample starts
            state["step"], state["prompt_len"] = 0, input_ids.shape[1] + 1
            return
        written = state["answer"] + [tokenizer.eos_token_id]
        logits = torch.full_like(output.logits[:, -1], -1e9)
        logits[:, written[min(state["step"], len(written) - 1)]] = 0
        output.logits[:, -1] = logits
        state["step"] += 1

    model.register_forward_hook(force_tokens, with_kwargs=True)
    original_add = recorder.Recorder.add

    def planted_add(self, layer, probs):
        if layer == PLANTED[0]:
            step = self.seq_len - state["prompt_len"]
            probs = probs.clone()
            probs[:, PLANTED[1]] = 0
            probs[:, PLANTED[1], state["plant"](step, self.seq_len)] = 1.0
        original_add(self, layer, probs)

    monkeypatch.setattr(recorder.Recorder, "add", planted_add)
    state["loaded"] = loaded
    return state


def test_planted_retrieval_head_ranks_first_with_score_one(forced, data_dir, tmp_path):
    needles = headscope.tasks.retrieval.load_needles(data_dir / "needles.jsonl")
    tokenizer = forced["loaded"].tokenizer
    forced["answer"] = tokenizer(needles[0]["real_needle"], add_special_tokens=False).input_ids
    spans = {}
    forced["plant"] = lambda step, seq_len: spans["start"] + min(step, len(forced["answer"]) - 1)
    original_encode = headscope.detection.engine.encode_with_span

    def remember_span(*args):
        encoded = original_encode(*args)
        spans["start"] = encoded.span[0]
        return encoded

    headscope.detection.engine.encode_with_span = remember_span
    try:
        result = headscope.detect("retrieval", loaded=forced["loaded"], out=str(tmp_path), quiet=True,
                                  haystack=str(data_dir / "haystack"), needles=str(data_dir / "needles.jsonl"),
                                  context_lengths=[300], depths=[50], max_new_tokens=40,
                                  check=False)  # the planted rows are wrong on purpose: the check would refuse
    finally:
        headscope.detection.engine.encode_with_span = original_encode
    assert result.counts["passed"] == 1
    (best, stats), (_, second) = ranked(result.summary)[:2]
    assert best == f"{PLANTED[0]}-{PLANTED[1]}"
    assert stats["mean"] == pytest.approx(1.0, abs=1e-6)
    assert second["mean"] < 0.5


def test_planted_reasoning_head_ranks_first(forced, data_dir, tmp_path):
    tokenizer = forced["loaded"].tokenizer
    forced["answer"] = tokenizer("red is the key", add_special_tokens=False).input_ids
    forced["plant"] = lambda step, seq_len: seq_len - 1  # the token just fed: generated from step 1 on
    result = headscope.detect("reasoning", loaded=forced["loaded"], out=str(tmp_path), quiet=True,
                              data=str(data_dir / "reasoning.json"), success_threshold=-1, check=False)
    best, stats = ranked(result.summary)[0]
    assert best == f"{PLANTED[0]}-{PLANTED[1]}"
    assert stats["mean"] == pytest.approx(len(forced["answer"]), abs=1e-5)  # 1 per step after the first
