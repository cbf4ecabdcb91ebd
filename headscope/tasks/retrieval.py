"""Needle in a haystack, built like the Retrieval_Head script (Wu et al. 2024, after gkamradt's NIAH test).

For each needle x context length x depth: take the haystack's first tokens, put the needle right after
the sentence end nearest (before) `depth` percent of them, and ask the needle's question after the text.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from headscope import bundled
from headscope.errors import HeadscopeError, notify
from headscope.tasks.spans import chat_prompt
from headscope.validate import data_file
from dataclasses import dataclass

from headscope.options import option, parse_floats
from headscope.tasks.base import DATA_DIR, ContextOptions, Sample, Task, checked_lengths, register_task

NEEDLE_FIELDS = ("needle", "question", "real_needle")
QUESTION_SUFFIX = "\nBased on the content of the book, Question: {question}\nAnswer:"
CHAT_BOOK_PREFIX = "<book>"
CHAT_BOOK_SUFFIX = "</book>\nBased on the content of the book, Question: {question}\nAnswer:"


# ----------------------------------------------------------------------------- loading


# A haystack is read only as far as the grid needs: its longest context, at this many characters a token (English
# prose runs about 4), so a 1 GB .txt is neither read nor tokenized whole. Only the first tokens are used.
CHARS_PER_TOKEN = 32


def haystack_files(folder: Path) -> list[Path]:
    """The files a haystack is read from: the .txt files directly inside `folder` (links followed), in name order."""
    return sorted(path for path in Path(folder).glob("*.txt") if path.is_file())


def load_haystack(haystack_dir, max_chars: int | None = None) -> str:
    """The .txt files directly inside `haystack_dir`, in name order, concatenated: at most `max_chars`
    characters of them."""
    folder = Path(haystack_dir)
    if not folder.is_dir():
        raise HeadscopeError(f"haystack folder not found: {folder}")
    files = haystack_files(folder)
    if not files:
        raise HeadscopeError(f"haystack folder {folder} has no .txt files")
    parts, left = [], max_chars
    for path in files:
        if left is not None and left <= 0:
            break
        try:
            with open(path, encoding="utf-8") as file:
                text = file.read(-1 if left is None else left)
        except UnicodeDecodeError as e:
            raise HeadscopeError(f"haystack file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
        # Keep the last word of one file from gluing onto the first word of the next.
        if parts and parts[-1] and not parts[-1][-1].isspace():
            parts.append("\n")
        parts.append(text)
        left = None if left is None else left - len(text) - 1
    haystack = "".join(parts)
    if not haystack.strip():
        raise HeadscopeError(f"haystack folder {folder} holds only empty .txt files")
    return haystack


def _find_real_needle(needle: str, real_needle: str) -> re.Match | None:
    # Case-insensitive, so the original needles.jsonl loads: its "Mr Green" needle says "because he is"
    # while its real_needle says "Because he is".
    return re.search(re.escape(real_needle), needle) or re.search(re.escape(real_needle), needle, re.IGNORECASE)


def load_needles(path) -> list[dict]:
    """Needles from JSON Lines: one {"needle", "question", "real_needle"} object a line (blank lines skipped).

    An optional "answer" (HeadKV's retrieval-reasoning needles) is the expected response when it is not
    the real_needle itself: the span stays real_needle, the success metric compares against the answer.
    """
    path = data_file(path, "needles file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise HeadscopeError(f"needles file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    needles = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise HeadscopeError(f"{path} line {line_no}: not valid JSON ({e.msg})") from e
        except RecursionError:
            raise HeadscopeError(f"{path} line {line_no} is nested too deeply to be a needle") from None
        if not isinstance(record, dict):
            raise HeadscopeError(f"{path} line {line_no}: expected a JSON object, got {type(record).__name__}")
        for name in NEEDLE_FIELDS:
            value = record.get(name)
            if not isinstance(value, str) or not value.strip():
                what = "is missing" if value is None else "must be a non-empty string"
                raise HeadscopeError(f"{path} line {line_no}: field {name!r} {what}")
        if _find_real_needle(record["needle"], record["real_needle"]) is None:
            raise HeadscopeError(f"{path} line {line_no}: real_needle is not part of needle")
        needle = {name: record[name] for name in NEEDLE_FIELDS}
        if isinstance(record.get("answer"), str) and record["answer"].strip():
            needle["answer"] = record["answer"]  # HeadKV's r2 needles: the span is the facts, the answer differs
        needles.append(needle)
    if not needles:
        raise HeadscopeError(f"needles file {path} has no needles")
    return needles


# ----------------------------------------------------------------------------- the grid


def linear_lengths(min_length: int, max_length: int, num: int) -> list[int]:
    """`num` context lengths evenly spaced from min to max, rounded like np.round(np.linspace(...))."""
    if num < 1:
        raise HeadscopeError(f"number of context lengths must be at least 1, got {num}")
    if min_length < 1 or max_length < min_length:
        raise HeadscopeError(f"context lengths need 1 <= min <= max, got min {min_length}, max {max_length}")
    lengths = np.round(np.linspace(min_length, max_length, num=num, endpoint=True)).astype(int)
    return list(dict.fromkeys(int(x) for x in lengths))  # a narrow range can round two points together


def _logistic(x: float) -> float:
    # The NIAH test's sigmoid spacing: 100 / (1 + exp(-0.1 * (x - 50))), rounded to 3 decimals, with the
    # ends pinned to exactly 0 and 100.
    if x == 0:
        return 0.0
    if x == 100:
        return 100.0
    return float(np.round(100 / (1 + np.exp(-0.1 * (x - 50))), 3))


def depth_percents(num: int, spacing: str = "linear") -> list[int | float]:
    """`num` needle depths from 0 to 100 percent.

    linear:  round(linspace(0, 100, num)) -> ints, evenly spaced.
    sigmoid: x = linspace(0, 100, num); depth = 100 / (1 + exp(-0.1 * (x - 50))) rounded to 3 decimals,
             with 0 and 100 kept exact -> denser near the start and the end of the document.
    """
    if num < 1:
        raise HeadscopeError(f"number of depths must be at least 1, got {num}")
    grid = np.linspace(0, 100, num=num, endpoint=True)
    if spacing == "linear":
        return list(dict.fromkeys(int(x) for x in np.round(grid).astype(int)))
    if spacing == "sigmoid":
        return list(dict.fromkeys(_tidy_depth(_logistic(float(x))) for x in grid))
    raise HeadscopeError(f"depth spacing must be 'linear' or 'sigmoid', got {spacing!r}")


def _check_lengths(lengths) -> None:
    if not lengths:
        raise HeadscopeError("no context lengths given")
    for length in lengths:
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
            raise HeadscopeError(f"context lengths must be positive integers, got {length!r}")
    if len(set(lengths)) != len(lengths):
        raise HeadscopeError(f"context lengths repeat: {list(lengths)}")


def _check_depths(depths) -> None:
    if not depths:
        raise HeadscopeError("no depth percents given")
    for depth in depths:
        if isinstance(depth, bool) or not isinstance(depth, (int, float, np.number)) or not 0 <= depth <= 100:
            raise HeadscopeError(f"depth percents must be numbers from 0 to 100, got {depth!r}")
    if len(set(depths)) != len(depths):
        raise HeadscopeError(f"depth percents repeat: {list(depths)}")


def _tidy_depth(depth) -> int | float:
    depth = float(depth)
    return int(depth) if depth.is_integer() else depth


# ----------------------------------------------------------------------------- building prompts


def _haystack_ids(tokenizer, haystack: str, tokens_needed: int) -> list[int]:
    """Haystack tokens (no special tokens), at least `tokens_needed` of them.

    Like the original, a short haystack is repeated as text until it is long enough.
    """
    # verbose=False: the haystack is longer than the model on purpose; no "sequence too long" warning.
    ids = list(tokenizer.encode(haystack, add_special_tokens=False, verbose=False))
    if not ids:
        raise HeadscopeError("the haystack tokenizes to nothing")
    if len(ids) < tokens_needed:
        joiner = "" if haystack[-1].isspace() else "\n"
        copies = math.ceil(tokens_needed / len(ids)) + 1  # +1: joins can tokenize a little shorter
        ids = list(tokenizer.encode(joiner.join([haystack] * copies), add_special_tokens=False, verbose=False))
    return ids


def _period_ids(tokenizer, ids: list[int]) -> set[int]:
    """Tokens that end a sentence: the ones that decode to "." (give or take whitespace)."""
    unique = sorted(set(ids))
    texts = tokenizer.batch_decode([[i] for i in unique])
    return {i for i, text in zip(unique, texts) if text.strip() == "."}


def insertion_point(ids: list[int], depth: float, period_ids: set[int]) -> int:
    """Token index the needle goes in front of: `depth` percent into `ids`, moved back until the token
    before it is a period (0 when there is none). Depth 100 puts the needle at the very end."""
    if depth >= 100:
        return len(ids)
    point = int(len(ids) * (depth / 100))
    while point > 0 and ids[point - 1] not in period_ids:
        point -= 1
    return point


def insert_needle(tokenizer, ids: list[int], text: str, needle: str, point: int) -> tuple[str, int]:
    """Put `needle` into the haystack at token `point`; `text` is tokenizer.decode(ids).

    Returns the new text and the character offset of the needle in it. The needle is pasted in as
    text (never round-tripped through tokens), so its offsets are exact.
    """
    before = tokenizer.decode(ids[:point])
    if text.startswith(before):
        after = text[len(before):]  # keeps the spacing of the whole decode at the seam
    else:
        after = tokenizer.decode(ids[point:])
    # One space keeps the needle from gluing onto "end." or the next word (Llama's tokenizer gave the
    # original that space for free; byte-level BPE does not).
    space_before = " " if before and not before[-1].isspace() and not needle[0].isspace() else ""
    space_after = " " if after and not after[0].isspace() and not needle[-1].isspace() else ""
    start = len(before) + len(space_before)
    return before + space_before + needle + space_after + after, start


def _depth_label(depth) -> str:
    return f"{depth:g}" if isinstance(depth, float) else str(depth)


def build_retrieval_samples(
    tokenizer,
    haystack: str,
    needles: list[dict],
    context_lengths,
    depth_percents,
    length_buffer: int = 200,
    chat: bool = False,
) -> list[Sample]:
    """One Sample per needle x context length x depth, in that nesting order.

    As in the original, haystack + needle fill `length - length_buffer` tokens (the buffer leaves room
    for the question, template and answer): the haystack is cut to length - buffer - needle tokens.
    """
    if not needles:
        raise HeadscopeError("no needles given")
    for i, needle in enumerate(needles):
        if not all(isinstance(needle.get(name), str) and needle[name] for name in NEEDLE_FIELDS):
            raise HeadscopeError(f"needle {i} needs non-empty strings for {', '.join(NEEDLE_FIELDS)}")
    context_lengths = [int(x) if isinstance(x, np.integer) else x for x in context_lengths]
    _check_lengths(context_lengths)
    depths = list(depth_percents)
    _check_depths(depths)
    depths = [_tidy_depth(d) for d in depths]
    if isinstance(length_buffer, bool) or not isinstance(length_buffer, int) or length_buffer < 0:
        raise HeadscopeError(f"length buffer must be a non-negative integer, got {length_buffer!r}")

    needle_sizes = [len(tokenizer.encode(n["needle"], add_special_tokens=False)) for n in needles]
    for i, size in enumerate(needle_sizes):
        room = min(context_lengths) - length_buffer - size
        if room < 1:
            raise HeadscopeError(
                f"context length {min(context_lengths)} is too short: needle {i} takes {size} tokens "
                f"and the buffer {length_buffer}, leaving no haystack"
            )
    tokens_needed = max(context_lengths) - length_buffer - min(needle_sizes)
    haystack_ids = _haystack_ids(tokenizer, haystack, tokens_needed)
    period_ids = _period_ids(tokenizer, haystack_ids[:tokens_needed])

    # How many tokens each answer has: HeadKV's r2 scores only that many decoding steps.
    answer_tokens = [len(tokenizer.encode(n.get("answer") or n["real_needle"], add_special_tokens=False))
                     for n in needles]
    samples = []
    for i, (needle, size) in enumerate(zip(needles, needle_sizes)):
        match = _find_real_needle(needle["needle"], needle["real_needle"])
        if match is None:
            raise HeadscopeError(f"needle {i}: real_needle is not part of needle")
        for length in context_lengths:
            ids = haystack_ids[: length - length_buffer - size]
            text = tokenizer.decode(ids)
            for depth in depths:
                context, needle_at = insert_needle(
                    tokenizer, ids, text, needle["needle"], insertion_point(ids, depth, period_ids)
                )
                if chat:
                    user = CHAT_BOOK_PREFIX + context + CHAT_BOOK_SUFFIX.format(question=needle["question"])
                    prompt, user_at = chat_prompt(tokenizer, user, chat)
                    context_at = user_at + len(CHAT_BOOK_PREFIX)
                else:
                    prompt = context + QUESTION_SUFFIX.format(question=needle["question"])
                    context_at = 0
                span_start = context_at + needle_at + match.start()
                span_end = context_at + needle_at + match.end()
                samples.append(
                    Sample(
                        id=f"n{i}-L{length}-d{_depth_label(depth)}",
                        task="retrieval",
                        prompt=prompt,
                        add_special_tokens=not chat,
                        answer=needle.get("answer") or needle["real_needle"],
                        span_text=prompt[span_start:span_end],  # = real_needle, in the needle's own casing
                        span_char=(span_start, span_end),
                        meta={"context_length": length, "depth_percent": depth, "needle_index": i,
                              "answer_tokens": answer_tokens[i]},
                        question_char=context_at + len(context),
                    )
                )
    return samples


# ----------------------------------------------------------------------------- the task


@dataclass
class RetrievalOptions(ContextOptions):
    min_length: int = option(1000, "shortest context of the grid", group="context lengths", minimum=1,
                             excludes=("context_lengths",))
    max_length: int | None = option(50000, "longest context of the grid (capped at the model's maximum)",
                                    group="context lengths", minimum=1, excludes=("context_lengths",))
    num_lengths: int = option(20, "context lengths in the grid, evenly spaced", group="context lengths", minimum=1,
                              excludes=("context_lengths",))
    haystack: str | None = option(None, "folder of .txt files (default: English essays, CC0, in data/prose; the "
                                        "organism: its own synthetic text)", group="data")
    needles: str | None = option(None, "JSON Lines of {needle, question, real_needle} (default: needles written "
                                       "for the default haystack)", group="data")
    depths: list[float] | None = option(None, "needle depths in percent, e.g. 0,50,100", group="data",
                                        parse=parse_floats, minimum=0, maximum=100)
    num_depths: int = option(10, "needle depths from 0 to 100%", group="data", minimum=1, excludes=("depths",))
    depth_spacing: str = option("linear", "how the depths are spaced", group="data", choices=("linear", "sigmoid"),
                                excludes=("depths",))
    r2_steps: str = option("answer", "the r2 scorer's steps: answer (as HeadKV: the first |answer tokens| steps) "
                                     "or all (every decoded step)", group="r2 score", choices=("answer", "all"),
                             ablate=False)


def grid_lengths(options: RetrievalOptions, max_context: int | None) -> list[int]:
    """Explicit --context-lengths (checked against the model), or the --min/--max/--num-lengths grid (capped)."""
    if options.context_lengths:
        return checked_lengths(options.context_lengths, max_context)
    top = min(options.max_length, max_context) if max_context else options.max_length
    if top < options.max_length:
        notify(f"--max-length {options.max_length} is beyond the model's maximum context of {max_context}: the "
               f"grid stops at {top}")
    if options.min_length > top:
        raise HeadscopeError(f"--min-length {options.min_length} is larger than the model's maximum of {top}")
    return sorted(set(linear_lengths(options.min_length, top, options.num_lengths)))


def default_data(model: str | None) -> tuple[Path, Path]:
    """(haystack folder, needles file) when none is given: the organism's own synthetic world for the bundled
    organisms (organism, thinker), real English prose (data/prose/, CC0) with needles written for it for every
    other model."""
    if bundled.name_of(model) in ("organism", "thinker"):
        return DATA_DIR / "haystack", DATA_DIR / "needles.jsonl"
    return DATA_DIR / "prose", DATA_DIR / "prose_needles.jsonl"


def build(options: RetrievalOptions, tokenizer, max_context: int | None) -> list[Sample]:
    haystack_dir, needles_file = default_data(options.model)
    lengths = grid_lengths(options, max_context)
    haystack = load_haystack(options.haystack or haystack_dir, max(lengths) * CHARS_PER_TOKEN)
    needles = load_needles(options.needles or needles_file)
    depths = options.depths if options.depths else depth_percents(options.num_depths, options.depth_spacing)
    return build_retrieval_samples(tokenizer, haystack, needles, lengths, depths,
                                   length_buffer=options.length_buffer, chat=options.chat)


def prompt_template(chat: bool) -> str:
    if chat:
        return CHAT_BOOK_PREFIX + "{haystack}" + CHAT_BOOK_SUFFIX + "  (as the chat user turn)"
    return "{haystack}" + QUESTION_SUFFIX


register_task(Task("retrieval", "needle-in-a-haystack retrieval heads (Wu et al. 2024)", RetrievalOptions, build,
                   "retrieval", prompt_template, span_overlap_threshold=0.9, span_required=True,
                   organism_defaults={"min_length": 300, "max_length": 1200, "num_lengths": 4, "num_depths": 5},
                   data_files=lambda options: [*haystack_files(options.haystack or default_data(options.model)[0]),
                                               options.needles or default_data(options.model)[1]]))
