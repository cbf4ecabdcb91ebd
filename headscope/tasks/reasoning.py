"""Question answering over a context: the prompts whose question tokens drive reasoning-head scores."""
from __future__ import annotations

import json
import random
from pathlib import Path

from headscope import bundled
from headscope.errors import HeadscopeError
from headscope.validate import data_file
from headscope.tasks.spans import chat_prompt
from dataclasses import dataclass

from headscope.options import option
from headscope.tasks.base import DATA_DIR, ContextOptions, Sample, Task, checked_lengths, register_task

RECORD_FIELDS = ("id", "context", "question", "answer")
DEFAULT_ID_KEYS = ("example_id", "id")  # tried in this order when --fields does not name the id
PROMPT_HEAD = "Context: "
PROMPT_MIDDLE = "\n\nQuestion: "
PROMPT_TAIL = "\n\nAnswer:"


def parse_fields(text: str) -> dict[str, str]:
    """"id=qid,answer=gold" -> {"id": "qid", "answer": "gold"}: our field name = the file's key."""
    fields = {}
    for pair in str(text).split(","):
        ours, sep, theirs = (part.strip() for part in pair.partition("="))
        if not sep or not ours or not theirs:
            raise HeadscopeError(f"--fields: expected name=key pairs like 'id=qid,answer=gold', got {pair.strip()!r}")
        if ours not in RECORD_FIELDS:
            raise HeadscopeError(f"--fields: unknown field {ours!r}, choose from {', '.join(RECORD_FIELDS)}")
        if ours in fields:
            raise HeadscopeError(f"--fields: {ours!r} is given twice")
        fields[ours] = theirs
    return fields


def _read_records(path: Path) -> list[tuple[str, object]]:
    """(where, record) pairs from a JSON list or JSON Lines; `where` names the record in errors."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise HeadscopeError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise HeadscopeError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from e
        except RecursionError:
            raise HeadscopeError(f"{path} is nested too deeply to be a data file") from None
        return [(f"{path} record {i}", record) for i, record in enumerate(data)]
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path} line {line_no}", json.loads(line)))
        except json.JSONDecodeError as e:
            whole_object(path, text)
            raise HeadscopeError(f"{path} line {line_no}: not valid JSON ({e.msg})") from e
        except RecursionError:
            raise HeadscopeError(f"{path} line {line_no} is nested too deeply to be a record") from None
    return records


def whole_object(path: Path, text: str) -> None:
    """A file that is one JSON object over several lines (`{"data": [...]}`, pretty-printed) is valid JSON, but
    neither a list of records nor JSON Lines: say so (with the list it holds), not "not valid JSON"."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        held = f"; its {lists[0]!r} holds a list: give that list" if lists else ""
        raise HeadscopeError(f"{path} is one JSON object, not records: give a JSON list of records or JSON Lines, "
                             f"one record per line{held}")


def _text_field(record: dict, key: str, where: str, ours: str) -> str:
    if key not in record:
        raise HeadscopeError(f"{where}: missing field {key!r} (the {ours}; map it with --fields {ours}=KEY)")
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise HeadscopeError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return str(value)


def load_reasoning_data(path, fields: dict | None = None, num_samples: int | None = None, seed: int = 0) -> list[dict]:
    """Records as {"id", "context", "question", "answer"} strings, in file order.

    `fields` maps our names to the file's keys. With `num_samples`, N records are drawn with
    random.Random(seed).sample and returned in file order.
    """
    path = data_file(path, "reasoning data file")
    fields = dict(fields or {})
    for ours in fields:
        if ours not in RECORD_FIELDS:
            raise HeadscopeError(f"unknown field {ours!r} in fields, choose from {', '.join(RECORD_FIELDS)}")

    records, seen = [], {}
    for where, raw in _read_records(path):
        if not isinstance(raw, dict):
            raise HeadscopeError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        id_key = fields.get("id") or next((k for k in DEFAULT_ID_KEYS if k in raw), DEFAULT_ID_KEYS[0])
        record = {"id": _text_field(raw, id_key, where, "id")}
        if not record["id"].strip():
            raise HeadscopeError(f"{where}: field {id_key!r} (the id) is empty")
        where = f"{where} (id {record['id']})"
        for ours in ("context", "question", "answer"):
            value = _text_field(raw, fields.get(ours, ours), where, ours)
            if not value.strip():
                raise HeadscopeError(f"{where}: field {fields.get(ours, ours)!r} (the {ours}) is empty")
            record[ours] = value
        if record["id"] in seen:
            raise HeadscopeError(f"{where}: duplicate id {record['id']!r} (first at {seen[record['id']]})")
        seen[record["id"]] = where
        records.append(record)
    if not records:
        raise HeadscopeError(f"reasoning data file {path} has no records")

    return pick_records(records, num_samples, seed, path)


