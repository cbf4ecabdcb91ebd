"""Deterministic generators of the organism's synthetic world.

Everything here is driven by a seeded :class:`random.Random`, so training data and the bundled data
files (haystack, needles, reasoning problems) are reproducible.

Text conventions: every token is separated by a single space (punctuation included: ``"box ."``),
sentences end with ``" ."``, and a newline is a token of its own.  All words are lower-case except the
few capitalised words of the detectors' prompt templates.

Three disjoint word pools keep the tasks clean:

* filler words (haystack sentences),
* needle words (keys: ``<adjective> <place>``; values: 2-4 words from a value pool),
* reasoning words (items, containers, rooms).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------

DETERMINERS = ["the", "a", "every", "some", "this", "that", "his", "her", "their", "our"]

FILLER_NOUNS = """
man woman child boy girl farmer teacher doctor sailor baker king queen soldier friend stranger
neighbour student writer painter hunter traveller merchant priest judge nurse driver
dog cat horse bird fish cow sheep goat pig fox wolf bear mouse rabbit duck
house road river hill field wall door window roof street town city country sea lake shore
boat ship cart wagon table chair bed lamp book letter song story poem picture map
tree flower grass leaf stone rock sand snow rain wind cloud sun moon star sky
morning evening night day week year winter summer spring autumn hour moment
bread milk cheese soup meat cake wine water fire smoke light shadow dream voice
idea plan reason question answer problem word name heart mind hand face eye head
""".split()

FILLER_VERBS = """
saw found watched followed carried pushed pulled opened closed painted built broke fixed
cleaned washed cooked ate drank bought sold gave took kept lost met helped called visited
left reached crossed climbed passed remembered forgot loved liked hated feared noticed
heard told asked answered read wrote sang played moved turned held dropped lifted touched
""".split()

FILLER_INTRANSITIVE = """
walked ran slept smiled laughed cried waited rested worked danced sat stood arrived
returned wandered listened paused shouted whispered sighed stayed travelled
""".split()

FILLER_ADJECTIVES = """
old young small large little big long short happy sad quiet loud warm cold wet dry soft hard
slow fast early late clean dirty heavy light strong weak rich poor kind cruel brave proud
tired hungry calm busy gentle rough simple strange common rare famous humble wild tame
""".split()

FILLER_ADVERBS = """
slowly quickly quietly loudly gently carefully often sometimes never always again soon
later together alone suddenly finally nearly almost
""".split()

FILLER_PREPOSITIONS = ["near", "behind", "across", "along", "under", "over", "beside", "through",
                       "towards", "around", "past", "into", "from", "with", "without", "after",
                       "before", "at", "by", "for"]

FILLER_CONJUNCTIONS = ["and", "but", "while", "because", "when", "although", "until", "so"]

# needle pools --------------------------------------------------------------------------------

KEY_ADJECTIVES = """
silver golden hidden ancient frozen broken northern southern eastern western dark bright tall
fallen royal iron wooden crystal sacred distant empty narrow hollow burning sunken forgotten
crooked twisted gilded marble copper velvet misty stormy lonely shining
""".split()

KEY_NOUNS = """
castle tower bridge temple harbor fortress village cave lighthouse mill abbey market canal
station palace island valley forest mountain chapel prison museum theater orchard vineyard
quarry mine school hospital factory monastery citadel pyramid cathedral observatory windmill
""".split()

VALUE_WORDS = """
blue green yellow purple orange crimson violet scarlet amber indigo turquoise maroon
one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen
sixteen seventeen eighteen nineteen twenty thirty forty fifty hundred
tiger lion eagle falcon dolphin whale shark zebra panda otter raven parrot camel badger
lizard beetle spider salmon turtle penguin
apple banana cherry grape lemon mango melon peach pear plum olive walnut almond coconut
ruby emerald sapphire diamond pearl opal jade topaz
piano violin guitar trumpet drum flute harp
rocket comet planet galaxy meteor volcano glacier desert canyon jungle tundra
""".split()

# (needle prefix, question prefix): needle = "<prefix> <adj> <noun> is <value> ."
NEEDLE_TEMPLATES = [
    ("the secret code of the", "what is the secret code of the"),
    ("the magic word of the", "what is the magic word of the"),
    ("the password of the", "what is the password of the"),
]

# reasoning pools --------------------------------------------------------------------------------

ITEMS = """
key coin ring note watch phone wallet pen badge ticket spoon candle bead feather
shell button glove sock scarf medal compass whistle brush comb necklace
""".split()

CONTAINERS = """
box bag basket drawer jar chest sack case tin pouch crate bucket bowl envelope suitcase
backpack purse cabinet trunk barrel
""".split()

ROOMS = """
kitchen garden hall attic cellar study bedroom garage office bathroom pantry porch shed
nursery basement
""".split()

# words of the detectors' prompt templates and answers
TEMPLATE_WORDS = ["Based", "on", "the", "content", "of", "book", "Question", "Answer", "Context",
                  "what", "is", "where", "so", "answer", "in"]
PUNCTUATION = [".", ",", "?", ":", "!", ";", "'", '"', "-", "(", ")"]

RETRIEVAL_PREFIX = "\nBased on the content of the book, Question: "
RETRIEVAL_SUFFIX = "\nAnswer:"


def all_words() -> list[str]:
    """Every word of the organism's vocabulary (without special tokens, newline or punctuation)."""
    words = set()
    for pool in (DETERMINERS, FILLER_NOUNS, FILLER_VERBS, FILLER_INTRANSITIVE, FILLER_ADJECTIVES,
                 FILLER_ADVERBS, FILLER_PREPOSITIONS, FILLER_CONJUNCTIONS, KEY_ADJECTIVES, KEY_NOUNS,
                 VALUE_WORDS, ITEMS, CONTAINERS, ROOMS, TEMPLATE_WORDS):
        words.update(pool)
    for prefix, question in NEEDLE_TEMPLATES:
        words.update(prefix.split())
        words.update(question.split())
    return sorted(words)


