"""The bundled thinking organism, `thinker`: a small Llama that writes a think block with planted anchors.

    headscope organism train --which thinker --out DIR          # train from scratch (deterministic)
    headscope organism train --which thinker --evaluate DIR     # answer accuracy and anchor reading

Its task (generated here, ground truth included): the prompt holds containment facts ("box in chest .") that
put each of 2-3 asked items 2-3 hops from its own room (chains that share no container or room), plus spare
containers and unasked items; the question names the items with ordinals ("where are first key and second coin
?"). The think block, opened by the chat template (`<think>` ends the prompt), works each asked item's chain
one hop per sentence (copies of the prompt's facts, the first with its ordinal) and closes the chain with an
ANCHOR sentence that states the derived room, in a phrasing found nowhere else:

    first key in box . box in chest . chest in attic . so first key ends in attic .

then two fixed sentences, then a RECAP that restates every anchor without its "so" ("first key ends in attic ."),
in the question's order, and a closing sentence; `</think>` and the answer, the rooms in the question's order
("attic garden"; the asked items' rooms differ, so one room guessed twice is wrong).

Why the recap must read its anchor: the room is two or three lookups away in the prompt (more than one forward
pass of a tiny model does, unlike one copy), and in the chain it sits in a hop keyed by the last container, not
by the item; only the anchor states "key ... attic" together. Each recap sentence lies at least four sentences
after its anchor (the fixed sentences see to it for the last chain), so Thought Anchors' receiver score
(proximity 4) counts exactly those reads: a hop is copied from the prompt (no two chains share a fact), a
chain's ordinal and item are read from the question or the sentence before, so nothing else in the think block
reads a sentence that far back.

Ground truth per bundled question (`headscope/data/thinker.jsonl`): `think` (the reference think block),
`anchors` (the anchor sentences' indices among the think block's sentences) and `readers` ({recap sentence
index: the anchor it reads}). The retrieval task is trained too (its chat form: an empty think block, then
the needle's value), so `headscope specificity` has a real retrieval arm on the thinker.
"""
from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..options import add_arguments, option
from . import synth

DATA_FILE = "thinker.jsonl"  # under headscope/data

THINK_START, THINK_END = "<think>", "</think>"
# Words the segment markers, the chat turns and the retrieval task's chat prompt need, matched whole before the
# word-level split (they hold "<" and ">")
MARKERS = [THINK_START, THINK_END, "<user>", "</user>", "<assistant>", "<book>", "</book>"]
ORDINALS = ["first", "second", "third"]
THINKER_WORDS = ["are", "and", "ends", "all", "chains", "done", "now", "recap", "follows", "nothing", "more", "to",
                 "say"] + ORDINALS
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}<user> {{ message['content'] }} </user> "
    "{% elif message['role'] == 'assistant' %}<assistant> <think> {{ message.get('reasoning', '') }} </think> "
    "{{ message['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant> <think>{% endif %}")
# Between the chains and the recap: they put the last chain's anchor at least four sentences before its recap
INTERLUDE = ["all the chains are done .", "now the recap follows ."]
# After the recap: Thought Anchors drops the think text after its last ". " (the sentence before </think>), so
# the think block ends with a sentence that reads nothing, and the last recap sentence is kept. It shares no word
# with the think block (the recipe's first try, "the recap is done .", shared "done" with the interlude: heads
# that attend to an earlier copy of the current token made that sentence the most received one)
CLOSING = "nothing more to say ."

# The thinker's defaults for headscope's tasks (the CLI applies them with --model thinker, as it applies each task's
# organism_defaults to the organism): the answer is what follows </think>, judged exactly; a think block of up to
# ~170 tokens; retrieval on the short contexts it was trained on.
TASK_DEFAULTS = {
    "reasoning": {"max_new_tokens": 256, "answer_from": "after-think", "metric": "exact"},
    "retrieval": {"max_new_tokens": 256, "answer_from": "after-think", "metric": "exact",
                  "min_length": 250, "max_length": 450, "num_lengths": 2, "num_depths": 5},
}


