"""The bundled thinking organism: its task's ground truth, and what headscope finds on it (trains nothing).

The thinker (headscope/organism/thinker.py) writes a think block whose recap sentences must read planted anchor
sentences at least four sentences back. On it the receiver score must find heads that read those anchors; masking
the heads the answers depend on must cost them far more than masking as many random heads.
"""
import json
import random

import pytest

from headscope.cli.commands import main
from headscope.organism import THINKER_DIR, thinker
from headscope.runs.outputs import ranked
from headscope.scorers.sentences import chunk_texts

NEEDS_CHECKPOINT = pytest.mark.skipif(not (THINKER_DIR / "model.safetensors").exists(), reason="no thinker checkpoint")
SAMPLES = ["--num-samples", "12", "--seed", "0"]  # a subset of the 40 bundled questions: the claims hold on it
TOP = 8  # receiver heads masked (a sixth of the 48)


# ----------------------------------------------------------------------------- the task's ground truth (no model)


def test_every_recap_sentence_reads_an_anchor_at_least_four_sentences_back():
    rng = random.Random(5)
    for _ in range(200):
        problem = thinker.make_problem(rng)
        sentences = [s + " ." for s in problem["think"].removesuffix(" .").split(" . ")]
        assert 8 <= len(sentences) <= 30
        assert [i for i, s in enumerate(sentences) if s.startswith("so ")] == problem["anchors"]
        asked = problem["question"].removeprefix("where are ").removesuffix(" ?").replace(" and ", " , ").split(" , ")
        assert len(problem["readers"]) == len(problem["anchors"]) == len(asked)
        for reader, anchor in problem["readers"].items():
            assert reader - anchor >= 4
            assert sentences[reader] == sentences[anchor].removeprefix("so ")  # the recap restates the anchor
        rooms = [sentences[a].split()[-2] for a in problem["anchors"]]
        assert problem["answer"].split() == rooms and len(set(rooms)) == len(rooms)  # no answer by guessing one room
        start = 0
        for ordinal_item, anchor in zip(asked, problem["anchors"]):  # 2-3 hops: no prompt fact names item and room
            item, room = ordinal_item.split()[1], sentences[anchor].split()[-2]
            hops = sentences[start:anchor]
            assert 2 <= len(hops) <= 3 and hops[0].startswith(ordinal_item + " in ")
            assert all(hop.removeprefix(ordinal_item.split()[0] + " ") in problem["context"] for hop in hops)
            assert f"{item} in {room} ." not in problem["context"]
            start = anchor + 1
        # chains share no sentence: a hop is read from the prompt, never from an earlier chain (only anchors are
        # read from far back)
        chains = sentences[:problem["anchors"][-1]]
        hops = [s.split(" ", 1)[1] if s.split()[0] in thinker.ORDINALS else s
                for s in chains if not s.startswith("so ")]
        assert len(hops) == len(set(hops))


def test_the_receiver_sentences_are_the_generators_sentences():
    """Thought Anchors' splitter (the receiver's) keeps every think sentence apart (each is >= 10 characters) and
    drops only the closing one, so the ground truth's indices are the scorer's."""
    tokenizer = thinker.build_tokenizer()
    for problem in thinker.read_bundled():
        ids = tokenizer(thinker.completion(problem), add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        decoded = thinker.think_text(tokenizer.decode(ids))
        sentences = problem["think"].removesuffix(" .").split(" . ")
        assert chunk_texts(decoded.strip()) == [s + " ." for s in sentences[:-1]]
        assert thinker.anchor_sentences(decoded) == set(problem["anchors"])


def test_the_chat_template_opens_the_think_block():
    tokenizer = thinker.build_tokenizer()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Context: x"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<assistant> <think>")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids[-1]) == "<think>"
    assert "</think>" in tokenizer.chat_template  # what makes the segments default to <think> / </think>


def test_bundled_questions_are_held_out_and_match_the_generator(tmp_path):
    data = thinker.ThinkerData(0, thinker.build_tokenizer())
    assert {(p["context"], p["question"]) for p in thinker.read_bundled()} <= data.held
    from headscope.tasks import DATA_DIR

    assert thinker.write_bundled_data(tmp_path).read_text() == (DATA_DIR / thinker.DATA_FILE).read_text()


