"""r2, query and the pattern scores in heads.json equal a straightforward re-computation: eager attention
with output_attentions over the whole sequence (no cache, full T x T) and Python loops over heads."""
import json

import pytest
import torch

import headscope
import references
from conftest import query_records


def eager_model(toy_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(toy_dir, attn_implementation="eager").eval()


def attentions(model, ids):
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_attentions=True)
    return [a[0] for a in out.attentions], out.logits[0, -1]


def assert_heads_equal(heads, expected):
    assert heads.keys() == expected.keys()
    for key in heads:
        assert len(heads[key]) == len(expected[key]), key
        assert heads[key] == pytest.approx(expected[key], abs=1e-5), key
    assert any(abs(s) > 1e-3 for scores in heads.values() for s in scores), "all-zero comparison"


def tl_detection_pattern(name: str, tokens: list[int]) -> torch.Tensor:
    """TransformerLens' head_detector patterns, written from its definitions: previous-token has ones just
    below the diagonal; duplicate-token marks every earlier position holding the same token; induction is
    the duplicate pattern shifted one key to the right (first column zero), kept lower-triangular."""
    size = len(tokens)
    if name == "previous_token":
        return torch.tril(torch.diag(torch.ones(size - 1), -1))
    ids = torch.tensor(tokens)
    duplicate = (ids[:, None] == ids[None, :]).float()
    duplicate.fill_diagonal_(0)
    duplicate = torch.tril(duplicate)
    if name == "duplicate_token":
        return duplicate
    shifted = torch.cat([torch.zeros(size, 1), torch.roll(duplicate, 1, dims=1)[:, 1:]], dim=1)
    return torch.tril(shifted)


def test_transformerlens_convention_equals_detect_head_mul(toy_dir, tmp_path):
    """--pattern-convention transformerlens: each sample's value is detect_head(..., error_measure="mul",
    exclude_bos=False, exclude_current_token=False) = sum(A * D) / sum(A) on the same tokens."""
    names = ("previous_token", "duplicate_token", "induction")
    result = headscope.detect("pattern", model=str(toy_dir), out=str(tmp_path), quiet=True, save_prompts=True,
                              block_length=4, block_repeats=3, num_samples=2, batch_size=2,
                              pattern_convention="transformerlens", scorer=",".join(names))
    model, tokenizer = eager_model(toy_dir), headscope.load(str(toy_dir)).tokenizer
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    expected = {name: {f"{l}-{h}": [] for l in range(layers) for h in range(heads)} for name in names}
    for row in result.samples:
        ids = tokenizer(row["prompt"]).input_ids
        attn, _ = attentions(model, ids)
        for name in names:
            pattern = tl_detection_pattern(name, ids)
            for l in range(layers):
                for h in range(heads):
                    a = attn[l][h]
                    expected[name][f"{l}-{h}"].append(((a * pattern).sum() / a.sum()).item())
    for name in names:
        assert_heads_equal(result.by_scorer[name].heads, expected[name])


def test_pattern_scores_equal_eager_loops(toy_dir, tmp_path):
    n, repeats = 5, 3
    result = headscope.detect("pattern", model=str(toy_dir), out=str(tmp_path), quiet=True, save_prompts=True,
                              block_length=n, block_repeats=repeats, num_samples=2,
                              scorer="induction,previous_token,duplicate_token,echo")
    model, tokenizer = eager_model(toy_dir), headscope.load(str(toy_dir)).tokenizer
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    expected = {name: {f"{l}-{h}": [] for l in range(layers) for h in range(heads)}
                for name in ("induction", "previous_token", "duplicate_token", "echo")}
    for row in result.samples:
        ids = tokenizer(row["prompt"]).input_ids
        t0 = len(ids) - n * repeats
        attn, _ = attentions(model, ids)
        for l in range(layers):
            for h in range(heads):
                a = attn[l][h]
                repeated = range(t0 + n, len(ids))
                scores = {
                    "previous_token": sum(a[i, i - 1].item() for i in range(t0 + 1, len(ids))) / (len(ids) - t0 - 1),
                    "duplicate_token": sum(a[i, i - n].item() for i in repeated) / len(repeated),
                    "induction": sum(a[i, i - n + 1].item() for i in repeated) / len(repeated),
                    "echo": sum(sum(a[i, j].item() for j in range(i - n, t0 - 1, -n)) for i in repeated) / len(repeated),
                }
                for name, score in scores.items():
                    expected[name][f"{l}-{h}"].append(score)
    for name, scorer_result in result.by_scorer.items():
        assert_heads_equal(scorer_result.heads, expected[name])


