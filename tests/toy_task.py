"""A task in one module, as a user would add one: its options, its prompt builder, its registration.
Nothing in engine.py or cli.py knows about it (tests/test_house.py runs it through the CLI)."""
from dataclasses import dataclass

from headscope.options import DetectOptions, option
from headscope.tasks import Sample, Task, register_task


@dataclass
class CopyOptions(DetectOptions):
    max_new_tokens: int = option(3, "decoding budget", minimum=1)
    words: str = option("red,blue,green", "comma-separated words, one prompt each", group="data")


def build(options: CopyOptions, tokenizer, max_context) -> list[Sample]:
    samples = []
    for word in options.words.split(","):
        prompt = f"the key is {word} . the key is {word} . what is the key ? the key is"
        start = prompt.index(word)
        samples.append(Sample(id=f"copy-{word}", task="copy", prompt=prompt, add_special_tokens=True, answer=word,
                              span_text=word, span_char=(start, start + len(word))))
    return samples


register_task(Task("copy", "copy a word from the prompt (a toy task)", CopyOptions, build, "retrieval",
                   lambda chat: "the key is {word} . ... the key is", span_required=True))
