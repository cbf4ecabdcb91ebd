"""Tasks: small declarative pieces that turn options and data into `Sample`s for the one engine."""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from ..errors import HeadscopeError
from . import pattern, query, reasoning, retrieval
from .base import Sample

DATA_DIR = resources.files("headscope") / "data"


@dataclass(frozen=True)
class Task:
    name: str
    default_scorer: str
    default_max_new_tokens: int
    span_overlap_threshold: float  # the original token-overlap rule's threshold when locating the span
    span_required: bool  # True: a span that cannot be located is an error for that sample
    success_filter: bool = True  # False: every sample counts, whatever the model answers

    def build(self, options, tokenizer, max_context: int | None) -> list[Sample]:
        return BUILDERS[self.name](options, tokenizer, max_context)


TASKS = {
    "retrieval": Task("retrieval", "retrieval", 50, 0.9, True),
    "reasoning": Task("reasoning", "reasoning", 100, 0.8, False),
    "query": Task("query", "query", 1, 0.8, True, success_filter=False),
    "pattern": Task("pattern", "induction", 1, 0.9, False, success_filter=False),
}


def context_lengths(options, max_context: int | None) -> list[int] | None:
    """Explicit --context-lengths (checked against the model), or the --min/--max/--num-lengths grid (capped)."""
    if options.context_lengths:
        too_long = [length for length in options.context_lengths if max_context and length > max_context]
        if too_long:
            raise HeadscopeError(f"context length {too_long[0]} is larger than the model's maximum of {max_context}")
        return list(options.context_lengths)
    if options.max_length is None:
        return None
    top = min(options.max_length, max_context) if max_context else options.max_length
    if options.min_length > top:
        raise HeadscopeError(f"--min-length {options.min_length} is larger than the model's maximum of {top}")
    return sorted(set(retrieval.linear_lengths(options.min_length, top, options.num_lengths)))


def _build_retrieval(options, tokenizer, max_context):
    haystack = retrieval.load_haystack(options.haystack or DATA_DIR / "haystack")
    needles = retrieval.load_needles(options.needles or DATA_DIR / "needles.jsonl")
    depths = options.depths if options.depths else retrieval.depth_percents(options.num_depths, options.depth_spacing)
    lengths = context_lengths(options, max_context)
    return retrieval.build_retrieval_samples(tokenizer, haystack, needles, lengths, depths,
                                             length_buffer=options.length_buffer, chat=options.chat)


def _build_reasoning(options, tokenizer, max_context):
    records = reasoning.load_reasoning_data(options.data or DATA_DIR / "reasoning.jsonl", fields=options.fields,
                                            num_samples=options.num_samples, seed=options.seed)
    lengths = context_lengths(options, max_context) if options.context_lengths else None
    return reasoning.build_reasoning_samples(tokenizer, records, lengths, length_buffer=options.length_buffer,
                                             chat=options.chat)


def _build_query(options, tokenizer, max_context):
    records = query.load_query_data(options.data or DATA_DIR / "query.jsonl", options.num_samples, options.seed)
    return query.build_query_samples(tokenizer, records, chat=options.chat)


def _build_pattern(options, tokenizer, max_context):
    return pattern.build_pattern_samples(tokenizer, options.block_length, options.block_repeats,
                                         options.num_samples or pattern.DEFAULT_SEQUENCES, options.seed)


def prompt_template(task: str, chat: bool) -> str:
    """The prompt's shape, for the manifest (the builders assemble it from the same pieces)."""
    if task == "pattern":
        return " {w1} ... {wn} {w1} ... {wn} ...  (a block of random words, repeated)"
    if task == "retrieval":
        if chat:
            return retrieval.CHAT_BOOK_PREFIX + "{haystack}" + retrieval.CHAT_BOOK_SUFFIX + "  (as the chat user turn)"
        return "{haystack}" + retrieval.QUESTION_SUFFIX
    text = reasoning.PROMPT_HEAD + "{context}" + reasoning.PROMPT_MIDDLE + "{question}" + reasoning.PROMPT_TAIL
    return text + ("  (as the chat user turn)" if chat else "")


BUILDERS = {"retrieval": _build_retrieval, "reasoning": _build_reasoning, "query": _build_query,
            "pattern": _build_pattern}