def test_r2_scores_equal_eager_loops(toy_dir, data_dir, tmp_path):
    steps = 34  # more than the answer's 30 tokens: HeadKV's r2 scores only those (row["answer_tokens"])
    result = headscope.detect("retrieval", model=str(toy_dir), out=str(tmp_path), quiet=True, save_prompts=True,
                              haystack=str(data_dir / "haystack"), needles=str(data_dir / "needles.jsonl"),
                              context_lengths=[260], depths=[0, 100], success_threshold=-1, max_new_tokens=steps,
                              stop_at_newline=False, scorer="retrieval,r2")
    model, tokenizer = eager_model(toy_dir), headscope.load(str(toy_dir)).tokenizer
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    expected = {f"{l}-{h}": [] for l in range(layers) for h in range(heads)}
    for row in result.samples:
        ids = tokenizer(row["prompt"]).input_ids
        start, end = row["span"]
        score = [[0.0] * heads for _ in range(layers)]
        assert row["answer_tokens"] == 30
        for _ in range(min(steps, row["answer_tokens"])):
            attn, logits = attentions(model, ids)
            for l in range(layers):
                for h in range(heads):
                    row = attn[l][h, -1]
                    positions = references.rule_top_k(row.numpy(), end - start).tolist()  # topk, ties by the rule
                    for value, position in zip(row[positions].tolist(), positions):
                        if start <= position < end:
                            score[l][h] += value / (end - start)
            ids = ids + [int(logits.argmax())]
            if ids[-1] == tokenizer.eos_token_id:
                break
        for l in range(layers):
            for h in range(heads):
                expected[f"{l}-{h}"].append(score[l][h])
    assert_heads_equal(result.by_scorer["r2"].heads, expected)


def test_query_scores_equal_eager_loops(toy_dir, tmp_path):
    records = query_records()
    data = tmp_path / "query.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records))
    # the linear convention (the question's rows, no outlier mask); QRHead's own is tested in test_fidelity.py
    result = headscope.detect("query", model=str(toy_dir), out=str(tmp_path / "out"), quiet=True, save_prompts=True,
                              data=str(data), batch_size=2, query_span="question", query_outlier_mask=False)
    model, tokenizer = eager_model(toy_dir), headscope.load(str(toy_dir)).tokenizer
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    expected = {f"{l}-{h}": [] for l in range(layers) for h in range(heads)}
    assert [row["id"] for row in result.samples] == [record["id"] for record in records]
    for row, record in zip(result.samples, records):
        ids = tokenizer(row["prompt"]).input_ids
        null_prompt = row["prompt"].replace(record["question"], "N/A")
        null_ids = tokenizer(null_prompt).input_ids
        qs, qe = row["span"]
        nqe = qe - (len(ids) - len(null_ids))
        attn, _ = attentions(model, ids)
        null_attn, _ = attentions(model, null_ids)
        for l in range(layers):
            for h in range(heads):
                score = 0.0
                for g in row["gold"]:
                    s, e = row["documents"][g]
                    score += sum(attn[l][h, i, s:e].sum().item() for i in range(qs, qe)) / (qe - qs)
                    score -= sum(null_attn[l][h, i, s:e].sum().item() for i in range(qs, nqe)) / (nqe - qs)
                expected[f"{l}-{h}"].append(score)
    assert_heads_equal(result.heads, expected)
