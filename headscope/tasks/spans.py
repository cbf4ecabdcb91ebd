"""Tokenise a prompt and find which tokens hold the span (the needle answer, or the question).

Tried in order, first hit wins:
  offsets      character offsets of the span mapped through a fast tokenizer's offset mapping (exact)
  subsequence  the span's own tokens, with or without a leading space, found verbatim (last occurrence)
  overlap      the Retrieval_Head rule: first window of len(span tokens) holding more than
               `overlap_threshold` of the span's distinct tokens
  missing      nothing matched: span is None
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from headscope.errors import HeadscopeError

if TYPE_CHECKING:  # a runtime import would cycle: headscope.tasks imports this module for chat_prompt
    from headscope.tasks.base import Sample


@dataclass
class EncodedPrompt:
    input_ids: list[int]
    span: tuple[int, int] | None  # [start, end) token indices into input_ids
    method: str  # "offsets" | "subsequence" | "overlap" | "missing"


def chat_prompt(tokenizer, user_text: str, chat: bool | dict = True) -> tuple[str, int]:
    """Render `user_text` as the one user turn of the tokenizer's chat template; `chat` may be a dict of the
    template's keyword arguments (e.g. {"enable_thinking": True}, from --chat-template-kwargs).

    Returns the prompt and the character offset of `user_text` inside it, so builders can keep exact
    span offsets through the template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise HeadscopeError("the tokenizer has no chat template: use --chat off")
    messages = [{"role": "user", "content": user_text}]
    try:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                               **(chat if isinstance(chat, dict) else {}))
    except Exception as e:  # jinja errors, templates that demand a system turn, ...
        raise HeadscopeError(f"the tokenizer's chat template failed: {e}".splitlines()[0]) from e
    at = prompt.find(user_text)
    if at < 0:
        raise HeadscopeError("the chat template rewrote the user message, so spans cannot be located: use --chat off")
    return prompt, at


def _char_span(sample: Sample) -> tuple[int, int] | None:
    if sample.span_char is not None:
        start, end = sample.span_char
        if not 0 <= start < end <= len(sample.prompt):
            raise HeadscopeError(f"sample {sample.id}: span_char {sample.span_char} is outside its prompt")
        return start, end
    if sample.span_text:
        start = sample.prompt.rfind(sample.span_text)  # the question comes last; the needle is unique
        if start >= 0:
            return start, start + len(sample.span_text)
    return None


def _span_from_offsets(prompt: str, offsets, char_span: tuple[int, int]) -> tuple[int, int] | None:
    start, end = char_span
    # A token belongs to the span if it shares a non-space character with it: BPE's " blue" carries the
    # space before the span, and a merged "seven." carries the period after it.
    all_space = prompt[start:end].isspace()
    inside = []
    for i, (tok_start, tok_end) in enumerate(offsets):
        if tok_start >= tok_end:  # special tokens (BOS, ...) have empty offsets (0, 0)
            continue
        lo, hi = max(tok_start, start), min(tok_end, end)
        if lo < hi and (all_space or not prompt[lo:hi].isspace()):
            inside.append(i)
    if not inside:
        return None
    return inside[0], inside[-1] + 1


def _span_token_variants(tokenizer, span_text: str) -> list[list[int]]:
    variants = []
    for text in (span_text, " " + span_text):
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        if ids and ids not in variants:
            variants.append(ids)
    return variants


def _last_subsequence(ids: list[int], pattern: list[int]) -> int:
    n = len(pattern)
    for start in range(len(ids) - n, -1, -1):
        if ids[start] == pattern[0] and ids[start : start + n] == pattern:
            return start
    return -1


def _first_overlap_window(ids: list[int], pattern: list[int], threshold: float) -> int:
    """First start whose window of len(pattern) tokens holds > threshold of the pattern's distinct tokens.

    Same rule as Retrieval_Head's find_needle_idx, computed with a sliding count instead of a set per window.
    """
    wanted = set(pattern)
    width = len(pattern)
    counts: Counter = Counter()
    present = 0  # distinct wanted tokens inside the current window
    for end in range(len(ids)):
        tok = ids[end]
        if tok in wanted:
            counts[tok] += 1
            present += counts[tok] == 1
        if end >= width:
            old = ids[end - width]
            if old in wanted:
                counts[old] -= 1
                present -= counts[old] == 0
        if end >= width - 1 and present / len(wanted) > threshold:
            return end - width + 1
    return -1


def encode_with_span(tokenizer, sample: Sample, overlap_threshold: float) -> EncodedPrompt:
    """Tokenise `sample.prompt` and locate its span (see the module docstring for the order)."""
    char_span = _char_span(sample)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(sample.prompt, add_special_tokens=sample.add_special_tokens, return_offsets_mapping=True)
        input_ids = list(enc["input_ids"])
        if char_span is not None:
            span = _span_from_offsets(sample.prompt, enc["offset_mapping"], char_span)
            if span is not None:
                return EncodedPrompt(input_ids, span, "offsets")
    else:
        input_ids = list(tokenizer(sample.prompt, add_special_tokens=sample.add_special_tokens)["input_ids"])

    span_text = sample.span_text
    if not span_text and char_span is not None:
        span_text = sample.prompt[char_span[0] : char_span[1]]
    if not span_text:
        return EncodedPrompt(input_ids, None, "missing")

    variants = _span_token_variants(tokenizer, span_text)
    best = None  # (start, length) of the latest exact match over both variants
    for pattern in variants:
        start = _last_subsequence(input_ids, pattern)
        if start >= 0 and (best is None or start > best[0]):
            best = (start, len(pattern))
    if best is not None:
        return EncodedPrompt(input_ids, (best[0], best[0] + best[1]), "subsequence")

    for pattern in variants:
        start = _first_overlap_window(input_ids, pattern, overlap_threshold)
        if start >= 0:
            return EncodedPrompt(input_ids, (start, start + len(pattern)), "overlap")
    return EncodedPrompt(input_ids, None, "missing")


def excerpt(tokenizer, input_ids: list[int], span: tuple[int, int] | None, before: int = 48,
            after: int = 24) -> list[str]:
    """The prompt around its span as [text before, the span, text after], decoded from the very tokens the
    scorers used (so what a reader sees highlighted is what was scored); with no span, the prompt's last
    `before + after` tokens. Kept in samples.jsonl for `headscope report`'s sample browser."""
    start, end = span if span is not None else (len(input_ids), len(input_ids))
    first = max(0, start - (before if span is not None else before + after))
    last = min(len(input_ids), end + after)
    # Decode growing prefixes of one window and cut the text where each grows: decoding the three pieces
    # apart would drop the spaces a tokenizer puts between tokens (word-level, SentencePiece).
    texts = [tokenizer.decode(input_ids[first:stop], skip_special_tokens=False) for stop in (start, end, last)]
    if texts[0] == texts[1][:len(texts[0])] and texts[1] == texts[2][:len(texts[1])]:
        pieces = [texts[0], texts[1][len(texts[0]):], texts[2][len(texts[1]):]]
    else:  # a tokenizer whose decoding of a prefix is not a prefix of the whole: decode the pieces apart
        pieces = [tokenizer.decode(input_ids[a:b], skip_special_tokens=False) for a, b in
                  ((first, start), (start, end), (end, last))]
    return [("… " if first > 0 else "") + pieces[0], pieces[1], pieces[2] + (" …" if last < len(input_ids) else "")]