def _check_pools() -> None:
    filler = set(DETERMINERS + FILLER_NOUNS + FILLER_VERBS + FILLER_INTRANSITIVE + FILLER_ADJECTIVES
                 + FILLER_ADVERBS + FILLER_PREPOSITIONS + FILLER_CONJUNCTIONS)
    needle = set(KEY_ADJECTIVES + KEY_NOUNS + VALUE_WORDS)
    reasoning = set(ITEMS + CONTAINERS + ROOMS)
    assert not (filler & needle), filler & needle
    assert not (filler & reasoning), filler & reasoning
    assert not (needle & reasoning), needle & reasoning
    for pool in (KEY_ADJECTIVES, KEY_NOUNS, VALUE_WORDS, ITEMS, CONTAINERS, ROOMS):
        assert len(set(pool)) == len(pool)


_check_pools()

# --------------------------------------------------------------------------------------------
# Filler / haystack
# --------------------------------------------------------------------------------------------


def _noun_phrase(rng: random.Random) -> list[str]:
    words = [rng.choice(DETERMINERS)]
    if rng.random() < 0.5:
        words.append(rng.choice(FILLER_ADJECTIVES))
    words.append(rng.choice(FILLER_NOUNS))
    return words


def _clause(rng: random.Random) -> list[str]:
    words = _noun_phrase(rng)
    if rng.random() < 0.2:
        words.append(rng.choice(FILLER_ADVERBS))
    if rng.random() < 0.6:
        words.append(rng.choice(FILLER_VERBS))
        words += _noun_phrase(rng)
    else:
        words.append(rng.choice(FILLER_INTRANSITIVE))
    if rng.random() < 0.5:
        words.append(rng.choice(FILLER_PREPOSITIONS))
        words += _noun_phrase(rng)
    return words


def filler_sentence(rng: random.Random) -> list[str]:
    """One haystack sentence as a list of tokens, ending with ``"."``."""
    words = _clause(rng)
    if rng.random() < 0.35:
        if rng.random() < 0.3:
            words.append(",")
        words.append(rng.choice(FILLER_CONJUNCTIONS))
        words += _clause(rng)
    words.append(".")
    return words