# --------------------------------------------------------------------------------------------
# Tokenizer: the organism's word-level tokenizer, with the markers and a thinking chat template
# --------------------------------------------------------------------------------------------


def build_vocab() -> dict[str, int]:
    from .train import build_vocab as organism_vocab

    vocab = organism_vocab()
    for word in THINKER_WORDS + MARKERS:
        vocab.setdefault(word, len(vocab))
    return vocab


def build_tokenizer():
    """The organism's tokenizer over the thinker's vocabulary; the markers are whole tokens (added tokens, not
    special: decoding keeps them) and the chat template opens the think block."""
    from tokenizers import AddedToken

    from .train import build_tokenizer as organism_tokenizer

    tokenizer = organism_tokenizer(build_vocab())
    tokenizer.add_tokens([AddedToken(marker, special=False, normalized=False) for marker in MARKERS])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


def make_world(rng: random.Random, n_asked: int) -> dict:
    """Each asked item 2-3 hops from its own room, on a chain that shares no container or room with another
    asked item's; plus distractors: unasked items in those containers and spare containers in rooms."""
    rooms = rng.sample(synth.ROOMS, n_asked + rng.randint(0, 2))
    containers = rng.sample(synth.CONTAINERS, 3 * n_asked + 2)
    items = rng.sample(synth.ITEMS, n_asked + rng.randint(1, 2))
    asked, parent = items[:n_asked], {}
    for item, room in zip(asked, rooms):
        chain = [item] + [containers.pop() for _ in range(rng.choice([1, 2]))] + [room]
        parent.update(zip(chain, chain[1:]))
    placed = [c for c in parent if c in synth.CONTAINERS]
    for container in containers[: rng.randint(1, 2)]:  # spare containers, in any room
        parent[container] = rng.choice(rooms)
        placed.append(container)
    for item in items[n_asked:]:  # unasked items, in any container
        parent[item] = rng.choice(placed)
    return {"parent": parent, "items": asked}


def fact(a: str, b: str) -> str:
    """A containment fact in the thinker's phrasing: the looked-up word directly after its key ("box in" ->
    "chest"), a copy a tiny model does in one step (the organism's "the box is in the chest" puts the key four
    tokens back, and the first thinker's hops copied the wrong fact)."""
    return f"{a} in {b} ."


def item_list(items: list[str]) -> str:
    """"first key and second coin", "first key , second coin and third ring": the ordinals are the think
    block's cue for which item comes next."""
    named = [f"{ordinal} {item}" for ordinal, item in zip(ORDINALS, items)]
    return " , ".join(named[:-1]) + " and " + named[-1]


def make_problem(rng: random.Random) -> dict:
    """A question with its reference think block and ground truth (see module)."""
    world = make_world(rng, rng.choice([2, 3]))
    parent = world["parent"]
    facts = [fact(a, b) for a, b in parent.items()]
    rng.shuffle(facts)
    sentences, anchors, results, rooms = [], [], [], []
    for ordinal, item in zip(ORDINALS, world["items"]):
        chain = synth.chain_of(parent, item)
        sentences += [f"{ordinal} {fact(*chain[0])}"] + [fact(a, b) for a, b in chain[1:]]
        rooms.append(chain[-1][1])
        results.append(f"{ordinal} {item} ends in {rooms[-1]} .")
        anchors.append(len(sentences))
        sentences.append("so " + results[-1])
    sentences += INTERLUDE
    readers = {}
    for result, anchor in zip(results, anchors):
        readers[len(sentences)] = anchor
        sentences.append(result)
    sentences.append(CLOSING)
    return {"context": " ".join(facts), "question": f"where are {item_list(world['items'])} ?",
            "answer": " ".join(rooms), "think": " ".join(sentences), "anchors": anchors, "readers": readers}


