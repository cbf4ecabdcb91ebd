import json

import numpy as np
import pytest
from tokenizers_util import byte_level_bpe_tokenizer, word_level_tokenizer

from headscope.errors import HeadscopeError
from headscope.tasks.spans import encode_with_span
from headscope.tasks import reasoning, retrieval
from headscope.tasks.reasoning import build_reasoning_samples, load_reasoning_data, parse_fields
from headscope.tasks.retrieval import (
    QUESTION_SUFFIX, build_retrieval_samples, depth_percents, insertion_point, linear_lengths, load_haystack,
    load_needles)

SENTENCE = "the cat saw a dog ."  # 6 word-level tokens, a period every 6th token
HAYSTACK = " ".join([SENTENCE] * 40)
NEEDLE = {"needle": "The Secret code is blue river seven.", "question": "What is the secret code?",
          "real_needle": "blue river seven"}  # 8 word-level tokens


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def context_of(sample):
    """The haystack-with-needle part of a plain (non-chat) retrieval prompt."""
    suffix = QUESTION_SUFFIX.format(question=NEEDLE["question"])
    assert sample.prompt.endswith(suffix)
    return sample.prompt[: -len(suffix)]


# ----------------------------------------------------------------------------- retrieval: loading


def test_load_haystack_sorted_txt_files(tmp_path):
    write(tmp_path / "b.txt", "second file.")
    write(tmp_path / "a.txt", "first file.")
    write(tmp_path / "notes.md", "ignored")
    assert load_haystack(tmp_path) == "first file.\nsecond file."


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "not found"),
    (lambda d: d.mkdir(), "no .txt files"),
    (lambda d: (d.mkdir(), write(d / "a.txt", "  \n")), "only empty"),
])
def test_load_haystack_errors(tmp_path, setup, message):
    folder = tmp_path / "hay"
    setup(folder)
    with pytest.raises(HeadscopeError, match=message):
        load_haystack(folder)


def test_load_needles(tmp_path):
    path = write(tmp_path / "needles.jsonl", json.dumps(NEEDLE) + "\n\n" + json.dumps(NEEDLE) + "\n")
    assert load_needles(path) == [NEEDLE, NEEDLE]


def test_load_needles_accepts_the_original_case_mismatch(tmp_path):
    # From Retrieval_Head's needles.jsonl: real_needle says "Because", the needle "because".
    needle = {"needle": "Mr Green is disliked by everyone because he is a mean person.",
              "question": "Why does everyone dislikes Mr Green ?", "real_needle": "Because he is a mean person."}
    path = write(tmp_path / "needles.jsonl", json.dumps(needle))
    assert load_needles(path) == [needle]
    samples = build_retrieval_samples(word_level_tokenizer(), HAYSTACK, [needle], [100], [50], length_buffer=10)
    start, end = samples[0].span_char
    assert samples[0].prompt[start:end] == "because he is a mean person." == samples[0].span_text
    assert samples[0].answer == "Because he is a mean person."


