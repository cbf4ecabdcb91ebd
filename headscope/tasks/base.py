"""What a task is: a `Sample` per prompt, an options dataclass, a builder, and its registration.

A task is one module (tasks/<name>.py) that defines its options (a `DetectOptions` subclass: the CLI is
generated from it), a `build(options, tokenizer, max_context) -> [Sample]` and registers a `Task`.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

from headscope.errors import HeadscopeError
from headscope.options import DetectOptions, option, parse_ints

DATA_DIR = resources.files("headscope") / "data"


@dataclass
class Sample:
    id: str  # unique and stable within a run (resume and merge key on it)
    task: str  # the task's name
    prompt: str  # the exact text given to the tokenizer (chat template already applied)
    add_special_tokens: bool  # False when the chat template already wrote BOS and friends
    answer: str  # reference answer for the success metric
    span_text: str | None  # text to locate in the prompt: the needle answer or the question
    span_char: tuple[int, int] | None  # its [start, end) character offsets in `prompt`, when the builder knows them
    meta: dict = field(default_factory=dict)  # context_length, depth_percent, ...: copied into samples.jsonl
    # where the part after the context starts in `prompt` (the question, its instructions, the template's tail):
    # `kv --convention kvpress` compresses only what comes before, as kvpress's pipeline does; None: not marked
    question_char: int | None = None


@dataclass(frozen=True)
class Task:
    name: str
    help: str  # one line for `headscope detect --help`
    options: type  # its DetectOptions subclass
    build: Callable  # (options, tokenizer, max_context) -> [Sample]
    default_scorer: str
    prompt_template: Callable[[bool], str]  # chat -> the prompt's shape, for the manifest
    span_overlap_threshold: float = 0.8  # the original token-overlap rule's threshold when locating the span
    span_required: bool = False  # True: a span that cannot be located is an error for that sample
    success_filter: bool = True  # False: every sample counts, whatever the model answers
    organism_defaults: dict = field(default_factory=dict)  # option values the CLI uses on the bundled organism
    # options -> the files and folders `build` reads, defaults included: their contents are part of the run's
    # identity (identity.py). None: every option of the "data" group that names an existing path.
    data_files: Callable | None = None


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Make a task usable by name: `headscope detect NAME`, `headscope.detect("NAME")`."""
    TASKS[task.name] = task
    return task


def data_files(task: Task, options) -> list[Path]:
    """The files and folders a run of `task` with `options` reads its samples from."""
    if task.data_files is not None:
        return [Path(str(path)) for path in task.data_files(options)]
    named = (getattr(options, spec.name) for spec in dataclasses.fields(options) if spec.metadata.get("group") == "data")
    return [Path(value) for value in named if isinstance(value, str) and os.path.exists(value)]


@dataclass
class ContextOptions(DetectOptions):
    """Tasks whose prompts are cut to context lengths."""

    context_lengths: list[int] | None = option(None, "context lengths in tokens, e.g. 1000,2000,4000",
                                               group="context lengths", parse=parse_ints, minimum=1)
    length_buffer: int = option(200, "tokens kept free for the question and the answer", group="context lengths",
                                minimum=0)


def checked_lengths(lengths: list[int], max_context: int | None) -> list[int]:
    """Explicit context lengths, refused when longer than the model's maximum."""
    too_long = [length for length in lengths if max_context and length > max_context]
    if too_long:
        raise HeadscopeError(f"context length {too_long[0]} is larger than the model's maximum of {max_context}")
    return list(lengths)