def test_thinker_names_the_bundled_checkpoint():
    from headscope.detection import loading

    assert loading.model_path("thinker") == str(THINKER_DIR)
    assert loading.model_name(loading.model_path("thinker")) == "thinker"
    assert loading.model_name("thinker") == "thinker"
    assert loading.model_path(None) == loading.default_model_path()
    assert loading.model_path("some/hub-model") == "some/hub-model"


def test_the_thinker_gets_its_questions_and_defaults():
    from headscope.cli.commands import bundled_defaults
    from headscope.tasks import TASKS, reasoning, retrieval

    assert reasoning.default_data("thinker").name == thinker.DATA_FILE
    assert reasoning.default_data(None).name == reasoning.default_data("some/model").name == "reasoning.jsonl"
    assert retrieval.default_data("thinker") == retrieval.default_data(None)  # the synthetic world's haystack
    assert bundled_defaults(TASKS["reasoning"], "thinker") == thinker.TASK_DEFAULTS["reasoning"]
    assert bundled_defaults(TASKS["retrieval"], None) == TASKS["retrieval"].organism_defaults
    assert bundled_defaults(TASKS["retrieval"], "some/model") == {}


# ----------------------------------------------------------------------------- what headscope finds on it


@pytest.fixture(scope="module")
def detected(tmp_path_factory):
    """receiver and reasoning_focus on all 40 bundled questions, with no marker flag (the chat template's thinking
    block)."""
    out = tmp_path_factory.mktemp("thinker")
    assert main(["detect", "reasoning", "--model", "thinker", "--scorer", "receiver,reasoning_focus", "--out", str(out),
                 "--quiet", "--no-plots"]) == 0
    return out


@NEEDS_CHECKPOINT
def test_receiver_scores_every_chain_and_its_top_heads_read_the_planted_anchors(detected):
    rows = [json.loads(line) for line in (detected / "thinker_reasoning_receiver_samples.jsonl").open()]
    assert len(rows) == 40 and all(row["id"].startswith("thinker-") for row in rows)
    assert sum("most_received" in row for row in rows) >= 0.8 * len(rows)
    summary = json.loads((detected / "thinker_reasoning_receiver_summary.json").read_text())
    top = [key for key, _ in ranked(summary)[:5]]
    reading = thinker.anchor_reading(rows, top)
    assert reading["chance"] < 0.35  # the anchors' share of the sentences that have a v[k]
    # for the top five heads the most-read sentence is a planted anchor in most samples (by majority of the five),
    # at least twice as often as chance over (sample, head) pairs
    assert reading["sample_rate"] > 0.5 and reading["head_rate"] >= 2 * reading["chance"], reading
    assert max(thinker.anchor_reading(rows, [key])["head_rate"] for key in top) >= 0.9  # one of them: every time


def ablation(detected, scores: str) -> tuple[float, float, float]:
    """`ablate reasoning` on the thinker, the top TOP heads of a heads file against TOP random ones."""
    out = detected / scores
    assert main(["ablate", "reasoning", "--model", "thinker", "--scores",
                 str(detected / f"thinker_reasoning_{scores}_heads.json"), "--top", str(TOP), "--repeats", "1",
                 "--out", str(out), "--quiet", "--no-plots", *SAMPLES]) == 0
    report = json.loads((out / "thinker_reasoning_ablation.json").read_text())
    return tuple(report[arm]["success_rate"] for arm in ("none", "top", "random"))


@NEEDS_CHECKPOINT
def test_masking_the_heads_the_answers_read_the_think_block_with_costs_them_and_random_heads_do_not(
        detected):
    """The heads the answers depend on are the copy heads of layer 1, which reasoning_focus ranks first."""
    none, top, random_ = ablation(detected, "reasoning_focus")
    assert none >= 0.8
    assert (none - top) - (none - random_) >= 0.5, (none, top, random_)


@NEEDS_CHECKPOINT
@pytest.mark.xfail(strict=True, reason="issue 31's bar, not met (docs/thinker.md): the receiver's top 8 read "
                                       "anchors, but the answers do without them; the copy heads they need have a "
                                       "flat v[k]")
def test_masking_the_receiver_heads_costs_the_answers_and_random_heads_do_not(detected):
    none, top, random_ = ablation(detected, "receiver")
    assert none >= 0.8
    assert (none - top) - (none - random_) >= 0.5, (none, top, random_)
