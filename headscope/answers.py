"""Answer extraction: the part of a response the success metric judges.

A reasoning model writes a chain of thought before its answer; judging the whole response rewards a chain
that mentions the reference anywhere. With `--answer-marker TEXT` only what follows the last TEXT counts (the
organism: "so the answer is"); the marker matches where a word starts ("also the answer is" does not hold
"so the answer is") and its white space is kept. `--answer-from` then takes:
  full         all of it
  after-think  what follows the last `</think>` (where the think segment of the segment scorers ends too)
  boxed        the content of the last \\boxed{...}
  last-number  the last number ("1,234" is 1234; "2,3,5" is three numbers, the last 5)
  regex:P      the last match of the regular expression P (its first group, if it has one)
A response with nothing to extract has no answer: it fails the success filter, whatever the metric.
"""
from __future__ import annotations

import re

import regex  # the standard re has no time limit

from .errors import HeadscopeError

SIMPLE = ("full", "after-think", "boxed", "last-number")
THINK_END = "</think>"
# thousands separators only in groups of three ("1,234,567"); otherwise a comma separates numbers
NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d,]*\d)")
REGEX_SECONDS = 1.0  # a user's pattern may backtrack catastrophically: it gets this long per response


def parse_answer_from(text: str) -> str:
    """The --answer-from value, checked: one of SIMPLE or regex:PATTERN with a valid, non-empty pattern."""
    if text in SIMPLE:
        return text
    if text.startswith("regex:"):
        if not text[len("regex:"):]:
            raise HeadscopeError("--answer-from regex: needs a pattern after the colon, e.g. regex:answer: (\\w+)")
        try:
            regex.compile(text[len("regex:"):])
        except regex.error as error:
            raise HeadscopeError(f"--answer-from {text}: not a valid regular expression ({error})") from None
        return text
    raise HeadscopeError(f"--answer-from must be one of {', '.join(SIMPLE)} or regex:PATTERN, not {text!r}")


def extract_answer(response: str, answer_from: str = "full", marker: str | None = None) -> str | None:
    """The answer in `response`, or None when there is none to extract."""
    text = response
    if marker:
        matches = list(re.finditer(r"(?<!\w)" + re.escape(marker), text))  # starts where a word starts
        if not matches:
            return None
        text = text[matches[-1].end():]
    if answer_from == "after-think":
        at = text.rfind(THINK_END)
        text = text[at + len(THINK_END):] if at >= 0 else None
    elif answer_from == "boxed":
        text = _last_boxed(text)
    elif answer_from == "last-number":
        numbers = NUMBER.findall(text)
        text = numbers[-1].replace(",", "") if numbers else None
    elif answer_from.startswith("regex:"):
        text = _last_match(answer_from[len("regex:"):], text)
    text = text.strip() if text is not None else None
    return text or None


def _last_match(pattern: str, text: str) -> str | None:
    """The last match of the user's pattern (its first group, if it has one), within REGEX_SECONDS."""
    try:
        matches = list(regex.finditer(pattern, text, timeout=REGEX_SECONDS))
    except TimeoutError:
        raise HeadscopeError(f"--answer-from regex:{pattern} ran for more than {REGEX_SECONDS:g} s on a "
                             f"{len(text)}-character response (catastrophic backtracking?): simplify the "
                             "pattern") from None
    if not matches:
        return None
    return matches[-1].group(1) if matches[-1].re.groups else matches[-1].group(0)


def _last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, nested braces included."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, at = 0, start + len("\\boxed{") - 1
    for index in range(at, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[at + 1:index]
    return None  # unbalanced: no answer
