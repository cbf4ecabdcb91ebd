"""Think/answer segments, Thought Anchors' sentences, and the reasoning_focus and receiver scores, with
hand-computed answers and against references transcribed from the original code (tests/references.py)."""
import numpy as np
import pytest
import torch
from scipy import stats

import references
from headscope.scorers import PromptBatch, ReasoningFocusScorer, ReceiverScorer
from headscope.scorers.segments import find_marker, kurtosis, locate, token_texts
from headscope.scorers.sentences import chunk_ranges, chunk_texts, original_sentences
from headscope.families.toy import word_tokenizer
from tokenizers_util import byte_level_bpe_tokenizer, metaspace_bpe_tokenizer

TOKENIZER = word_tokenizer(["red", "blue", "a", "b", "c", "so", "also", "the", "answer", "is", "x"])
TOKENIZER.add_tokens(["<think>", "</think>"])  # one token each, as in reasoning models' vocabularies


def ids(text):
    return TOKENIZER(text).input_ids  # BOS first


# ------------------------------------------------------------------------------------------- markers


def test_markers_match_whole_tokens_only():
    sequence = ids("a also the answer is b so the answer is c")
    pieces = token_texts(TOKENIZER, tuple(sequence))
    assert find_marker(pieces, "so the answer is", 0, len(sequence), last=False) == (7, 11)  # not inside "also"
    assert find_marker(pieces, "the answer is", 0, len(sequence), last=True) == (8, 11)


def test_a_byte_level_marker_matches_with_its_tokens_leading_space_and_keeps_trailing_space():
    tokenizer = byte_level_bpe_tokenizer()
    sequence = tokenizer("The best thing is blue. The dog slept.").input_ids
    pieces = token_texts(tokenizer, tuple(sequence))
    assert "".join(pieces[1:]) == "The best thing is blue. The dog slept."
    first, end = find_marker(pieces, "thing is", 0, len(sequence), last=False)  # " thing" carries the space
    assert "".join(pieces[first:end]) == " thing is"
    first, end = find_marker(pieces, "blue. ", 0, len(sequence), last=False)  # the space opens " The"
    assert "".join(pieces[first:end]) == " blue." and pieces[end] == " The"
    assert find_marker(pieces, "lue", 0, len(sequence), last=False) is None  # inside a word


def test_segments_close_at_the_last_end_marker_and_open_after_a_prompt_start_marker():
    sequence = ids("a b <think> red . </think> x </think> blue")
    segments = locate(TOKENIZER, sequence, prompt_len=4, think_start="<think>", think_end="</think>")
    assert segments.think == (4, 8) and segments.end_marker == (8, 9)  # the prompt's "red" is reasoning
    assert segments.spans() == {"think_span": [4, 8], "answer_span": [9, 10]}
    cut = locate(TOKENIZER, ids("a b red . blue"), prompt_len=3, think_start=None, think_end="</think>")
    assert cut.think == (3, 6) and cut.answer is None  # generation opened it; it never closed
    assert locate(TOKENIZER, ids("a b red"), 3, "<think>", "</think>").think is None  # never opened


# ------------------------------------------------------------------------------------------- sentences

TEXTS = [
    "First we add 3.5 and 2. Then we check!\n\nNow is it right? Ok. Yes it is right. The end",
    "Short. Tiny. A much longer sentence here. And another one follows.\r\n\r\nLast part is dropped",
    "  Leading space. Then a sentence that ends at the very end. ",
    "One. Two.",
    "No boundary at all in this text",
]


@pytest.mark.parametrize("text", TEXTS)
def test_chunks_are_thought_anchors_chunks(text):
    # the original cuts the text between the markers out of the whole text and strips it
    assert chunk_texts(text.strip()) == references.split_solution_into_chunks(f"Q: x<think>{text}</think> 5")


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("after", ["", "</think> The answer is 5.", "</think>" + " x" * 60])
def test_chunk_ranges_are_get_chunk_ranges_including_its_early_stop(text, after):
    before = "Q: x<think>"
    full = before + text + after  # the original searches the whole text: a short rest shortens the last chunks
    expected = references.get_chunk_ranges(full, references.split_solution_into_chunks(full))
    ours = chunk_ranges(text, chunk_texts(text.strip()), len(text) + len(after))
    assert [(start + len(before), end + len(before)) for start, end in ours] == expected


