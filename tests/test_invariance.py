"""Every registered scorer gives the same per-sample values whatever the batch (sizes 1 and 8: prompts of
different lengths, samples that stop at different steps), and the same values from headscope's rows as from
the model's own eager rows on sliding-window models whose prompts and chains run past the window."""
import copy
import json

import numpy as np
import pytest

import headscope
from conftest import WORDS
from headscope.detection import loading
from headscope.scorers import SCORERS
from headscope.families.toy import tiny_model, word_tokenizer
from scripted import chain_data, chain_script, scripted_model

CHAIN_SCORERS = "receiver,reasoning_focus,reasoning"
CHAIN_OPTIONS = dict(think_start="<think>", think_end="</think>", max_new_tokens=200, receiver_proximity=2)


def per_sample(result) -> dict:
    """scorer -> {sample id: (response, unscored reason, head_scores as an array, NaN for null)}."""
    return {name: {row["id"]: (row["response"], row.get("unscored"),
                               np.array(row["head_scores"] if row["head_scores"] is not None else np.nan, dtype=float))
                   for row in scorer_result.samples}
            for name, scorer_result in result.by_scorer.items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for sample in a[name]:
            (response_a, reason_a, scores_a), (response_b, reason_b, scores_b) = a[name][sample], b[name][sample]
            assert (response_a, reason_a) == (response_b, reason_b), (name, sample)
            np.testing.assert_allclose(scores_a, scores_b, atol=1e-5, err_msg=f"{name} {sample}")


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    """Three scripted chains of different lengths (prompts of 3, 5 and 7 words; 12, 9 and 6 sentences)."""
    scripts = [chain_script(c, 12 - 3 * c, prompt_words=3 + 2 * c) for c in range(3)]
    return scripts, chain_data(tmp_path_factory.mktemp("chains") / "chains.json", scripts)


ORGANISM_RUNS = [  # (task, scorers, options): together they cover every registered scorer but the chain runs'
    ("retrieval", "retrieval,r2", dict(context_lengths=[300, 700], num_depths=2)),
    ("reasoning", "reasoning,reasoning_focus", dict(think_end="so the answer is", num_samples=16)),
    ("query", "query", dict(num_samples=10)),
    ("pattern", "previous_token,duplicate_token,induction,echo", dict(num_samples=8, block_length=12)),
]


def test_the_runs_below_cover_every_registered_scorer():
    covered = {name for _, scorers, _ in ORGANISM_RUNS for name in scorers.split(",")} | set(CHAIN_SCORERS.split(","))
    assert covered == set(SCORERS)


@pytest.mark.parametrize("task, scorers, options", ORGANISM_RUNS, ids=[run[0] for run in ORGANISM_RUNS])
def test_organism_scores_do_not_depend_on_the_batch(task, scorers, options, tmp_path):
    runs = [per_sample(headscope.detect(task, out=str(tmp_path / f"b{size}"), quiet=True, plots=False,
                                        success_threshold=-1, scorer=scorers, batch_size=size, **options))
            for size in (1, 8)]
    assert_same(*runs)


def test_chain_scores_do_not_depend_on_the_batch(chains, tmp_path):
    scripts, data = chains
    model, tokenizer = scripted_model(scripts, "llama")
    loaded = loading.prepare(model, tokenizer, "scripted")
    runs = [per_sample(headscope.detect("chain", loaded=loaded, check=False, data=data, out=str(tmp_path / f"b{size}"),
                                        quiet=True, plots=False, scorer=CHAIN_SCORERS, batch_size=size,
                                        **CHAIN_OPTIONS))
            for size in (1, 8)]
    assert_same(*runs)
    assert not any(reason for _, reason, _ in runs[0]["receiver"].values())  # proximity 2: every chain scores


# ------------------------------------------------------------------------------- past the sliding window

WINDOWED = ["gpt_oss", "gemma2", "mistral"]  # window 24 (tiny_config): sinks, soft-capping, plain


def eager_twin(loaded: loading.LoadedModel) -> loading.LoadedModel:
    """The same weights with the model's own eager attention, its rows read from output_attentions."""
    model = copy.deepcopy(loaded.model)
    model.set_attn_implementation("eager")
    return loading.LoadedModel(model, loaded.tokenizer, loaded.name, loaded.path, True, "eager")


def both_ways(loaded, task, tmp_path, **options) -> list[dict]:
    return [per_sample(headscope.detect(task, loaded=model, check=False, out=str(tmp_path / model.attention),
                                        quiet=True, plots=False, **options))
            for model in (loaded, eager_twin(loaded))]


@pytest.mark.parametrize("family", WINDOWED)
def test_chain_scorers_past_the_window_equal_eager_rows(family, chains, tmp_path):
    scripts, data = chains
    model, tokenizer = scripted_model(scripts, family)
    assert model.config.sliding_window < 40  # the chains are 40 to 80 tokens long
    first, eager = both_ways(loading.prepare(model, tokenizer, "scripted"), "chain", tmp_path, data=data,
                             scorer=CHAIN_SCORERS, batch_size=3, **CHAIN_OPTIONS)
    assert_same(first, eager)


@pytest.fixture(scope="module")
def word_data(tmp_path_factory, data_dir):
    path = tmp_path_factory.mktemp("queries")
    documents = [" ".join(WORDS[i:i + 4]) + " ." for i in range(0, 12, 3)]
    records = [{"id": f"q{g}", "documents": documents * 3, "gold": [g, 7], "question": f"what is the {WORDS[g]} ?",
                "answer": WORDS[g]} for g in range(3)]
    (path / "query.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    return path / "query.jsonl", data_dir


@pytest.mark.parametrize("family", WINDOWED)
def test_prompt_scorers_past_the_window_equal_eager_rows(family, word_data, tmp_path):
    query_file, data_dir = word_data
    tokenizer = word_tokenizer(WORDS + ["book", "based", "on", "content", "question", "answer", "context"])
    model = tiny_model(family, vocab_size=len(tokenizer), num_layers=4, seed=3)
    loaded = loading.prepare(model, tokenizer, family)
    runs = [("retrieval", dict(scorer="retrieval,r2", haystack=str(data_dir / "haystack"),
                               needles=str(data_dir / "needles.jsonl"), context_lengths=[160], length_buffer=60,
                               depths=[0, 100], success_threshold=-1, max_new_tokens=12, stop_at_newline=False,
                               batch_size=2)),
            ("query", dict(data=str(query_file), batch_size=2)),
            ("pattern", dict(scorer="previous_token,duplicate_token,induction,echo", num_samples=2,
                             block_length=16, block_repeats=3)),
            ("pattern", dict(scorer="previous_token,induction", num_samples=2, block_length=16, block_repeats=3,
                             pattern_convention="transformerlens"))]
    for number, (task, options) in enumerate(runs):
        first, eager = both_ways(loaded, task, tmp_path / str(number), **options)
        assert_same(first, eager)
