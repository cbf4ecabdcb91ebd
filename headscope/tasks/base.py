"""What a task hands the engine: one `Sample` per prompt."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Sample:
    id: str  # unique and stable within a run (resume and merge key on it)
    task: str  # "retrieval" | "reasoning"
    prompt: str  # the exact text given to the tokenizer (chat template already applied)
    add_special_tokens: bool  # False when the chat template already wrote BOS and friends
    answer: str  # reference answer for the success metric
    span_text: str | None  # text to locate in the prompt: the needle answer or the question
    span_char: tuple[int, int] | None  # its [start, end) character offsets in `prompt`, when the builder knows them
    meta: dict = field(default_factory=dict)  # context_length, depth_percent, ...: copied into samples.jsonl
