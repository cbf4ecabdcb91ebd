"""headscope's heads.json equals a straightforward re-computation: eager attention with
output_attentions over the whole sequence at every step (no cache) and a Python loop over heads --
on every family of the conformance matrix, at 4 layers, with the same generated tokens."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import headscope
import references
from headscope.detection.decode import num_layers_and_heads
from headscope.families.toy import FAMILIES, tiny_model, word_tokenizer

from conftest import WORDS

def reference_scores(model, tokenizer, prompt, span, task, max_new_tokens):
    """The original scripts' way: eager attention rows, one head at a time."""
    ids = tokenizer(prompt).input_ids
    prompt_len = len(ids)
    layers, heads = num_layers_and_heads(model)
    score = [[0.0] * heads for _ in range(layers)]
    for _ in range(max_new_tokens):
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_attentions=True)
        token = int(out.logits[0, -1].argmax())
        for l in range(layers):
            for h in range(heads):
                row = out.attentions[l][0, h, -1]
                if task == "retrieval":
                    top = int(references.rule_top_k(row.numpy(), 1)[0])  # the argmax, ties by the tie rule
                    if span[0] <= top < span[1] and ids[top] == token:
                        score[l][h] += 1 / (span[1] - span[0])
                else:
                    positions = references.rule_top_k(row.numpy(), 5).tolist()  # topk(5), ties by the rule
                    for value, position in zip(row[positions].tolist(), positions):
                        if position >= prompt_len:
                            score[l][h] += value
                        if span and span[0] <= position < span[1]:
                            score[l][h] += 0.5 * value
        ids.append(token)
        if token == tokenizer.eos_token_id:
            break
    return score, tokenizer.decode(ids[prompt_len:], skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """A saved 4-layer random model of each family over the toy vocabulary, built on first use."""
    built = {}

    def build(family):
        if family not in built:
            path = tmp_path_factory.mktemp(family)
            tokenizer = word_tokenizer(WORDS + ["book", "based", "on", "content", "question", "answer", "context"])
            # Windows shorter than the prompts (260-330 tokens), long enough to reach a needle at depth 100.
            window = {"sliding_window": 64} if "sliding_window" in FAMILIES[family][1] else {}
            tiny_model(family, vocab_size=len(tokenizer), num_layers=4, seed=5, **window).save_pretrained(path)
            tokenizer.save_pretrained(path)
            built[family] = path
        return built[family]

    return build


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("task", ["retrieval", "reasoning"])
def test_heads_json_equals_eager_per_head_loop(task, family, family_dirs, data_dir, tmp_path):
    toy_dir = family_dirs(family)
    options = dict(model=str(toy_dir), out=str(tmp_path / "out"), success_threshold=-1, save_prompts=True, quiet=True,
                   max_new_tokens=12, stop_at_newline=False)  # random models write newlines early
    if task == "retrieval":
        # An answer over every word and punctuation mark, so that whatever a random model writes, heads can copy it.
        answer = " ".join((WORDS + [".", ",", "?", ":", "<", ">", "/"])[(7 * i) % 22] for i in range(44))
        needles = tmp_path / "needles.jsonl"
        needles.write_text(json.dumps({"needle": f"the code of the stone is {answer} .", "real_needle": answer,
                                       "question": "what is the code of the stone ?"}))
        options.update(haystack=str(data_dir / "haystack"), needles=str(needles), context_lengths=[260, 330],
                       depths=[0, 40, 100])
    else:
        options.update(data=str(data_dir / "reasoning.json"))
    result = headscope.detect(task, **options)
    heads = json.loads((tmp_path / "out" / f"{toy_dir.name}_{task}_heads.json").read_text())

    eager = AutoModelForCausalLM.from_pretrained(toy_dir, attn_implementation="eager").eval()  # the plain way
    tokenizer = headscope.load(str(toy_dir)).tokenizer
    expected = {key: [] for key in heads}
    for row in result.samples:
        score, response = reference_scores(eager, tokenizer, row["prompt"], row["span"], task, 12)
        assert response == row["response"], row["id"]
        for l, per_layer in enumerate(score):
            for h, value in enumerate(per_layer):
                if task == "retrieval" or value > 0:
                    expected[f"{l}-{h}"].append(value)
    assert heads.keys() == expected.keys()
    for key in heads:
        assert len(heads[key]) == len(expected[key]), key
        assert all(abs(a - b) <= 1e-5 for a, b in zip(heads[key], expected[key])), (key, heads[key], expected[key])
    nonzero = sum(any(v > 0 for v in scores) for scores in heads.values())
    assert nonzero >= 1, "the comparison should not be between all-zero scores"
