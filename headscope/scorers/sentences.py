"""The sentences of a think segment, as the receiver-head score splits them.

Two rules (`--receiver-sentences`):

original  Thought Anchors (Bogdan et al. 2025; `interp-reasoning/thought-anchors`), whose receiver-head
          pipeline splits the chain's text into chunks (`utils.py`: `split_solution_into_chunks`), finds each
          chunk's character range in the text (`get_chunk_ranges`) and turns the ranges into token ranges by
          tokenizing the text up to each boundary (`attn_funcs.get_sentence_token_boundaries`):
            - a chunk ends at ".", "?" or "!" followed by a space or a newline, or at a blank line;
            - chunks of fewer than 10 characters merge into the next (the last one into the previous);
            - the text after the last chunk end is dropped (the last sentence, unless it ends in ". ");
            - a chunk's range runs from its first character to the next chunk's first character (its
              trailing white space included), except that the end scan of `get_chunk_ranges` stops once
              chunk start + 2 i - 1 reaches the end of the whole text (i: characters scanned) -- a quirk that
              shortens a chunk whose rest of the text is shorter than itself; reproduced;
            - a boundary at character c is the number of tokens of the text's first c characters.
tokens    headscope's earlier rule: a sentence ends at a token whose text ends in . ! ? or holds a newline.

Token boundaries are counted from the first token of the think segment: the think text up to the boundary is
tokenized after the text of the few tokens before the segment, and those tokens' count is taken off. The same
count as the original's tokenization of the whole prefix whenever the tokenization splits where the think
segment starts, as it does after a marker token such as <think> and after a prompt ending in punctuation or
white space.
"""
from __future__ import annotations

import re

SENTENCE_RULES = ("original", "tokens")
MIN_CHUNK_CHARS = 10  # Thought Anchors merges shorter chunks into the next one
SENTENCE_ENDS = (".", "!", "?")


def chunk_texts(text: str) -> list[str]:
    """The chain's chunks (stripped), as Thought Anchors' `split_solution_into_chunks` makes them from the text
    between the think markers."""
    chunks, current = [], ""
    for i, char in enumerate(text):
        current += char
        blank_line = text.startswith("\n\n", i) or text.startswith("\r\n\r\n", i)
        sentence_end = char in SENTENCE_ENDS and i + 1 < len(text) and text[i + 1] in " \n"
        if (blank_line or sentence_end) and current.strip():
            chunks.append(current.strip())
            current = ""
    # what follows the last boundary is not a chunk
    i = 0
    while i < len(chunks):
        if len(chunks[i]) >= MIN_CHUNK_CHARS:
            i += 1
        elif i == len(chunks) - 1:  # the last short chunk joins the previous one (if any)
            if i > 0:
                chunks[i - 1] += " " + chunks.pop(i)
            break
        else:
            chunks[i + 1] = chunks[i] + " " + chunks[i + 1]
            del chunks[i]
    return chunks


def chunk_ranges(text: str, chunks: list[str], text_end: int) -> list[tuple[int, int]]:
    """Each chunk's [start, end) in `text`, as `get_chunk_ranges` finds them: the chunk itself from where the
    previous one ended, else its white-space-collapsed form; the end runs over its non-space characters and
    the white space after them. `text_end`: the length of the whole text the original searches (the chain's
    text may be followed by the answer), which bounds the end scan. A chunk not found is left out, as the
    original leaves it out (its last-resort word-by-word search is not reproduced)."""
    ranges, position = [], 0
    for chunk in chunks:
        start = text.find(chunk, position)
        if start < 0:
            start = _collapsed_find(text, chunk, position)
        if start < 0:
            continue
        content = len(re.sub(r"\s+", "", chunk))  # non-space characters the end scan may pass
        seen, last = 0, start
        for offset in range(len(text) - start):
            if offset > 0 and start + 2 * offset - 1 >= text_end:  # the original's early stop (see module)
                break
            seen += not text[start + offset].isspace()
            if seen > content:
                break
            last = start + offset
        position = last + 1
        ranges.append((start, position))
    return ranges


def _collapsed_find(text: str, chunk: str, position: int) -> int:
    """The first index from `position` where the text, white space collapsed, starts with the chunk collapsed."""
    wanted = re.sub(r"\s+", " ", chunk).strip()
    for start in range(position, len(text) - len(wanted)):
        window = re.sub(r"\s+", " ", text[start:start + len(wanted) + 20]).strip()
        if window.startswith(wanted):
            return start
    return -1


def original_sentences(tokenizer, think_text: str, first_token: int, text_after: int,
                       text_before: str = "") -> list[tuple[int, int]]:
    """Token ranges [start, end) of the Thought Anchors chunks of `think_text`, whose first token sits at
    position `first_token`; `text_after`: characters of the whole text after the think text; `text_before`:
    the text of a few tokens before it, tokenized with each prefix so that the prefix is tokenized in the
    context it has in the whole text (a SentencePiece tokenizer marks a text's first word otherwise)."""
    # the chunks of the stripped text, found in the text itself (Thought Anchors strips the chain, then searches
    # the whole text)
    ranges = chunk_ranges(think_text, chunk_texts(think_text.strip()), len(think_text) + text_after)
    cuts = sorted({c for r in ranges for c in r})
    counts = _token_counts(tokenizer, [text_before] + [text_before + think_text[:c] for c in cuts])
    offset = dict(zip(cuts, (count - counts[0] for count in counts[1:])))
    return [(first_token + offset[a], first_token + offset[b]) for a, b in ranges]


def _token_counts(tokenizer, texts: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def token_rule_sentences(pieces: list[str], start: int, end: int) -> list[tuple[int, int]]:
    """Sentences of tokens [start, end): each ends at a token whose text ends in . ! ? or holds a newline; the
    tokens after the last such end form a last sentence."""
    sentences, first = [], start
    for position in range(start, end):
        text = pieces[position]
        if "\n" in text or text.strip().endswith(SENTENCE_ENDS):
            sentences.append((first, position + 1))
            first = position + 1
    if first < end:
        sentences.append((first, end))
    return sentences
