"""Answer extraction and the current-token option of the reasoning score, with hand-computed answers."""
import json

import pytest
import torch

import headscope
from headscope.answers import extract_answer, parse_answer_from
from headscope.cli.commands import main
from headscope.scorers import PromptBatch, ReasoningScorer, StepView

CHAIN = "the key is in the barrel . the barrel is in the kitchen . so the answer is kitchen"


@pytest.mark.parametrize("response, answer_from, marker, expected", [
    (CHAIN, "full", "so the answer is", "kitchen"),
    (CHAIN, "full", "so the result is", None),  # no marker: no answer
    ("the key is in the barrel . so the answer is", "full", "so the answer is", None),  # nothing after it
    ("<think>maybe 3? no, 4</think> The answer is 4.", "after-think", None, "The answer is 4."),
    ("still thinking <think> about it", "after-think", None, None),
    ("so x = \\boxed{\\frac{1}{2}} and finally \\boxed{12}", "boxed", None, "12"),
    ("first \\boxed{a{b}c}", "boxed", None, "a{b}c"),
    ("costs 1,250 dollars, or -3.5 per day", "last-number", None, "-3.5"),
    ("costs 1,250 dollars", "last-number", None, "1250"),
    ("the primes are 2,3,5", "last-number", None, "5"),  # commas between numbers are not thousands separators
    ("1,234,567 and 12,34", "last-number", None, "34"),
    ("also the answer is 4", "full", "so the answer is", None),  # the marker starts where a word starts
    ("so the answer is 4, also the answer is 5", "full", "so the answer is", "4, also the answer is 5"),
    ("Answer: 7", "full", "Answer: ", "7"),  # a marker's trailing white space is kept, and matches
    ("no digits here", "last-number", None, None),
    ("Answer: B. Final answer: C", "regex:answer: ([A-D])", None, "C"),  # case-sensitive: the last "answer: "
    ("Answer: B. Final Answer: C", "regex:Answer: ([A-D])", None, "C"),
    ("<think>x</think> so the answer is 7 apples", "last-number", "so the answer is", "7"),
])
def test_extraction(response, answer_from, marker, expected):
    assert extract_answer(response, answer_from, marker) == expected


def test_bad_answer_from_is_refused():
    for bad in ("middle", "regex:(unclosed"):
        with pytest.raises(headscope.HeadscopeError, match="--answer-from"):
            parse_answer_from(bad)


def test_organism_answers_judged_after_the_marker(tmp_path):
    """The organism writes its hop chain, then "so the answer is X": judging X alone with exact match counts the
    34 of 40 its evaluator counts, and a chain that never concludes has no answer."""
    out = tmp_path / "marker"
    result = headscope.detect("reasoning", out=str(out), quiet=True, answer_marker="so the answer is",
                              metric="exact")
    assert result.counts["passed"] == 34 and result.counts["run"] == 40
    for row in result.samples:
        marked = "so the answer is" in row["response"]
        assert row["answer_text"] == (row["response"].split("so the answer is")[-1].strip() or None if marked else None)
        assert row["passed"] == (row["answer_text"] == row["reference"])
    # rescore judges the extracted answer, not the chain: exact > 50 gives the same 34
    assert main(["rescore", str(out), "--metric", "exact", "--threshold", "50", "--no-plots"]) == 0
    report = json.loads((out / "rescore" / "rescore.json").read_text())
    assert report["runs"]["organism_reasoning"]["settings"][0]["passing"] == 34


def test_exclude_current_token_drops_attention_on_the_token_being_fed():
    """prompt_len 4; at step 2 the token fed sits at 4 + 2 - 1 = 5. Head 0 puts 0.6 on position 5 (the current
    token) and 0.3 on 4 (an earlier generated token); head 1 puts 0.9 on the question [1, 3)."""
    batch = PromptBatch(torch.zeros(1, 4, dtype=torch.long), 4, torch.tensor([1]), torch.tensor([3]))
    values = torch.tensor([[[[0.6, 0.3], [0.9, 0.1]]]])  # (layers, batch, heads, k)
    positions = torch.tensor([[[[5, 4], [2, 5]]]])
    results = []
    for exclude in (False, True):
        scorer = ReasoningScorer(top_k=2, exclude_current_token=exclude)
        scorer.begin(batch, 1, 2)
        scorer.step_index = 2
        scorer.step(StepView(values, positions, torch.zeros(1, dtype=torch.long), torch.tensor([True])))
        results.append(scorer.result()[0, 0].tolist())
    assert results[0] == pytest.approx([0.9, 0.5 * 0.9 + 0.1])  # everything >= prompt_len counts
    assert results[1] == pytest.approx([0.3, 0.5 * 0.9])  # the current token's mass is gone
