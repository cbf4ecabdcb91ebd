"""Fast tests of the model organism: synthetic-world generators, tokenizer, bundled data, checkpoint."""

import json
import random
from pathlib import Path

import pytest

from headscope.organism import CHECKPOINT_DIR, synth
from headscope.organism import train as org_train

DATA_DIR = Path(synth.__file__).resolve().parent.parent / "data"


@pytest.fixture(scope="module")
def tokenizer():
    return org_train.build_tokenizer()


def test_filler_deterministic_and_sentences():
    a = synth.filler_text(random.Random(3), 200)
    b = synth.filler_text(random.Random(3), 200)
    assert a == b
    assert a != synth.filler_text(random.Random(4), 200)
    assert a.endswith(" .")
    assert len(a.split()) >= 200
    assert a == a.lower()


def test_needles():
    rng = random.Random(0)
    for _ in range(50):
        n = synth.make_needle(rng)
        assert n["real_needle"] in n["needle"]
        assert 2 <= len(n["real_needle"].split()) <= 5
        assert n["question"].endswith("?")
        assert n["needle"].endswith(" .")
        # the value is not guessable from the question
        assert not set(n["real_needle"].split()) & set(n["question"].split())
    assert synth.make_needle(random.Random(1)) == synth.make_needle(random.Random(1))


def test_reasoning_problems():
    rng = random.Random(0)
    for _ in range(50):
        p = synth.make_reasoning(rng, min_hops=2)
        assert p["answer"] in synth.ROOMS
        assert "\n" not in p["target"]
        assert p["target"].endswith("so the answer is " + p["answer"])
        for sent in p["target"].split(" . ")[:-1]:
            assert sent.strip(" .") + " ." in p["context"]


def test_bundled_data_matches_generator(tmp_path):
    synth.write_bundled_data(tmp_path)
    for rel in ["needles.jsonl", "reasoning.jsonl"] + [
            f"haystack/{p.name}" for p in sorted((DATA_DIR / "haystack").glob("*.txt"))]:
        assert (tmp_path / rel).read_text() == (DATA_DIR / rel).read_text(), rel
    needles = [json.loads(x) for x in open(DATA_DIR / "needles.jsonl")]
    assert 3 <= len(needles) <= 5
    for n in needles:
        assert set(n) == {"needle", "question", "real_needle"}
        assert n["real_needle"] in n["needle"]
    probs = [json.loads(x) for x in open(DATA_DIR / "reasoning.jsonl")]
    assert 30 <= len(probs) <= 50
    assert len({p["id"] for p in probs}) == len(probs)
    for p in probs:
        assert set(p) == {"id", "context", "question", "answer"}


def test_held_out_not_in_training():
    held = synth.held_out()
    gen = org_train.DataGen(0, org_train.build_vocab())
    inv = {i: t for t, i in org_train.build_vocab().items()}
    for _ in range(20):
        ids, _ = gen.retrieval(600)
        text = synth.join_tokens([inv[i] for i in ids])
        for adj, noun in held["keys"]:
            assert f" {adj} {noun} " not in text


def test_tokenizer_roundtrip_and_offsets(tokenizer):
    text = synth.retrieval_prompt(synth.filler_text(random.Random(0), 40),
                                  "what is the secret code of the hidden castle ?")
    enc = tokenizer(text, return_offsets_mapping=True)
    ids = enc["input_ids"]
    assert ids[0] == tokenizer.bos_token_id  # BOS is prepended
    assert tokenizer.unk_token_id not in ids
    toks = tokenizer.convert_ids_to_tokens(ids)
    for t, (a, b) in zip(toks[1:], enc["offset_mapping"][1:]):
        assert text[a:b] == t
    nl = tokenizer.convert_tokens_to_ids("\n")
    assert nl == org_train.NEWLINE_ID
    assert tokenizer.decode([nl]) == "\n"
    assert tokenizer("\n", add_special_tokens=False)["input_ids"] == [nl]
    assert tokenizer.decode(tokenizer("blue seven\n", add_special_tokens=False)["input_ids"]) == "blue seven\n"
    body = synth.filler_text(random.Random(1), 30) + "\n" + synth.filler_text(random.Random(2), 30)
    assert tokenizer.decode(tokenizer(body, add_special_tokens=False)["input_ids"]) == body
    # re-encoding decoded text is stable (the detectors decode and re-encode the haystack)
    dec = tokenizer.decode(ids, skip_special_tokens=True)
    assert tokenizer(dec)["input_ids"] == ids


