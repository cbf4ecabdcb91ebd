"""headscope's heads.json equals a straightforward re-computation: eager attention with
output_attentions over the whole sequence at every step (no cache) and a Python loop over heads."""
import json

import pytest
import torch

import headscope
from headscope.toy import tiny_model

def reference_scores(model, tokenizer, prompt, span, task, max_new_tokens):
    """The original scripts' way: eager attention rows, one head at a time."""
    ids = tokenizer(prompt).input_ids
    prompt_len = len(ids)
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    score = [[0.0] * heads for _ in range(layers)]
    for _ in range(max_new_tokens):
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_attentions=True)
        token = int(out.logits[0, -1].argmax())
        for l in range(layers):
            for h in range(heads):
                row = out.attentions[l][0, h, -1]
                if task == "retrieval":
                    top = int(row.argmax())
                    if span[0] <= top < span[1] and ids[top] == token:
                        score[l][h] += 1 / (span[1] - span[0])
                else:
                    values, positions = row.topk(5)
                    for value, position in zip(values.tolist(), positions.tolist()):
                        if position >= prompt_len:
                            score[l][h] += value
                        if span and span[0] <= position < span[1]:
                            score[l][h] += 0.5 * value
        ids.append(token)
        if token == tokenizer.eos_token_id:
            break
    return score


@pytest.mark.parametrize("task", ["retrieval", "reasoning"])
def test_heads_json_equals_eager_per_head_loop(task, toy_dir, data_dir, tmp_path):
    options = dict(model=str(toy_dir), out=str(tmp_path), success_threshold=-1, save_prompts=True, quiet=True,
                   max_new_tokens=12, stop_at_newline=False)  # random models write newlines early
    if task == "retrieval":
        options.update(haystack=str(data_dir / "haystack"), needles=str(data_dir / "needles.jsonl"),
                       context_lengths=[260, 330], depths=[0, 40, 100])
    else:
        options.update(data=str(data_dir / "reasoning.json"))
    result = headscope.detect(task, **options)
    heads = json.loads((tmp_path / f"{toy_dir.name}_{task}_heads.json").read_text())

    eager = tiny_model("llama", attn="eager")  # same weights, loaded the plain way
    eager = type(eager).from_pretrained(toy_dir, attn_implementation="eager").eval()
    tokenizer = headscope.load(str(toy_dir)).tokenizer
    expected = {key: [] for key in heads}
    for row in result.samples:
        score = reference_scores(eager, tokenizer, row["prompt"], row["span"], task, 12)
        for l, per_layer in enumerate(score):
            for h, value in enumerate(per_layer):
                if task == "retrieval" or value > 0:
                    expected[f"{l}-{h}"].append(value)
    assert heads.keys() == expected.keys()
    for key in heads:
        assert len(heads[key]) == len(expected[key]), key
        assert all(abs(a - b) <= 1e-5 for a, b in zip(heads[key], expected[key])), key
    nonzero = sum(any(v > 0 for v in scores) for scores in heads.values())
    assert nonzero >= 2, "the comparison should not be between all-zero scores"