def chat_prompt(tokenizer, user: str) -> str:
    """The thinker's prompt for a user turn: the chat template with the generation prompt, ending in `<think>`."""
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)


def completion(problem: dict) -> str:
    """What the thinker writes after the prompt's `<think>`: the think block, `</think>`, the answer, a newline."""
    return f" {problem['think']} {THINK_END} {problem['answer']}\n"


def bundled_problems(seed: int = synth.BUNDLED_SEED, count: int = 40) -> list[dict]:
    """The held-out questions (distinct), with ids thinker-000 ..."""
    rng = random.Random(f"thinker-{seed}")
    problems, seen = [], set()
    while len(problems) < count:
        problem = make_problem(rng)
        if (problem["context"], problem["question"]) in seen:
            continue
        seen.add((problem["context"], problem["question"]))
        problems.append({"id": f"thinker-{len(problems):03d}", **problem})
    return problems


def write_bundled_data(data_dir, seed: int = synth.BUNDLED_SEED) -> Path:
    """headscope/data/thinker.jsonl: the held-out questions, with their ground truth."""
    path = Path(data_dir) / DATA_FILE
    with open(path, "w") as f:
        for problem in bundled_problems(seed):
            f.write(json.dumps(problem) + "\n")
    return path


def read_bundled() -> list[dict]:
    """The bundled questions (`readers` keyed by int again: JSON made the keys strings)."""
    from ..tasks import DATA_DIR

    problems = [json.loads(line) for line in (DATA_DIR / DATA_FILE).read_text().splitlines() if line.strip()]
    return [problem | {"readers": {int(k): v for k, v in problem["readers"].items()}} for problem in problems]


# --------------------------------------------------------------------------------------------
# Training data: token ids and per-token loss weights, tokenized by the thinker's own tokenizer
# --------------------------------------------------------------------------------------------