def filler_tokens(rng: random.Random, n_tokens: int, paragraph_prob: float = 0.0) -> list[str]:
    """Whole haystack sentences totalling at least ``n_tokens`` tokens (newline tokens between
    paragraphs with probability ``paragraph_prob`` after each sentence)."""
    out: list[str] = []
    while len(out) < n_tokens:
        out += filler_sentence(rng)
        if paragraph_prob and rng.random() < paragraph_prob:
            out.append("\n")
    return out


def join_tokens(tokens: list[str]) -> str:
    """Canonical text of a token list: single spaces between tokens, none around newlines."""
    text = ""
    prev_nl = True
    for tok in tokens:
        if tok == "\n":
            text += "\n"
            prev_nl = True
        else:
            text += tok if prev_nl else " " + tok
            prev_nl = False
    return text


def filler_text(rng: random.Random, n_words: int, paragraph_prob: float = 0.0) -> str:
    """Haystack text of at least ``n_words`` tokens made of whole sentences (each ending with " .")."""
    return join_tokens(filler_tokens(rng, n_words, paragraph_prob))


# --------------------------------------------------------------------------------------------
# Needles (Retrieval_Head format)
# --------------------------------------------------------------------------------------------


def make_needle(rng: random.Random, exclude_keys=(), exclude_values=(), n_value=None) -> dict:
    """A needle binding a key (``<adj> <noun>``) to a 2-4 word value.

    Returns ``{"needle", "question", "real_needle"}`` plus the structured ``key``/``value``/
    ``template`` fields used by training.
    """
    exclude_keys = set(exclude_keys)
    exclude_values = set(exclude_values)
    while True:
        key = (rng.choice(KEY_ADJECTIVES), rng.choice(KEY_NOUNS))
        k = n_value if n_value is not None else rng.choice([2, 3, 3, 4])
        value = tuple(rng.sample(VALUE_WORDS, k))
        if key in exclude_keys or value in exclude_values:
            continue
        break
    t = rng.randrange(len(NEEDLE_TEMPLATES))
    prefix, qprefix = NEEDLE_TEMPLATES[t]
    value_text = " ".join(value)
    needle = f"{prefix} {key[0]} {key[1]} is {value_text} ."
    question = f"{qprefix} {key[0]} {key[1]} ?"
    return {"needle": needle, "question": question, "real_needle": value_text,
            "key": list(key), "value": list(value), "template": t}


def retrieval_prompt(haystack_with_needle: str, question: str) -> str:
    """The retrieval detector's prompt."""
    return haystack_with_needle + RETRIEVAL_PREFIX + question + RETRIEVAL_SUFFIX


# --------------------------------------------------------------------------------------------
# Reasoning problems
# --------------------------------------------------------------------------------------------


def make_world(rng: random.Random) -> dict:
    """A random forest of rooms <- containers <- items.  Returns ``{"parent": {obj: place}, ...}``."""
    n_rooms = rng.randint(2, 3)
    n_containers = rng.randint(3, 5)
    n_items = rng.randint(2, 4)
    rooms = rng.sample(ROOMS, n_rooms)
    containers = rng.sample(CONTAINERS, n_containers)
    items = rng.sample(ITEMS, n_items)
    parent: dict[str, str] = {}
    depth: dict[str, int] = {r: 0 for r in rooms}
    placed: list[str] = []
    for c in containers:
        options = list(rooms) + [p for p in placed if depth[p] < 2]
        # bias towards nesting so that multi-hop chains are common
        if placed and rng.random() < 0.6:
            nested = [p for p in placed if depth[p] < 2]
            if nested:
                options = nested
        where = rng.choice(options)
        parent[c] = where
        depth[c] = depth[where] + 1
        placed.append(c)
    for it in items:
        where = rng.choice(containers)
        parent[it] = where
        depth[it] = depth[where] + 1
    return {"parent": parent, "rooms": rooms, "containers": containers, "items": items}


def chain_of(parent: dict, obj: str) -> list[tuple[str, str]]:
    chain = []
    while obj in parent:
        chain.append((obj, parent[obj]))
        obj = parent[obj]
    return chain


def fact(a: str, b: str) -> str:
    return f"the {a} is in the {b} ."