def pick_records(records: list[dict], num_samples: int | None, seed: int, path) -> list[dict]:
    """`num_samples` records drawn with `seed` (in file order), or all of them; more than the file holds is
    refused, never silently capped (every task that samples its data file draws here)."""
    if num_samples is None:
        return records
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise HeadscopeError(f"number of samples must be a positive integer, got {num_samples!r}")
    if num_samples > len(records):
        raise HeadscopeError(f"asked for {num_samples} samples but {path} has only {len(records)} records")
    picked = sorted(random.Random(seed).sample(range(len(records)), num_samples))
    return [records[i] for i in picked]


def _prompt(tokenizer, context: str, question: str, chat: bool) -> tuple[str, int]:
    """The prompt and the character offset of the question in it."""
    user = PROMPT_HEAD + context + PROMPT_MIDDLE + question + PROMPT_TAIL
    question_at = len(PROMPT_HEAD) + len(context) + len(PROMPT_MIDDLE)
    if not chat:
        return user, question_at
    prompt, user_at = chat_prompt(tokenizer, user, chat)
    return prompt, user_at + question_at


def _sample(tokenizer, record: dict, context: str, length: int | None, chat: bool) -> Sample:
    prompt, question_at = _prompt(tokenizer, context, record["question"], chat)
    return Sample(
        id=record["id"] if length is None else f"{record['id']}-L{length}",
        task="reasoning",
        prompt=prompt,
        add_special_tokens=not chat,
        answer=record["answer"],
        span_text=record["question"],
        span_char=(question_at, question_at + len(record["question"])),
        meta={"context_length": length},
        question_char=question_at - len(PROMPT_MIDDLE),  # the context ends where PROMPT_MIDDLE begins
    )


def build_reasoning_samples(
    tokenizer, records: list[dict], context_lengths=None, length_buffer: int = 200, chat: bool = False
) -> list[Sample]:
    """One Sample per record, or per record x context length when lengths are given.

    With lengths, the context keeps its first `length - length_buffer` tokens. Lengths whose trimmed
    prompt is the same (a context shorter than several budgets) share one Sample; its
    meta["covers_lengths"] lists them.
    """
    if isinstance(length_buffer, bool) or not isinstance(length_buffer, int) or length_buffer < 0:
        raise HeadscopeError(f"length buffer must be a non-negative integer, got {length_buffer!r}")
    if context_lengths is not None:
        context_lengths = list(context_lengths)
        if not context_lengths:
            raise HeadscopeError("no context lengths given")
        for length in context_lengths:
            if isinstance(length, bool) or not isinstance(length, int) or length <= length_buffer:
                raise HeadscopeError(
                    f"context lengths must be integers above the length buffer ({length_buffer}), got {length!r}"
                )
        if len(set(context_lengths)) != len(context_lengths):
            raise HeadscopeError(f"context lengths repeat: {context_lengths}")

    samples = []
    for record in records:
        if context_lengths is None:
            samples.append(_sample(tokenizer, record, record["context"], None, chat))
            continue
        context_ids = list(tokenizer.encode(record["context"], add_special_tokens=False, verbose=False))
        built: dict[str, Sample] = {}  # trimmed context -> its sample
        for length in context_lengths:
            budget = length - length_buffer
            # Untouched when it fits: decoding would only risk changing the text.
            context = record["context"] if len(context_ids) <= budget else tokenizer.decode(context_ids[:budget])
            if context in built:
                built[context].meta["covers_lengths"].append(length)
                continue
            built[context] = _sample(tokenizer, record, context, length, chat)
            built[context].meta["covers_lengths"] = [length]
            samples.append(built[context])
    return samples