class ThinkerData:
    """Training sequences, deterministic from the seed: the thinking task, retrieval in its chat form, and
    repeated random segments (they grow the copying heads both tasks use)."""

    def __init__(self, seed: int, tokenizer):
        self.rng = random.Random(f"thinker-train-{seed}")
        self.tokenizer = tokenizer
        self.held = {(p["context"], p["question"]) for p in bundled_problems()}  # never trained on
        self.held_needles = synth.held_out()  # the bundled needles' keys and values, as the organism holds them out
        self.first_word = len(synth.PUNCTUATION) + 5  # ids below: special tokens, newline, punctuation

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _chat(self, user: str, answer: str, prompt_weight: float) -> tuple[list[int], list[float]]:
        """The chat prompt of `user` (ending in <think>) and `answer` after it: the answer's tokens weigh 1."""
        prompt = self._ids(chat_prompt(self.tokenizer, user))
        target = self._ids(answer)
        return prompt + target, [0.0] + [prompt_weight] * (len(prompt) - 1) + [1.0] * len(target)

    def thinking(self) -> tuple[list[int], list[float]]:
        while True:
            problem = make_problem(self.rng)
            if (problem["context"], problem["question"]) not in self.held:
                break
        user = synth.reasoning_prompt(problem["context"], problem["question"])
        return self._chat(user, completion(problem), 0.05)

    def retrieval(self, length: int) -> tuple[list[int], list[float]]:
        """Needles hidden in about `length` tokens of filler, one asked, in the retrieval task's chat prompt."""
        from ..tasks.retrieval import CHAT_BOOK_PREFIX, CHAT_BOOK_SUFFIX

        rng = self.rng
        keys, values = set(self.held_needles["keys"]), set(self.held_needles["values"])
        needles = []
        for _ in range(rng.randint(1, 3)):
            needle = synth.make_needle(rng, exclude_keys=keys, exclude_values=values)
            keys.add(tuple(needle["key"]))
            values.add(tuple(needle["value"]))
            needles.append(needle)
        hay = synth.filler_tokens(rng, max(8, length - 40 - 12 * len(needles)))
        ends = [0] + [i + 1 for i, token in enumerate(hay) if token == "."]
        for needle in needles:  # at sentence ends, the last first so that earlier points stay valid
            needle["at"] = rng.choice(ends)
        for needle in sorted(needles, key=lambda n: -n["at"]):
            hay[needle["at"]:needle["at"]] = needle["needle"].split()
        asked = rng.choice(needles)
        user = CHAT_BOOK_PREFIX + synth.join_tokens(hay) + CHAT_BOOK_SUFFIX.format(question=asked["question"])
        return self._chat(user, f" {THINK_END} {asked['real_needle']}\n", 0.02)

    def induction(self, length: int, vocab_size: int, longest_segment: int | None = None):
        from .train import BOS

        rng = self.rng
        n = rng.randint(8, max(8, min(longest_segment or length, (length - 1) // 2)))
        segment = [rng.randrange(self.first_word, vocab_size) for _ in range(n)]
        ids = [BOS] + (segment * (length // n + 1))[: length - 1]
        return ids, [0.0] + [0.02] * n + [0.99] * (length - 1 - n)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class ThinkerRecipe:
    """The thinker's training recipe; the defaults are the bundled checkpoint's (`headscope organism train
    --which thinker`'s flags are generated from these fields)."""

    seed: int = option(1, "seed of every random choice: the same seed gives byte-identical files")
    steps: int = option(4600, "optimizer steps in all (induction phase included)", minimum=1)
    hidden: int = option(128, "hidden size", group="model")
    layers: int = option(6, "decoder layers", group="model")
    heads: int = option(8, "attention heads per layer", group="model")
    intermediate: int = option(256, "MLP size", group="model")
    lr: float = option(3e-3, "peak AdamW learning rate")
    warmup: int = option(150, "linear warm-up steps")
    thinking_batch: int = option(16, "thinking-task sequences per multi-task step")
    retrieval_tokens: int = option(640, "retrieval/induction tokens per multi-task step")
    max_len: int = option(320, "longest retrieval sequence")
    min_len: int = option(96, "shortest retrieval sequence")
    induction_prob: float = option(0.1, "share of induction sequences among the retrieval ones")
    induction_steps: int = option(2000, "steps of the first phase: repeated random segments only")
    induction_batch: int = option(32, "sequences per induction-phase step")
    induction_len: int = option(64, "length of an induction-phase sequence")
    head_dropout: float = option(0.1, "probability that a head is ablated (uniform attention) in a training "
                                      "sequence, after the induction phase")
    threads: int = option(1, "torch threads (one: on a shared 2-core machine two threads were slower)")
    log_every: int = option(25, "steps between log lines")
    time_limit: float | None = option(None, "stop after this many seconds (the files then depend on the speed)")


def train(out_dir, recipe: ThinkerRecipe | None = None) -> Path:
    """Train the thinker from scratch, deterministically from the recipe's seed; save it to ``out_dir``."""
    import torch

    from . import train as organism

    r = recipe or ThinkerRecipe()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model, loss_on, opt, lr_at = organism.training_setup(r, len(tokenizer))
    data = ThinkerData(r.seed, tokenizer)
    lengths = random.Random(f"thinker-lengths-{r.seed}")

    def update(step, loss):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    model.train()
    start, ema = time.time(), {}

    def log(step, phase, values):
        for key, value in values.items():
            ema[key] = value if key not in ema else 0.9 * ema[key] + 0.1 * value
        if step % r.log_every == 0 or step == r.steps - 1:
            print(f"{phase} step {step:5d} lr {lr_at(step):.2e} " + " ".join(f"{k} {v:.3f}" for k, v in ema.items())
                  + f"  {time.time() - start:7.1f}s", flush=True)

    # phase 1: repeated random segments without head dropout (with it, copying formed later in the organism)
    for step in range(min(r.induction_steps, r.steps)):
        batch = [data.induction(r.induction_len, len(tokenizer), 24) for _ in range(r.induction_batch)]
        loss, _, accuracy = loss_on(organism.pad_batch(batch), drop=False)
        update(step, loss)
        log(step, "induction", {"acc_ind": accuracy})
    ema.clear()
    # phase 2: the thinking task and retrieval, with head dropout
    for step in range(r.induction_steps, r.steps):
        length = lengths.randint(r.min_len, r.max_len)
        retrieval = [data.induction(length, len(tokenizer)) if lengths.random() < r.induction_prob
                     else data.retrieval(length) for _ in range(max(1, r.retrieval_tokens // length))]
        loss_r, acc_r, _ = loss_on(organism.pad_batch(retrieval))
        loss_t, acc_t, _ = loss_on(organism.pad_batch([data.thinking() for _ in range(r.thinking_batch)]))
        update(step, loss_r + loss_t)
        log(step, "multi", {"loss_r": loss_r.item(), "acc_r": acc_r, "loss_t": loss_t.item(), "acc_t": acc_t})
        if r.time_limit and time.time() - start > r.time_limit:
            print(f"time limit reached at step {step}", flush=True)
            break
    print(f"training wall time {time.time() - start:.1f}s", flush=True)
    organism._save(model, tokenizer, out_dir)
    return out_dir


# --------------------------------------------------------------------------------------------
# Evaluation: answer accuracy and anchor reading, through headscope's own engine
# --------------------------------------------------------------------------------------------


def think_text(response: str) -> str | None:
    """The think block of a response (the prompt opened it): the text before `</think>`; None if it never closed."""
    return response.split(THINK_END)[0] if THINK_END in response else None


def anchor_sentences(think: str) -> set[int]:
    """Indices of the anchor sentences ("so first key ends in attic .") among the think block's sentences as
    Thought Anchors splits them (the receiver scorer's sentences)."""
    from ..scorers.sentences import chunk_texts

    return {index for index, chunk in enumerate(chunk_texts(think.strip())) if chunk.startswith("so ")}


def anchor_reading(rows: list[dict], heads: list[str]) -> dict:
    """How often the sentence each of `heads` reads most (the receiver rows' `most_received`) is a planted anchor:
    over every (scored sample, head with a value) and by majority of the heads per sample; with the chance rate,
    the anchors' share of the sentences that have a v[k] (all but the last four), averaged over the samples."""
    from ..runs.outputs import parse_head_key
    from ..scorers.sentences import chunk_texts

    hits = votes = majority = 0
    chance = []
    for row in rows:
        think = think_text(row.get("response", ""))
        if "most_received" not in row or think is None:
            continue
        anchors = anchor_sentences(think)
        picked = [row["most_received"][layer][head] for layer, head in map(parse_head_key, heads)]
        picked = [index for index in picked if index >= 0]
        if not picked:
            continue
        counted = sum(index in anchors for index in picked)
        hits, votes, majority = hits + counted, votes + len(picked), majority + (2 * counted > len(picked))
        chance.append(len(anchors) / max(1, len(chunk_texts(think.strip())) - 4))
    return {"samples": len(chance), "head_rate": hits / max(votes, 1), "sample_rate": majority / max(len(chance), 1),
            "chance": sum(chance) / max(len(chance), 1)}


def answer_accuracy(rows: list[dict], problems: dict[str, dict]) -> dict:
    """Answers right (the words after </think> equal the reference) and think blocks equal to the reference."""
    right = sum((row.get("response", "").split(THINK_END)[-1].strip() == problems[row["id"]]["answer"])
                and THINK_END in row.get("response", "") for row in rows)
    exact = sum((think_text(row.get("response", "")) or "").strip() == problems[row["id"]]["think"] for row in rows)
    return {"correct": right, "total": len(rows), "accuracy": right / max(len(rows), 1), "think_exact": exact}


def evaluate(model_dir, threads: int = 1, verbose: bool = True, top: int = 5) -> dict:
    """Quality report of a thinker checkpoint on the bundled, held-out questions (through `detect`, with the
    thinker's defaults): answer accuracy, think blocks equal to the reference, the receiver heads and how often
    the sentence they read most is a planted anchor, and needle retrieval on the short contexts it was trained on."""
    import tempfile

    import torch

    from ..detection import loading
    from ..detection.engine import detect
    from ..runs.outputs import ranked

    torch.set_num_threads(threads)
    loaded = loading.load(str(model_dir))
    problems = {problem["id"]: problem for problem in read_bundled()}
    from ..tasks import DATA_DIR

    with tempfile.TemporaryDirectory() as out:
        reasoning = detect("reasoning", loaded=loaded, out=out, quiet=True, data=str(DATA_DIR / DATA_FILE),
                           scorer="receiver,reasoning_focus", success_threshold=-1,
                           **TASK_DEFAULTS["reasoning"])
        retrieval = detect("retrieval", loaded=loaded, out=out, quiet=True, **TASK_DEFAULTS["retrieval"],
                           haystack=str(DATA_DIR / "haystack"), needles=str(DATA_DIR / "needles.jsonl"))
    receiver = reasoning.by_scorer["receiver"]
    top_heads = [key for key, _ in ranked(receiver.summary)[:top]]
    report = {"answers": answer_accuracy(receiver.samples, problems),
              "receiver_scored": sum("most_received" in row for row in receiver.samples),
              "top_receiver_heads": [(key, round(stats["mean"], 2)) for key, stats in ranked(receiver.summary)[:top]],
              "anchor_reading": anchor_reading(receiver.samples, top_heads),
              "retrieval": retrieval.counts["passed"] / max(retrieval.counts["run"], 1)}
    if verbose:
        answers, reading = report["answers"], report["anchor_reading"]
        print(f"answers: {answers['correct']}/{answers['total']} right; think blocks equal to the reference: "
              f"{answers['think_exact']}/{answers['total']}")
        print(f"receiver: {report['receiver_scored']}/{len(receiver.samples)} samples scored; top heads "
              + ", ".join(f"{key} {mean}" for key, mean in report["top_receiver_heads"]))
        print(f"anchor reading (top {top} receiver heads): the most-read sentence is a planted anchor for "
              f"{reading['head_rate']:.0%} of head-samples, by majority in {reading['sample_rate']:.0%} of samples "
              f"(chance {reading['chance']:.0%})")
        print(f"retrieval (contexts {TASK_DEFAULTS['retrieval']['min_length']}-"
              f"{TASK_DEFAULTS['retrieval']['max_length']}): {report['retrieval']:.0%} pass")
    return report


def main(argv=None) -> int:
    """`headscope organism train --which thinker ...`: train, evaluate, or write the bundled questions."""
    from ..parser import HeadscopeParser  # a mistake is one line, as in every other command
    from .train import WHICH, WHICH_HELP

    parser = HeadscopeParser(prog="headscope organism train", description="Train or evaluate the thinker.")
    parser.add_argument("--which", choices=WHICH, default="thinker", help=WHICH_HELP)
    parser.add_argument("--out", help="output checkpoint directory")
    add_arguments(parser, ThinkerRecipe)
    parser.add_argument("--evaluate", metavar="MODEL_DIR", help="evaluate a checkpoint instead")
    parser.add_argument("--write-data", metavar="DATA_DIR", help="(re)write the bundled questions (thinker.jsonl)")
    args = parser.parse_args(argv)
    names = {spec.name for spec in dataclasses.fields(ThinkerRecipe)}
    recipe = ThinkerRecipe(**{name: value for name, value in vars(args).items() if name in names})
    if args.write_data:
        write_bundled_data(args.write_data)
    elif args.evaluate:
        evaluate(args.evaluate, threads=recipe.threads)
    elif not args.out:
        parser.error("--out is required to train")
    else:
        train(args.out, recipe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
