"""Repeated random tokens, the prompts of the pattern-head scores (previous-token, duplicate-token,
induction, echo): a block of n random words repeated R times, after the tokenizer's BOS.

Words are drawn from the tokenizer's own vocabulary: tokens whose text, after a space, encodes back to
exactly that one token, so the prompt " w1 w2 ... wn w1 w2 ..." tokenizes to the repeated block
(checked for every sequence). The answer is the block's first word, what an induction head predicts
next; the task has no success filter, every sequence counts.
"""
from __future__ import annotations

import random

from headscope.errors import HeadscopeError
from dataclasses import dataclass

from headscope.options import DetectOptions, option
from headscope.tasks.base import Sample, Task, register_task



def word_pool(tokenizer, size: int, rng: random.Random) -> list[tuple[str, int]]:
    """Up to `size` (word, token id) pairs: alphabetic tokens that encode back to themselves after a space."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    rng.shuffle(ids)
    pool, seen = [], set()
    for token_id in ids:
        word = tokenizer.decode([token_id]).strip()
        if not word.isalpha() or word in seen:
            continue
        if list(tokenizer.encode(" " + word, add_special_tokens=False)) == [token_id]:
            pool.append((word, token_id))
            seen.add(word)
            if len(pool) == size:
                break
    return pool


def build_pattern_samples(tokenizer, block_length: int = 32, repeats: int = 4, num_sequences: int = 8,
                          seed: int = 0) -> list[Sample]:
    if block_length < 2 or repeats < 2 or num_sequences < 1:
        raise HeadscopeError("pattern needs --block-length >= 2, --repeats >= 2 and at least one sequence")
    rng = random.Random(seed)
    pool = word_pool(tokenizer, max(4 * block_length, 256), rng)
    if len(pool) < block_length:
        raise HeadscopeError(f"the tokenizer has only {len(pool)} single-token words: use --block-length {len(pool)} "
                             "or less")
    samples = []
    for index in range(num_sequences):
        block = rng.sample(pool, block_length)  # distinct words: "the earlier occurrence" is unique
        prompt = " " + " ".join(word for word, _ in block * repeats)
        ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        expected = [token_id for _, token_id in block] * repeats
        if ids[len(ids) - len(expected):] != expected or len(ids) - len(expected) > 2:
            raise HeadscopeError(f"pattern sequence {index}: the words do not tokenize to the repeated block")
        samples.append(Sample(id=f"p{index}", task="pattern", prompt=prompt, add_special_tokens=True,
                              answer=block[0][0], span_text=None, span_char=None,
                              meta={"block_length": block_length, "repeats": repeats, "sequence": index}))
    return samples


@dataclass
class PatternOptions(DetectOptions):
    max_new_tokens: int = option(1, "decoding budget (the scores read the prefill)", minimum=1)
    block_length: int = option(32, "random words in the repeated block", group="data", minimum=2)
    block_repeats: int = option(4, "times the block is repeated", group="data", flag="--repeats", minimum=2)
    num_samples: int = option(8, "number of random sequences", group="data", minimum=1)
    pattern_convention: str = option("headscope", "headscope: mean over the repeats of the pattern's diagonal; "
                                     "transformerlens: TransformerLens head_detector's 'mul' score over every row",
                                     group="data", choices=("headscope", "transformerlens"))


def build(options: PatternOptions, tokenizer, max_context: int | None) -> list[Sample]:
    return build_pattern_samples(tokenizer, options.block_length, options.block_repeats, options.num_samples,
                                 options.seed)


def prompt_template(chat: bool) -> str:
    return " {w1} ... {wn} {w1} ... {wn} ...  (a block of random words, repeated)"


register_task(Task("pattern", "previous-token, duplicate-token, induction and echo heads on repeated tokens",
                   PatternOptions, build, "induction", prompt_template, span_overlap_threshold=0.9,
                   success_filter=False, data_files=lambda options: []))  # random words: the seed is the data