def make_reasoning(rng: random.Random, n_questions: int = 1, min_hops: int = 2) -> dict:
    """A reasoning problem: facts "the X is in the Y ." and the question "where is the X ?".

    ``target`` is the one-line chain of thought plus final answer, without the leading space and
    trailing newline: ``"the key is in the box . the box is in the kitchen . so the answer is kitchen"``.
    With ``n_questions > 1`` the extra questions/targets are returned in ``more``.
    """
    while True:
        world = make_world(rng)
        parent = world["parent"]
        candidates = [o for o in parent if len(chain_of(parent, o)) >= min_hops]
        if len(candidates) >= n_questions:
            break
    facts = [fact(a, b) for a, b in parent.items()]
    rng.shuffle(facts)
    context = " ".join(facts)
    objs = rng.sample(candidates, n_questions)
    qas = []
    for obj in objs:
        chain = chain_of(parent, obj)
        cot = " ".join(fact(a, b) for a, b in chain)
        answer = chain[-1][1]
        qas.append({"question": f"where is the {obj} ?", "answer": answer,
                    "target": f"{cot} so the answer is {answer}"})
    out = {"context": context, **qas[0]}
    if n_questions > 1:
        out["more"] = qas[1:]
    return out


def reasoning_prompt(context: str, question: str) -> str:
    """The reasoning detector's prompt."""
    return "Context: " + context + "\n\nQuestion: " + question + "\n\nAnswer:"


# --------------------------------------------------------------------------------------------
# Bundled data files
# --------------------------------------------------------------------------------------------

BUNDLED_SEED = 12345
N_HAYSTACK_FILES = 4
HAYSTACK_TOKENS_PER_FILE = 400
N_NEEDLES = 5
N_REASONING = 40


def bundled_needles(seed: int = BUNDLED_SEED) -> list[dict]:
    rng = random.Random(f"needles-{seed}")
    needles, keys = [], set()
    while len(needles) < N_NEEDLES:
        n = make_needle(rng, n_value=3)
        if tuple(n["key"]) in keys or n["template"] != len(needles) % len(NEEDLE_TEMPLATES):
            continue
        keys.add(tuple(n["key"]))
        needles.append(n)
    return needles


def bundled_reasoning(seed: int = BUNDLED_SEED) -> list[dict]:
    rng = random.Random(f"reasoning-{seed}")
    probs, seen = [], set()
    while len(probs) < N_REASONING:
        p = make_reasoning(rng, min_hops=2)
        k = (p["context"], p["question"])
        if k in seen:
            continue
        seen.add(k)
        probs.append({"id": f"organism-{len(probs):03d}", "context": p["context"],
                      "question": p["question"], "answer": p["answer"], "target": p["target"]})
    return probs


def bundled_haystack(seed: int = BUNDLED_SEED) -> list[str]:
    rng = random.Random(f"haystack-{seed}")
    return [filler_text(rng, HAYSTACK_TOKENS_PER_FILE) + "\n" for _ in range(N_HAYSTACK_FILES)]


def held_out(seed: int = BUNDLED_SEED) -> dict:
    """What training must never show: the bundled needles' keys and values, the bundled problems."""
    needles = bundled_needles(seed)
    return {
        "keys": {tuple(n["key"]) for n in needles},
        "values": {tuple(n["value"]) for n in needles},
        "reasoning": {(p["context"], p["question"]) for p in bundled_reasoning(seed)},
    }


def write_bundled_data(data_dir, seed: int = BUNDLED_SEED) -> None:
    """Write ``haystack/*.txt``, ``needles.jsonl`` and ``reasoning.jsonl`` under ``data_dir``."""
    data_dir = Path(data_dir)
    (data_dir / "haystack").mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(bundled_haystack(seed)):
        (data_dir / "haystack" / f"organism_{i:02d}.txt").write_text(text)
    with open(data_dir / "needles.jsonl", "w") as f:
        for n in bundled_needles(seed):
            f.write(json.dumps({"needle": n["needle"], "question": n["question"],
                                "real_needle": n["real_needle"]}) + "\n")
    with open(data_dir / "reasoning.jsonl", "w") as f:
        for p in bundled_reasoning(seed):
            f.write(json.dumps({"id": p["id"], "context": p["context"], "question": p["question"],
                                "answer": p["answer"]}) + "\n")


if __name__ == "__main__":  # pragma: no cover
    import sys

    write_bundled_data(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent.parent / "data")
