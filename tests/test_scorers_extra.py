"""r2, query (QRHead) and the pattern scorers on hand-made attention with known scores; the pattern task
through the CLI."""
import json

import pytest
import torch

from headscope.cli.commands import main
from headscope.scorers import (
    DuplicateTokenScorer, EchoScorer, InductionScorer, PreviousTokenScorer, PromptBatch, QueryScorer, R2Scorer,
    StepView)
from headscope.tasks.base import Sample


def sample(**meta):
    return Sample("s", "t", "", True, "", None, None, meta)


def test_r2_is_top_needle_length_mass_on_the_needle_over_its_length():
    # Two samples: needle [2, 4) (length 2) and [1, 4) (length 3). One layer, two heads, k = 3 recorded.
    batch = PromptBatch(torch.zeros(2, 8, dtype=torch.long), 8, torch.tensor([2, 1]), torch.tensor([4, 4]))
    scorer = R2Scorer(steps="all")
    scorer.begin(batch, 1, 2)
    assert scorer.top_k == 3  # the longest needle of the batch
    values = torch.tensor([[[[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]],
                            [[0.4, 0.4, 0.2], [0.7, 0.2, 0.1]]]])
    positions = torch.tensor([[[[2, 3, 5], [6, 2, 3]],
                               [[1, 7, 3], [6, 7, 5]]]])
    scorer.step(StepView(values, positions, torch.zeros(2, dtype=torch.long), torch.tensor([True, True])))
    scorer.step(StepView(values, positions, torch.zeros(2, dtype=torch.long), torch.tensor([True, False])))
    # sample 0 keeps its top 2: head 0 -> (0.5 + 0.3) / 2, head 1 -> 0.3 / 2 (position 3 is third, out)
    # sample 1 keeps its top 3: head 0 -> (0.4 + 0.2) / 3, head 1 -> 0; its second step is inactive
    expected = torch.tensor([[[0.8, 0.3]], [[0.2, 0.0]]])
    torch.testing.assert_close(scorer.result(), expected)


def test_r2_scores_only_the_answer_steps_as_headkv():
    """HeadKV decodes |answer tokens| steps: sample 0's answer has 1 token, sample 1's 2; three steps run."""
    batch = PromptBatch(torch.zeros(2, 8, dtype=torch.long), 8, torch.tensor([2, 1]), torch.tensor([4, 4]), None,
                        [sample(answer_tokens=1), sample(answer_tokens=2)])
    scorer = R2Scorer()  # steps="answer", the default
    scorer.begin(batch, 1, 2)
    values = torch.tensor([[[[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]],
                            [[0.4, 0.4, 0.2], [0.7, 0.2, 0.1]]]])
    positions = torch.tensor([[[[2, 3, 5], [6, 2, 3]],
                               [[1, 7, 3], [6, 7, 5]]]])
    for _ in range(3):
        scorer.step(StepView(values, positions, torch.zeros(2, dtype=torch.long), torch.tensor([True, True])))
    # per step: sample 0 -> (0.8 / 2, 0.3 / 2) once; sample 1 -> (0.6 / 3, 0) twice
    torch.testing.assert_close(scorer.result(), torch.tensor([[[0.4, 0.15]], [[0.4, 0.0]]]))


def pattern_batch(n=3, repeats=3, bos=1):
    length = bos + n * repeats
    return PromptBatch(torch.zeros(1, length, dtype=torch.long), length, torch.zeros(1, dtype=torch.long),
                       torch.zeros(1, dtype=torch.long), None, [sample(block_length=n, repeats=repeats)])


def perfect_heads(length, t0, n, repeats):
    """(1, 4, length, length): head 0 previous-token, 1 duplicate-token, 2 induction, 3 echo (uniform on
    earlier occurrences); rows without such a key attend to position 0."""
    attn = torch.zeros(1, 4, length, length)
    for i in range(length):
        for head, keys in enumerate([[i - 1], [i - n], [i - n + 1], list(range(i - n, t0 - 1, -n))]):
            keys = [k for k in keys if k >= t0]
            for k in keys or [0]:
                attn[0, head, i, k] = 1 / max(len(keys), 1)
    return attn