@pytest.mark.parametrize("make", [byte_level_bpe_tokenizer, metaspace_bpe_tokenizer])
def test_sentence_boundaries_are_the_originals_prefix_tokenization(make):
    """Byte-level BPE: a prefix ending in a space tokenizes the space alone, so the original's sentence
    boundaries move one token (the next sentence's first word joins the previous sentence): reproduced.
    SentencePiece style: the think text is tokenized after the tokens before it, as in the whole text."""
    tokenizer = make()
    tokenizer.add_tokens(["<think>", "</think>"])
    prompt = "Based on the content of the book, Question: What is the secret code?\nAnswer:<think>"
    chain = " The dog slept. The cat read a book.\n\nThe best thing to do in the city is to eat. The old river ran"
    text = prompt + chain + "</think> blue"
    sequence = tokenizer(text).input_ids
    segments = locate(tokenizer, sequence, len(sequence) - 3, "<think>", "</think>")
    pieces = token_texts(tokenizer, tuple(sequence))
    think_text = "".join(pieces[segments.think[0]:segments.think[1]])
    ours = original_sentences(tokenizer, think_text, segments.think[0], sum(map(len, pieces[segments.think[1]:])),
                              "".join(pieces[segments.think[0] - 4:segments.think[0]]))
    assert ours == references.thought_anchors_boundaries(tokenizer, text)
    tokens = tokenizer.convert_ids_to_tokens(sequence)
    if make is byte_level_bpe_tokenizer:
        assert tokens[ours[0][1] - 1] == "ĠThe" and tokens[ours[1][0]] == "Ġcat"  # "The" ends sentence 0


def test_kurtosis_is_scipys():
    rng = np.random.default_rng(0)
    values = rng.gamma(0.5, size=(3, 4, 9))
    values[0, 0] = 0.25  # constant: no kurtosis (NaN), as scipy
    with references._quiet():
        expected = stats.kurtosis(values, axis=2, fisher=True, bias=True)
    got = kurtosis(torch.tensor(values)).numpy()
    assert np.isnan(got[0, 0]) and np.isnan(expected[0, 0])
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert float(kurtosis(torch.tensor([1.0, 2.0]))) == -2.0


# ------------------------------------------------------------------------------------------- the scorers, by hand


def batch_of(sequence):
    return PromptBatch(torch.tensor([sequence]), len(sequence), torch.zeros(1, dtype=torch.long),
                       torch.zeros(1, dtype=torch.long), tokenizer=TOKENIZER)


def replay(scorer, sequence, prompt_len, rows, layers=1):
    """Run the scorer's replay on hand-made rows: rows (heads, T, T), query i's row over keys 0..T-1."""
    scorer.begin(batch_of(sequence), layers, rows.shape[0])
    wanted = scorer.replay_queries(0, sequence, prompt_len)
    if wanted is not None:
        start, end = wanted
        for layer in range(layers):
            for first in range(start, end, 2):  # blocks of two queries, as the recorder hands them
                block = rows[:, first:min(first + 2, end)]
                scorer.replay_rows(0, layer, first, block[None, :, :, :first + block.shape[1]])
    return scorer.result()[0, 0]


def test_reasoning_focus_is_the_answer_queries_mass_strictly_between_the_markers():
    # <s> a <think> red blue </think> x x c: think keys [3, 5), end marker 5, answer queries 6, 7 (8 is last)
    sequence = ids("a <think> red blue </think> x x c")
    rows = torch.zeros(2, 9, 9)
    rows[0, 6, 3], rows[0, 6, 5], rows[0, 7, 4] = 0.5, 0.3, 0.2  # head 0: (0.5 + 0.2) / 2, the marker's 0.3 out
    rows[1, 7, 5], rows[1, 8, 3] = 1.0, 1.0  # head 1: the marker only; query 8 is the last token, never read
    scores = replay(ReasoningFocusScorer("<think>", "</think>"), sequence, 3, rows)
    assert scores.tolist() == pytest.approx([0.35, 0.0])
    with_marker = replay(ReasoningFocusScorer("<think>", "</think>", include_marker=True), sequence, 3, rows)
    assert with_marker.tolist() == pytest.approx([0.5, 0.5])


def test_reasoning_focus_without_an_answer_is_unscored():
    scorer = ReasoningFocusScorer(None, "</think>")
    scores = replay(scorer, ids("a red blue"), 2, torch.zeros(1, 4, 4))
    assert torch.isnan(scores).all() and scorer.unscored == {0: "no answer segment: the think block never closed"}