# ----------------------------------------------------------------------------- the task


@dataclass
class ReasoningOptions(ContextOptions):
    max_new_tokens: int = option(100, "decoding budget", minimum=1)
    data: str | None = option(None, "JSON list or JSON Lines with id, context, question, answer "
                                    "(default: the bundled organism questions; the thinker's own for --model thinker)", group="data")
    fields: dict | None = option(None, "rename fields, e.g. id=qid,answer=gold", group="data", parse=parse_fields)
    num_samples: int | None = option(None, "sample this many records (with --seed)", group="data", minimum=1)
    top_k: int = option(5, "positions of each attention row scored", group="reasoning score", minimum=1,
                        ablate=False)
    generated_weight: float = option(1.0, "weight of attention on generated tokens", group="reasoning score",
                                     ablate=False)
    query_weight: float = option(0.5, "weight of attention on the question", group="reasoning score", ablate=False)
    keep_zeros: bool = option(False, "append zero scores to the head lists too", group="reasoning score",
                              ablate=False)
    think_start: str | None = option(None, "text that opens the think segment (default: generation opens it, or "
                                           "<think> with a thinking chat template)", group="segments", ablate=False)
    think_end: str | None = option(None, "text that closes the think segment, e.g. </think> or the organism's "
                                         "'so the answer is' (default </think> with a thinking chat template)",
                                   group="segments", ablate=False)
    focus_include_marker: bool = option(False, "reasoning_focus: count attention on the end marker's tokens as "
                                               "attention on the think segment (headscope's earlier convention; "
                                               "Zhang et al.'s code leaves the marker out)", group="segments",
                                        ablate=False)
    receiver_proximity: int = option(4, "receiver: a sentence's score averages the sentences at least this many "
                                        "later (Thought Anchors: 4; headscope's earlier convention: 1)",
                                     group="segments", minimum=1, ablate=False)
    receiver_reduce: str = option("mean", "receiver: sentence-to-sentence attention as the mean over every "
                                          "(query, key) pair (Thought Anchors) or the mean over queries of the "
                                          "sum over keys (headscope's earlier convention)", group="segments",
                                  choices=("mean", "sum"), ablate=False)
    receiver_sentences: str = option("original", "receiver: sentences as Thought Anchors splits the chain's text "
                                                 "(original) or at tokens ending in . ! ? or holding a newline "
                                                 "(tokens, headscope's earlier rule)", group="segments",
                                     choices=("original", "tokens"), ablate=False)
    exclude_current_token: bool = option(False, "attention on the token being fed does not count as attention on "
                                                "generated tokens", group="reasoning score", ablate=False)


def default_data(model: str | None) -> Path:
    """The questions when --data is not given: the thinker's own (with their ground truth) for the bundled thinker,
    the organism's questions for every other model."""
    return DATA_DIR / ("thinker.jsonl" if bundled.name_of(model) == "thinker" else "reasoning.jsonl")


def build(options: ReasoningOptions, tokenizer, max_context: int | None) -> list[Sample]:
    records = load_reasoning_data(options.data or default_data(options.model), fields=options.fields,
                                  num_samples=options.num_samples, seed=options.seed)
    lengths = checked_lengths(options.context_lengths, max_context) if options.context_lengths else None
    return build_reasoning_samples(tokenizer, records, lengths, length_buffer=options.length_buffer,
                                   chat=options.chat)


def prompt_template(chat: bool) -> str:
    text = PROMPT_HEAD + "{context}" + PROMPT_MIDDLE + "{question}" + PROMPT_TAIL
    return text + ("  (as the chat user turn)" if chat else "")


register_task(Task("reasoning", "reasoning heads: attention on generated tokens and the question",
                   ReasoningOptions, build, "reasoning", prompt_template,
                   data_files=lambda options: [options.data or default_data(options.model)]))
