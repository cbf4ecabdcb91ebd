"""Each scorer named after a paper computes what that paper's released code computes, on sequences where the
conventions matter: long chains of thought (tests/scripted.py), padded batches, negative calibrated values.
The references (tests/references.py) are transcribed from the original functions and read eager attention."""
import json

import numpy as np
import pytest

import headscope
import references
from conftest import WORDS, query_records
from headscope.detection import loading
from headscope.heads.analysis import spearman
from headscope.families.toy import tiny_model, word_tokenizer
from scripted import chain_data, chain_script, scripted_model

ANCHORS, PLANTED = (5, 17), (2, 1)


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    """Three long chains (30, 26 and 22 sentences; prompts of 3, 5 and 7 words) on a 4-layer scripted Llama
    whose head 2-1 attends to sentences 5 and 17 of every chain; receiver and reasoning_focus in one pass."""
    scripts = [chain_script(c, 30 - 4 * c, prompt_words=3 + 2 * c) for c in range(3)]
    model, tokenizer = scripted_model(scripts, "llama", planted=PLANTED, anchors=ANCHORS)
    path = tmp_path_factory.mktemp("chains")
    result = headscope.detect("chain", loaded=loading.prepare(model, tokenizer, "scripted"), check=False,
                              data=chain_data(path / "chains.json", scripts), out=str(path / "out"), quiet=True,
                              plots=False, scorer="receiver,reasoning_focus", think_start="<think>",
                              think_end="</think>", max_new_tokens=200, batch_size=2)
    sequences = [tokenizer(" ".join(prompt + generated)).input_ids for prompt, generated in scripts]
    for row, (_, generated) in zip(result.samples, scripts):
        assert row["response"] == " ".join(generated[:-1])  # the script, written greedily (EOS not decoded)
    return model, tokenizer, sequences, result


def values(row) -> np.ndarray:
    return np.array(row["head_scores"], dtype=float)  # null -> NaN


def test_receiver_equals_thought_anchors_per_sample_and_head(chains):
    model, tokenizer, sequences, result = chains
    rows = result.by_scorer["receiver"].samples
    expected = []
    for row, sequence in zip(rows, sequences):
        text = tokenizer.decode(sequence[1:], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        expected.append(references.thought_anchors_kurtosis(model, tokenizer, text))
        np.testing.assert_allclose(values(row), expected[-1], atol=1e-5)
    heads = result.by_scorer["receiver"].heads
    means = np.array([np.mean(heads[key]) for key in heads])
    reference_means = np.mean(expected, axis=0).ravel()  # get_top_k_receiver_heads: the mean over responses
    np.testing.assert_allclose(means, reference_means, atol=1e-5)
    assert spearman(means, reference_means) == pytest.approx(1.0)
    assert max(heads, key=lambda key: np.mean(heads[key])) == f"{PLANTED[0]}-{PLANTED[1]}"  # the planted head


def test_receiver_keeps_negative_kurtoses(chains):
    heads = chains[3].by_scorer["receiver"].heads
    assert all(len(scores) == 3 for scores in heads.values())  # every sample, whatever its sign
    assert any(score < 0 for scores in heads.values() for score in scores)


def test_reasoning_focus_equals_zhangs_a2r(chains):
    model, tokenizer, sequences, result = chains
    for row, sequence in zip(result.by_scorer["reasoning_focus"].samples, sequences):
        np.testing.assert_allclose(values(row), references.zhang_a2r(model, tokenizer, sequence), atol=1e-6)


def test_query_equals_qrheads_detection_code(toy_dir, tmp_path):
    records = query_records(["gold ."])  # a one-token document: no std, QRHead adds 0 for it
    data = tmp_path / "query.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records))
    result = headscope.detect("query", model=str(toy_dir), out=str(tmp_path / "out"), quiet=True, save_prompts=True,
                              data=str(data), batch_size=2)
    model, tokenizer = headscope.load(str(toy_dir)).model, headscope.load(str(toy_dir)).tokenizer
    negative = 0
    for row in result.samples:
        ids = tokenizer(row["prompt"]).input_ids
        start, end = row["span"]
        null_ids = ids[:start] + row["null_question_ids"] + ids[end:]
        inclusive = lambda span: (span[0], span[1] - 1)  # noqa: E731 -- QRHead's spans end inclusive
        expected = references.qrhead_detection_score(
            model, ids, inclusive(row["qrhead_span"]), null_ids, inclusive(row["null_qrhead_span"]),
            [inclusive(d) for d in row["documents"]], row["gold"])
        np.testing.assert_allclose(values(row), expected, atol=1e-5)
        negative += int((expected < 0).sum())
    assert negative > 0  # calibrated scores below zero are kept
    assert all(len(scores) == 4 for scores in result.heads.values())


@pytest.mark.parametrize("batch_size", [1, 8])
@pytest.mark.parametrize("family", ["llama", "mistral"])  # mistral: a window of 24, the prompts ~100 tokens
def test_retrieval_and_r2_equal_retrieval_head_and_headkv(family, batch_size, data_dir, tmp_path):
    """retrieval = Retrieval_Head's retrieval_calculate, r2 = HeadKV's, per sample and head, on a left-padded batch
    (6 prompts of two lengths in one batch of 8) and past a sliding window."""
    tokenizer = word_tokenizer(WORDS + ["book", "based", "on", "content", "question", "answer", "context"])
    model = tiny_model(family, vocab_size=len(tokenizer), num_layers=4, seed=3)
    result = headscope.detect("retrieval", loaded=loading.prepare(model, tokenizer, family), check=False,
                              out=str(tmp_path), quiet=True, plots=False, save_prompts=True, scorer="retrieval,r2",
                              haystack=str(data_dir / "haystack"), needles=str(data_dir / "needles.jsonl"),
                              context_lengths=[160, 200], length_buffer=60, depths=[0, 50, 100],
                              success_threshold=-1, max_new_tokens=12, stop_at_newline=False, batch_size=batch_size)
    eos, found = tokenizer.eos_token_id, 0.0
    for row in result.by_scorer["retrieval"].samples:
        ids = tokenizer(row["prompt"]).input_ids
        np.testing.assert_allclose(values(row), references.retrieval_head_score(model, ids, row["span"], 12, eos),
                                   atol=1e-6)
    for row in result.by_scorer["r2"].samples:
        ids = tokenizer(row["prompt"]).input_ids
        steps = min(row["answer_tokens"], 12)  # HeadKV decodes |answer| steps; this run stops at 12 new tokens
        expected = references.headkv_r2_score(model, ids, row["span"], steps, eos)
        np.testing.assert_allclose(values(row), expected, atol=1e-6)
        found += float(expected.sum())
    assert found > 0  # the heads attend to the needle: the comparison is not of zeros