@pytest.mark.parametrize("block", [1, 4, 100])
def test_pattern_scorers_find_their_perfect_heads(block):
    n, repeats = 3, 3
    batch = pattern_batch(n, repeats)
    attn = perfect_heads(batch.prompt_len, 1, n, repeats)
    for cls, head in [(PreviousTokenScorer, 0), (DuplicateTokenScorer, 1), (InductionScorer, 2), (EchoScorer, 3)]:
        scorer = cls()
        scorer.begin(batch, 2, 4)
        start, end = scorer.prefill_queries()
        assert end == batch.prompt_len and start == 1 + (1 if cls is PreviousTokenScorer else n)
        for layer in range(2):
            for first in range(start, end, block):  # delivered in blocks, as the recorder does
                rows = attn[:, :, first:min(first + block, end)]
                scorer.prefill_rows(layer, first, rows[..., : rows.shape[2] + first])  # keys up to the block only
        score = scorer.result()
        assert score.shape == (1, 2, 4)
        assert score[0, :, head].tolist() == pytest.approx([1.0, 1.0]), cls.name
        others = [h for h in range(4) if h != head and not (cls is EchoScorer and h == 1)]  # a duplicate head echoes
        assert score[0, :, others].max() < 1.0, cls.name


def test_echo_sums_every_earlier_occurrence():
    n, repeats = 2, 3
    batch = pattern_batch(n, repeats, bos=0)
    attn = torch.zeros(1, 1, 6, 6)
    attn[0, 0, 4, 2], attn[0, 0, 4, 0] = 0.25, 0.5  # query in repeat 2: 0.75 on earlier occurrences
    attn[0, 0, 2, 0] = 1.0  # repeat 1
    scorer = EchoScorer()
    scorer.begin(batch, 1, 1)
    scorer.prefill_rows(0, 2, attn[:, :, 2:6])
    assert scorer.result().item() == pytest.approx((1.0 + 0.75) / 4)


def test_query_score_is_gold_mass_per_question_token_minus_the_null_questions():
    # Prompt: 10 tokens, documents [1, 3) (gold) and [3, 6), question [7, 9). Null question: 1 token.
    batch = PromptBatch(torch.arange(10)[None], 10, torch.tensor([7]), torch.tensor([9]), torch.tensor([0]),
                        [sample(documents=[[1, 3], [3, 6]], gold=[0], null_question_ids=[42])])
    scorer = QueryScorer(span="question", outlier_mask=False)  # the formula above: the question's rows, no mask
    scorer.begin(batch, 1, 2)
    null_ids, mask, (start, end) = scorer.calibration_prompt()
    assert null_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 42, 9]] and mask is None and (start, end) == (7, 8)
    assert scorer.prefill_queries() == (7, 9)
    rows = torch.zeros(1, 2, 2, 10)
    rows[0, 0, 0, 1], rows[0, 0, 1, 2], rows[0, 0, 1, 4] = 0.6, 0.2, 0.8  # head 0: (0.6 + 0.2) / 2 on gold
    rows[0, 1, :, 5] = 1.0  # head 1: nothing on gold
    scorer.prefill_rows(0, 7, rows[:, :, :1])  # two blocks of one row
    scorer.prefill_rows(0, 8, rows[:, :, 1:])
    null_rows = torch.zeros(1, 2, 1, 9)
    null_rows[0, 0, 0, 2], null_rows[0, 1, 0, 1] = 0.1, 0.3
    scorer.calibration_rows(0, 7, null_rows)
    torch.testing.assert_close(scorer.result(), torch.tensor([[[0.4 - 0.1, 0.0 - 0.3]]]))


def test_detect_pattern_through_the_cli(toy_dir, tmp_path):
    code = main(["detect", "pattern", "--model", str(toy_dir), "--out", str(tmp_path), "--quiet", "--no-plots",
                 "--scorer", "induction,previous_token", "--block-length", "5", "--repeats", "3",
                 "--num-samples", "2"])
    assert code == 0
    name = toy_dir.name
    induction = json.loads((tmp_path / f"{name}_pattern_induction_heads.json").read_text())
    previous = json.loads((tmp_path / f"{name}_pattern_previous_token_heads.json").read_text())
    assert len(induction) == len(previous) == 12
    assert all(len(scores) == 2 for scores in induction.values())  # no success filter: both sequences count
    assert all(0.0 <= s <= 1.0 for scores in previous.values() for s in scores)
    rows = [json.loads(line) for line in (tmp_path / f"{name}_pattern_induction_samples.jsonl").open()]
    assert [row["block_length"] for row in rows] == [5, 5] and all(row["passed"] for row in rows)
