import pytest
from tokenizers_util import (
    NoOffsetsTokenizer,
    byte_level_bpe_tokenizer,
    whitespace_split_tokenizer,
    word_level_tokenizer,
)

from headscope.errors import HeadscopeError
from headscope.tasks.spans import EncodedPrompt, chat_prompt, encode_with_span
from headscope.tasks.base import Sample


def make_sample(prompt, span_text, span_char=None, add_special_tokens=True):
    return Sample(id="s", task="retrieval", prompt=prompt, add_special_tokens=add_special_tokens,
                  answer=span_text or "", span_text=span_text, span_char=span_char)


def span_tokens(tok, enc: EncodedPrompt):
    return tok.convert_ids_to_tokens(enc.input_ids[enc.span[0]:enc.span[1]])


def test_offsets_bpe_token_carries_the_leading_space():
    tok = byte_level_bpe_tokenizer()
    prompt = "The dog slept. The secret code is blue river seven. The cat read a book."
    start = prompt.index("blue")
    enc = encode_with_span(tok, make_sample(prompt, "blue river seven", (start, start + 16)), 0.9)
    assert enc.method == "offsets"
    assert span_tokens(tok, enc) == ["Ġblue", "Ġriver", "Ġseven"]  # " blue" starts one char before the span
    assert enc.input_ids == tok(prompt)["input_ids"]


def test_offsets_token_straddling_the_end_counts_only_with_a_solid_char():
    tok = whitespace_split_tokenizer("the code is blue river seven. it was blue river seven")
    prompt = "the code is blue river seven. it was"
    start = prompt.index("blue")
    # "seven." straddles the span's end: it shares "seven" with the span, so it is inside
    enc = encode_with_span(tok, make_sample(prompt, "blue river seven", (start, start + 16)), 0.9)
    assert span_tokens(tok, enc) == ["blue", "river", "seven."]
    # a span ending in a space does not pull in the next word through that space
    enc = encode_with_span(tok, make_sample(prompt, "the code ", (0, 9)), 0.9)
    assert span_tokens(tok, enc) == ["the", "code"]


def test_offsets_skip_special_tokens_at_position_zero():
    tok = byte_level_bpe_tokenizer()
    prompt = "blue river seven. The dog slept."
    enc = encode_with_span(tok, make_sample(prompt, "blue river seven", (0, 16)), 0.9)
    assert enc.input_ids[0] == tok.bos_token_id  # BOS has offsets (0, 0), right where the span starts
    assert enc.span[0] == 1
    assert tok.decode(enc.input_ids[enc.span[0]:enc.span[1]]) == "blue river seven"
    no_bos = encode_with_span(tok, make_sample(prompt, "blue river seven", (0, 16), add_special_tokens=False), 0.9)
    assert no_bos.input_ids[0] != tok.bos_token_id and no_bos.span == (0, enc.span[1] - 1)


def test_span_text_without_char_offsets_takes_the_last_occurrence():
    tok = word_level_tokenizer()
    prompt = "the blue river ran . what is the blue river ?"
    enc = encode_with_span(tok, make_sample(prompt, "blue river"), 0.8)
    assert enc.method == "offsets"
    assert enc.span == (9, 11)  # BOS + "the blue river ran . what is the" -> second "blue river"


def test_subsequence_when_the_text_is_not_verbatim():
    tok = word_level_tokenizer()  # lowercases: "BLUE RIVER" has the same tokens as "blue river"
    prompt = "the blue river ran . the blue river slept ."
    enc = encode_with_span(tok, make_sample(prompt, "BLUE RIVER"), 0.9)
    assert enc.method == "subsequence"
    assert enc.span == (7, 9)  # last occurrence


def test_subsequence_with_a_slow_tokenizer_and_leading_space_variant():
    fast = byte_level_bpe_tokenizer()
    tok = NoOffsetsTokenizer(fast)
    prompt = "The secret code is blue river seven. The dog slept."
    # "blue river" alone does not tokenize like it does mid-sentence; " blue river" does
    alone = fast.encode("blue river", add_special_tokens=False)
    spaced = fast.encode(" blue river", add_special_tokens=False)
    assert fast.convert_ids_to_tokens(spaced) == ["Ġblue", "Ġriver"] and alone != spaced
    enc = encode_with_span(tok, make_sample(prompt, "blue river", (19, 29)), 0.9)
    assert enc.method == "subsequence"
    assert enc.input_ids[enc.span[0]:enc.span[1]] == spaced


def test_overlap_fallback_uses_the_threshold():
    tok = NoOffsetsTokenizer(word_level_tokenizer())
    prompt = "the dog slept . the blue river seven ran . the end"
    # "blue river seven nine" is not in the prompt; its window holds 3 of its 4 distinct tokens
    sample = make_sample(prompt, "blue river seven nine")
    enc = encode_with_span(tok, sample, 0.7)
    assert enc.method == "overlap"
    # BOS the dog slept . | the blue river seven: already 3 of 4, and the rule takes the first window
    assert enc.span == (5, 9)
    assert encode_with_span(tok, sample, 0.75).method == "missing"  # 0.75 is not > 0.75


def test_missing_span():
    tok = word_level_tokenizer()
    enc = encode_with_span(tok, make_sample("the dog slept .", "quiet loud night"), 0.9)
    assert enc.span is None and enc.method == "missing"
    assert enc.input_ids == tok("the dog slept .")["input_ids"]
    assert encode_with_span(tok, make_sample("the dog slept .", None), 0.9).method == "missing"


def test_span_char_outside_the_prompt():
    with pytest.raises(HeadscopeError, match="outside its prompt"):
        encode_with_span(word_level_tokenizer(), make_sample("the dog", "dog", (4, 99)), 0.9)


def test_chat_prompt_locates_the_user_text():
    tok = byte_level_bpe_tokenizer()
    prompt, at = chat_prompt(tok, "What is the secret code?")
    assert prompt[at:at + 24] == "What is the secret code?"
    assert prompt.endswith("<|assistant|>\n")
    tok.chat_template = None
    with pytest.raises(HeadscopeError, match="no chat template"):
        chat_prompt(tok, "hi")
    tok.chat_template = "{{ messages[0]['content'] | upper }}"
    with pytest.raises(HeadscopeError, match="rewrote the user message"):
        chat_prompt(tok, "hi")