def test_receiver_by_hand_in_both_conventions():
    # <s> a | red blue . | red . | red . | red . | red . | </think> x  (the tokens rule: five sentences)
    sequence = ids("a red blue . red . red . red . red . </think> x")
    sentences = [(2, 5), (5, 7), (7, 9), (9, 11), (11, 13)]
    rows = torch.zeros(1, 15, 15)
    for m, (start, end) in enumerate(sentences[1:], 1):
        for query in range(start, end):
            rows[0, query, 2] = 0.3  # 0.3 on sentence 0 (3 tokens)
            if m >= 2:
                rows[0, query, 5] = 0.3  # and 0.3 on sentence 1 (2 tokens), from the sentences after it
    # sum over keys, then mean over queries: M[m, 0] = 0.3, M[m, 1] = 0.3, else 0: v = [0.3, 0.3, 0, 0]
    old = ReceiverScorer(None, "</think>", proximity=1, reduce="sum", sentences="tokens")
    expected = stats.kurtosis([0.3, 0.3, 0.0, 0.0], fisher=True, bias=True)
    assert float(replay(old, sequence, 2, rows)) == pytest.approx(expected)
    # mean over (query, key) pairs: M[m, 0] = 0.3 / 3, M[m, 1] = 0.3 / 2: v = [0.1, 0.15, 0, 0]
    mean = ReceiverScorer(None, "</think>", proximity=1, reduce="mean", sentences="tokens")
    expected = stats.kurtosis([0.1, 0.15, 0.0, 0.0], fisher=True, bias=True)
    assert float(replay(mean, sequence, 2, rows)) == pytest.approx(expected)
    # proximity 2: v[k] averages m >= k + 2: v = [mean(M[2..4, 0]), mean(M[3..4, 1]), M[4, 2]] = [0.1, 0.15, 0]
    near = ReceiverScorer(None, "</think>", proximity=2, reduce="mean", sentences="tokens")
    expected = stats.kurtosis([0.1, 0.15, 0.0], fisher=True, bias=True)
    assert float(replay(near, sequence, 2, rows)) == pytest.approx(expected)
    # Thought Anchors' chunks: "red ." is under 10 characters and merges into the next: two sentences, too few
    original = ReceiverScorer(None, "</think>")
    assert torch.isnan(replay(original, sequence, 2, rows))
    assert original.unscored == {0: "the chain has 2 sentences; receiver needs at least 6 (--receiver-proximity 4)"}


# ------------------------------------------------------------------------------------------- long budgets

THINKING_TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}"
                     "{% if enable_thinking is defined and not enable_thinking %} <think> </think>"
                     "{% else %} <think>{% endif %}{% endif %}")


def test_a_thinking_model_decodes_2000_steps_end_to_end(tmp_path, data_dir):
    """A random model whose chat template opens a think block: 2,000 new tokens, no stop, through detect; the
    think segment starts after the template's <think>, at the first generated token, and the row records it;
    the replay of a 2,000-token chain is one more prefill."""
    import json

    import headscope
    from headscope.families.toy import tiny_model

    tokenizer = word_tokenizer(["red", "blue", "green", "key", "is", "the", "what"])
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = THINKING_TEMPLATE
    tokenizer.eos_token = None  # nothing stops the decode but the budget
    model = tiny_model("llama", vocab_size=len(tokenizer), num_layers=2, max_positions=4096)
    model.generation_config.eos_token_id = model.config.eos_token_id = None
    model.save_pretrained(tmp_path / "thinker")
    tokenizer.save_pretrained(tmp_path / "thinker")
    result = headscope.detect("reasoning", model=str(tmp_path / "thinker"), out=str(tmp_path / "out"), quiet=True,
                              data=str(data_dir / "reasoning.json"), num_samples=1, max_new_tokens=2000,
                              stop_at_newline=False, success_threshold=-1, scorer="reasoning,reasoning_focus",
                              chat_template_kwargs={"enable_thinking": True})
    row = result.samples[0]
    assert row["think_span"][0] == row["prompt_tokens"]  # the template opened the think block
    closed = row["answer_span"] is not None
    assert row["think_span"][1] <= row["prompt_tokens"] + 2000 and (closed or
                                                                    row["think_span"][1] == row["prompt_tokens"] + 2000)
    manifest = json.loads((tmp_path / "out" / "thinker_reasoning_manifest.json").read_text())
    assert manifest["options"]["chat_template_kwargs"] == {"enable_thinking": True}