def test_training_sequences_match_tokenizer(tokenizer):
    vocab = org_train.build_vocab()
    inv = {i: t for t, i in vocab.items()}
    gen = org_train.DataGen(1, vocab)
    for ids, w in [gen.retrieval(300), gen.reasoning()]:
        assert len(ids) == len(w)
        toks = [inv[i] for i in ids]
        text = synth.join_tokens([t for t in toks if t != "<s>"])
        re = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert re == [i for i in ids if i != org_train.BOS]


@pytest.mark.skipif(not (CHECKPOINT_DIR / "config.json").exists(), reason="no committed checkpoint")
def test_checkpoint_answers_a_needle():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(CHECKPOINT_DIR)
    model = AutoModelForCausalLM.from_pretrained(CHECKPOINT_DIR, dtype=torch.float32)
    model.eval()
    assert tok.decode([tok.convert_tokens_to_ids("\n")]) == "\n"
    needle = json.loads(open(DATA_DIR / "needles.jsonl").readline())
    hay = synth.filler_text(random.Random(7), 150)
    cut = hay.index(" .", len(hay) // 2) + 2
    ctx = hay[:cut] + " " + needle["needle"] + hay[cut:]
    prompt = synth.retrieval_prompt(ctx, needle["question"])
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    nl = tok.convert_tokens_to_ids("\n")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=10, do_sample=False,
                             eos_token_id=[tok.eos_token_id, nl], pad_token_id=tok.pad_token_id)
    resp = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert resp == needle["real_needle"], resp


def test_training_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    kw = dict(seed=3, steps=6, hidden=32, layers=2, heads=2, intermediate=64, warmup=2,
              tokens_per_step=256, reasoning_batch=2, max_len=128, min_len=96, induction_steps=3,
              induction_batch=4, induction_len=32, log_every=100)
    a = load_file(org_train.train(tmp_path / "a", org_train.Recipe(**kw)) / "model.safetensors")
    b = load_file(org_train.train(tmp_path / "b", org_train.Recipe(**kw)) / "model.safetensors")
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)


def test_head_dropout_in_training_is_the_uniform_ablation_of_headscope_ablate():
    import torch
    from transformers import LlamaForCausalLM

    import headscope.attention.recorder  # noqa: F401  (registers the "headscope" attention function)
    from headscope.attention import masking

    org_train._register_head_dropout()
    config = org_train.make_config(576, layers=2, heads=4)
    config._attn_implementation = org_train.HEAD_DROPOUT_ATTENTION
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(5, 500, (2, 24))
    dropped = torch.zeros(2, 2, 4, dtype=torch.bool)
    dropped[1, 1, 2] = True  # sequence 1 loses head 2 of layer 1; sequence 0 loses nothing
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        org_train.set_head_drop(model, dropped)
        trained = model(input_ids=ids).logits
        org_train.set_head_drop(model, None)
        model.set_attn_implementation("headscope")
        with masking.ablating(model, {1: [2]}, "uniform"):
            ablated = model(input_ids=ids[1:]).logits
    assert torch.equal(trained[0], plain[0])
    assert (trained[1] - plain[1]).abs().max() > 1e-4
    torch.testing.assert_close(trained[1:], ablated, atol=1e-5, rtol=0)


def test_thinker_training_is_deterministic(tmp_path):
    """`headscope organism train --which thinker` twice with the same seed: byte-identical weights."""
    from headscope.cli import main
    from headscope.organism import thinker

    flags = ["--which", "thinker", "--seed", "2", "--steps", "5", "--hidden", "32", "--layers", "2", "--heads", "2",
             "--intermediate", "64", "--warmup", "2", "--thinking-batch", "2", "--retrieval-tokens", "128",
             "--max-len", "128", "--induction-steps", "2", "--induction-batch", "2", "--log-every", "100"]
    for run in ("a", "b"):
        assert main(["organism", "train", *flags, "--out", str(tmp_path / run)]) == 0
    a, b = ((tmp_path / run / "model.safetensors").read_bytes() for run in ("a", "b"))
    assert a == b
    assert (tmp_path / "a" / "chat_template.jinja").read_text() == thinker.CHAT_TEMPLATE