@pytest.mark.parametrize("content, message", [
    (json.dumps(NEEDLE) + "\n{not json\n", "line 2: not valid JSON"),
    ("[1, 2]\n", "line 1: expected a JSON object"),
    (json.dumps({"needle": "a b", "question": "q"}), "line 1: field 'real_needle' is missing"),
    (json.dumps({**NEEDLE, "question": ""}), "line 1: field 'question' must be a non-empty string"),
    (json.dumps({**NEEDLE, "real_needle": "green tree"}), "line 1: real_needle is not part of needle"),
    ("\n\n", "has no needles"),
])
def test_load_needles_errors(tmp_path, content, message):
    path = write(tmp_path / "needles.jsonl", content)
    with pytest.raises(HeadscopeError, match=message):
        load_needles(path)
    with pytest.raises(HeadscopeError, match="needles file not found"):
        load_needles(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------- retrieval: the grid


def test_linear_lengths_match_numpy():
    expected = np.round(np.linspace(1000, 50000, num=20, endpoint=True)).astype(int).tolist()
    assert linear_lengths(1000, 50000, 20) == expected
    assert linear_lengths(4000, 4000, 1) == [4000]
    assert all(type(x) is int for x in linear_lengths(1000, 2000, 3))
    with pytest.raises(HeadscopeError):
        linear_lengths(2000, 1000, 3)
    with pytest.raises(HeadscopeError):
        linear_lengths(1000, 2000, 0)


def test_depth_percents():
    assert depth_percents(11) == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert depth_percents(4) == [0, 33, 67, 100]
    # sigmoid: 100 / (1 + exp(-0.1 (x - 50))) on x = 0, 25, 50, 75, 100, ends pinned
    assert depth_percents(5, "sigmoid") == [0, 7.586, 50, 92.414, 100]
    sig = depth_percents(10, "sigmoid")
    assert sig[1] - sig[0] < sig[5] - sig[4]  # denser near the ends
    with pytest.raises(HeadscopeError, match="'linear' or 'sigmoid'"):
        depth_percents(5, "log")


# ----------------------------------------------------------------------------- retrieval: samples


def test_needle_at_sentence_boundary_and_depth():
    tok = word_level_tokenizer()
    samples = build_retrieval_samples(tok, HAYSTACK, [NEEDLE], [100], [0, 50, 100], length_buffer=10)
    assert [s.id for s in samples] == ["n0-L100-d0", "n0-L100-d50", "n0-L100-d100"]
    ids = tok.encode(HAYSTACK, add_special_tokens=False)[: 100 - 10 - 8]  # 82 haystack tokens
    # depth 50: token 41, moved back to just after the period at index 35
    assert insertion_point(ids, 50, {tok.convert_tokens_to_ids(".")}) == 36
    d0, d50, d100 = (context_of(s) for s in samples)
    assert d0.startswith(NEEDLE["needle"] + " the cat")
    assert d50.startswith(" ".join([SENTENCE] * 6) + " " + NEEDLE["needle"] + " the cat saw")
    assert d100.endswith(" " + NEEDLE["needle"])  # at the very end, not at the last period
    assert samples[1].meta == {"context_length": 100, "depth_percent": 50, "needle_index": 0, "answer_tokens": 3}
    assert samples[1].answer == "blue river seven" and samples[1].task == "retrieval"
    assert samples[1].add_special_tokens is True


def test_haystack_plus_needle_fill_length_minus_buffer():
    tok = word_level_tokenizer()  # decode/encode round trip keeps the token count
    samples = build_retrieval_samples(tok, HAYSTACK, [NEEDLE], [60, 150], [0, 30, 100], length_buffer=20)
    for s in samples:
        assert len(tok.encode(context_of(s), add_special_tokens=False)) == s.meta["context_length"] - 20


def test_short_haystack_is_repeated():
    tok = word_level_tokenizer()
    samples = build_retrieval_samples(tok, SENTENCE, [NEEDLE], [300], [50], length_buffer=0)
    assert len(tok.encode(context_of(samples[0]), add_special_tokens=False)) == 300
    assert context_of(samples[0]).count("the cat saw a dog .") == (300 - 8) // 6


@pytest.mark.parametrize("chat", [False, True])
def test_span_char_slices_the_inserted_needle(chat):
    tok = byte_level_bpe_tokenizer()
    # the haystack itself holds "blue river seven": the span must point at the inserted needle
    haystack = "The secret code is blue river seven. The dog slept in the old house. " * 30
    needle = {**NEEDLE, "needle": "The Secret code is blue river seven."}
    samples = build_retrieval_samples(tok, haystack, [needle], [120, 200], [0, 40, 100],
                                      length_buffer=30, chat=chat)
    assert len(samples) == 6
    for s in samples:
        start, end = s.span_char
        assert s.prompt[start:end] == "blue river seven" == s.span_text
        assert s.prompt[start - len("The Secret code is "):start] == "The Secret code is "
        assert s.add_special_tokens is (not chat)
        enc = encode_with_span(tok, s, 0.9)
        assert enc.method == "offsets"
        assert tok.decode(enc.input_ids[enc.span[0]:enc.span[1]]) == " blue river seven"
    if chat:
        assert samples[0].prompt.startswith("<|user|>\n<book>")
        assert samples[0].prompt.endswith("</book>\nBased on the content of the book, "
                                          "Question: What is the secret code?\nAnswer:</s>\n<|assistant|>\n")


def test_sigmoid_depths_in_ids():
    samples = build_retrieval_samples(word_level_tokenizer(), HAYSTACK, [NEEDLE], [100],
                                      depth_percents(5, "sigmoid"), length_buffer=10)
    assert [s.id for s in samples] == ["n0-L100-d0", "n0-L100-d7.586", "n0-L100-d50", "n0-L100-d92.414",
                                       "n0-L100-d100"]
    assert samples[1].meta["depth_percent"] == 7.586


@pytest.mark.parametrize("kwargs, message", [
    ({"context_lengths": [18]}, "context length 18 is too short: needle 0 takes 8 tokens"),
    ({"context_lengths": [100, 100]}, "repeat"),
    ({"context_lengths": []}, "no context lengths"),
    ({"depth_percents": [50, 101]}, "from 0 to 100"),
    ({"length_buffer": -1}, "length buffer"),
    ({"needles": []}, "no needles"),
    ({"needles": [{"needle": "a b"}]}, "needle 0 needs non-empty strings"),
])
def test_build_retrieval_errors(kwargs, message):
    args = {"tokenizer": word_level_tokenizer(), "haystack": HAYSTACK, "needles": [NEEDLE],
            "context_lengths": [100], "depth_percents": [50], "length_buffer": 10, **kwargs}
    with pytest.raises(HeadscopeError, match=message):
        build_retrieval_samples(**args)


def test_chat_without_template():
    tok = word_level_tokenizer()
    tok.chat_template = None
    with pytest.raises(HeadscopeError, match="no chat template"):
        build_retrieval_samples(tok, HAYSTACK, [NEEDLE], [100], [50], length_buffer=10, chat=True)


# ----------------------------------------------------------------------------- reasoning


RECORDS = [
    {"example_id": "q1", "context": "the cat saw a dog .", "question": "what did the cat see ?", "answer": "a dog"},
    {"example_id": "q2", "context": "the sun was out all day .", "question": "when ?", "answer": "all day"},
    {"example_id": "q3", "context": "the rain came at night .", "question": "when did it rain ?", "answer": 7},
]


def test_load_reasoning_json_list_and_lines(tmp_path):
    as_list = write(tmp_path / "data.json", json.dumps(RECORDS))
    as_lines = write(tmp_path / "data.jsonl", "\n".join(json.dumps(r) for r in RECORDS) + "\n")
    expected = [{"id": r["example_id"], "context": r["context"], "question": r["question"],
                 "answer": str(r["answer"])} for r in RECORDS]
    assert load_reasoning_data(as_list) == expected
    assert load_reasoning_data(as_lines) == expected


def test_load_reasoning_id_key_and_fields(tmp_path):
    plain = write(tmp_path / "a.jsonl", json.dumps({"id": 5, "context": "c", "question": "q", "answer": "a"}))
    assert load_reasoning_data(plain)[0]["id"] == "5"
    renamed = write(tmp_path / "b.jsonl", json.dumps({"qid": "x", "context": "c", "question": "q", "gold": "g"}))
    fields = parse_fields("id=qid, answer=gold")
    assert fields == {"id": "qid", "answer": "gold"}
    assert load_reasoning_data(renamed, fields=fields) == [{"id": "x", "context": "c", "question": "q", "answer": "g"}]


def test_load_reasoning_sampling_is_seeded_and_keeps_file_order(tmp_path):
    records = [{"id": f"r{i}", "context": "c", "question": "q", "answer": "a"} for i in range(20)]
    path = write(tmp_path / "d.json", json.dumps(records))
    first = load_reasoning_data(path, num_samples=5, seed=3)
    assert first == load_reasoning_data(path, num_samples=5, seed=3)
    ids = [r["id"] for r in first]
    assert ids == sorted(ids, key=lambda x: int(x[1:])) and len(set(ids)) == 5
    assert ids != [r["id"] for r in load_reasoning_data(path, num_samples=5, seed=4)]
    assert len(load_reasoning_data(path, num_samples=20)) == 20


@pytest.mark.parametrize("content, kwargs, message", [
    ("{bad\n", {}, "line 1: not valid JSON"),
    ('[{"id": 1,}]', {}, "not valid JSON"),
    ('{"id": "a", "context": "c", "question": "q"}', {}, r"line 1 \(id a\): missing field 'answer'"),
    ('{"context": "c", "question": "q", "answer": "a"}', {}, "line 1: missing field 'example_id'"),
    ('{"id": "a", "context": "  ", "question": "q", "answer": "a"}', {}, "'context' .* is empty"),
    ('{"id": "a", "context": "c", "question": "q", "answer": ["a"]}', {}, "must be a string"),
    ('{"id": "a", "context": "c", "question": "q", "answer": "a"}\n'
     '{"id": "a", "context": "c", "question": "q", "answer": "a"}', {}, "line 2 .*duplicate id 'a'"),
    ('{"id": "a", "context": "c", "question": "q", "answer": "a"}', {"num_samples": 2}, "only 1 records"),
    ('{"id": "a", "context": "c", "question": "q", "answer": "a"}', {"num_samples": 0}, "positive integer"),
    ('"just a string"', {}, "expected a JSON object"),
    ("", {}, "has no records"),
    ('{"id": "a", "context": "c", "question": "q", "answer": "a"}', {"fields": {"gold": "x"}}, "unknown field"),
])
def test_load_reasoning_errors(tmp_path, content, kwargs, message):
    path = write(tmp_path / "d.jsonl", content)
    with pytest.raises(HeadscopeError, match=message):
        load_reasoning_data(path, **kwargs)


def test_load_reasoning_missing_file(tmp_path):
    with pytest.raises(HeadscopeError, match="not found"):
        load_reasoning_data(tmp_path / "nope.json")


@pytest.mark.parametrize("text", ["id", "id=", "gold=x", "id=a,id=b"])
def test_parse_fields_errors(text):
    with pytest.raises(HeadscopeError, match="--fields"):
        parse_fields(text)


def _records():
    return [{"id": r["example_id"], "context": r["context"], "question": r["question"], "answer": str(r["answer"])}
            for r in RECORDS]


@pytest.mark.parametrize("chat", [False, True])
def test_reasoning_prompt_and_question_span(chat):
    tok = byte_level_bpe_tokenizer()
    samples = build_reasoning_samples(tok, _records(), chat=chat)
    assert [s.id for s in samples] == ["q1", "q2", "q3"]
    s = samples[0]
    text = "Context: the cat saw a dog .\n\nQuestion: what did the cat see ?\n\nAnswer:"
    if chat:
        assert s.prompt == f"<|user|>\n{text}</s>\n<|assistant|>\n" and not s.add_special_tokens
    else:
        assert s.prompt == text and s.add_special_tokens
    start, end = s.span_char
    assert s.prompt[start:end] == "what did the cat see ?" == s.span_text
    assert s.answer == "a dog" and s.task == "reasoning" and s.meta == {"context_length": None}
    assert encode_with_span(tok, s, 0.8).method == "offsets"


def test_reasoning_trims_and_dedupes_lengths():
    tok = word_level_tokenizer()
    record = {"id": "r", "context": " ".join([SENTENCE] * 4), "question": "what did the cat see ?", "answer": "a dog"}
    # 24 context tokens; buffer 10 -> budgets 6, 12, 30, 90: the last two keep the whole context
    samples = build_reasoning_samples(tok, [record], context_lengths=[16, 22, 40, 100], length_buffer=10)
    assert [s.id for s in samples] == ["r-L16", "r-L22", "r-L40"]
    assert samples[0].prompt.startswith("Context: the cat saw a dog .\n\nQuestion:")
    assert samples[2].prompt.startswith("Context: " + record["context"] + "\n\nQuestion:")
    assert [s.meta["covers_lengths"] for s in samples] == [[16], [22], [40, 100]]
    assert [s.meta["context_length"] for s in samples] == [16, 22, 40]
    for s in samples:
        start, end = s.span_char
        assert s.prompt[start:end] == record["question"]


@pytest.mark.parametrize("kwargs, message", [
    ({"context_lengths": [100, 5]}, "above the length buffer"),
    ({"context_lengths": [100, 100]}, "repeat"),
    ({"context_lengths": []}, "no context lengths"),
    ({"length_buffer": -5}, "length buffer"),
])
def test_build_reasoning_errors(kwargs, message):
    with pytest.raises(HeadscopeError, match=message):
        build_reasoning_samples(word_level_tokenizer(), _records(), **{"length_buffer": 10, **kwargs})


def test_modules_expose_the_builders():
    assert callable(retrieval.build_retrieval_samples) and callable(reasoning.build_reasoning_samples)
