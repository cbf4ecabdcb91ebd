"""Each score on hand-made attention rows with known results."""
import torch

from headscope.scorers import PromptBatch, ReasoningScorer, RetrievalScorer, StepView


def view_from_rows(rows, tokens, k, active=None):
    """rows: (layers, batch, heads, kv_len) full attention rows -> the recorder's top-k view."""
    values, positions = rows.topk(k, dim=-1)
    tokens = torch.tensor(tokens)
    return StepView(values, positions, tokens, torch.ones(len(tokens), dtype=torch.bool) if active is None else active)


def one_hot_rows(layers, heads, kv_len, argmax):
    """Rows with mass 0.6 at argmax[l][h] and the rest spread evenly."""
    rows = torch.full((layers, 1, heads, kv_len), 0.4 / (kv_len - 1))
    for l in range(layers):
        for h in range(heads):
            rows[l, 0, h, argmax[l][h]] = 0.6
    return rows


def test_retrieval_scores_copying_heads_only():
    # prompt: positions 0..9, needle answer "7 8 9" at [4, 7)
    prompt = torch.tensor([[1, 2, 3, 4, 7, 8, 9, 5, 6, 2]])
    scorer = RetrievalScorer()
    scorer.begin(PromptBatch(prompt, 10, torch.tensor([4]), torch.tensor([7])), num_layers=2, num_heads=3)
    # step 0 writes token 7: head (0,0) looks at position 4 (token 7) -> copy; head (0,1) looks at 5 (token 8,
    # in the needle but a different token) -> no; head (0,2) looks at 0 -> no; layer 1 head 0 looks at 4 -> copy.
    scorer.step(view_from_rows(one_hot_rows(2, 3, 10, [[4, 5, 0], [4, 9, 9]]), [7], k=1))
    # step 1 writes token 8 (row now 11 long): head (0,0) at 5 -> copy; head (1,2) at 10 (a generated token) -> no.
    scorer.step(view_from_rows(one_hot_rows(2, 3, 11, [[5, 5, 5], [3, 3, 10]]), [8], k=1))
    expected = torch.tensor([[[2 / 3, 1 / 3, 1 / 3], [1 / 3, 0, 0]]])
    assert torch.allclose(scorer.result(), expected)


def test_retrieval_ignores_stopped_samples_and_other_spans():
    prompt = torch.tensor([[5, 7, 8], [7, 8, 9]])
    scorer = RetrievalScorer()
    scorer.begin(PromptBatch(prompt, 3, torch.tensor([1, 0]), torch.tensor([3, 1])), num_layers=1, num_heads=1)
    rows = torch.tensor([[[[0.1, 0.8, 0.1]]], [[[0.8, 0.1, 0.1]]]]).permute(1, 0, 2, 3)  # (1 layer, 2 batch, 1, 3)
    scorer.step(view_from_rows(rows, [7, 7], k=1, active=torch.tensor([True, False])))
    assert scorer.result().flatten().tolist() == [0.5, 0.0]  # sample 1 had stopped


def test_reasoning_score_top_k_mass_on_generated_and_question():
    # prompt_len 8, question at [2, 5); the row of step 2 covers positions 0..9 (8, 9 are generated).
    row = torch.tensor([0.02, 0.03, 0.30, 0.05, 0.00, 0.10, 0.04, 0.06, 0.25, 0.15])
    rows = row.view(1, 1, 1, 10)
    scorer = ReasoningScorer(top_k=5)
    scorer.begin(PromptBatch(torch.zeros(1, 8, dtype=torch.long), 8, torch.tensor([2]), torch.tensor([5])), 1, 1)
    scorer.step(view_from_rows(rows, [0], k=5))
    # top-5: 0.30 (q), 0.25 (gen), 0.15 (gen), 0.10 (pos 5: neither), 0.06 (pos 7: neither)
    assert torch.allclose(scorer.result(), torch.tensor(0.25 + 0.15 + 0.5 * 0.30))
    weighted = ReasoningScorer(top_k=2, generated_weight=2.0, query_weight=1.0)
    weighted.begin(PromptBatch(torch.zeros(1, 8, dtype=torch.long), 8, torch.tensor([2]), torch.tensor([5])), 1, 1)
    weighted.step(view_from_rows(rows, [0], k=5))  # reads only its own top 2 of the recorded 5
    assert torch.allclose(weighted.result(), torch.tensor(2.0 * 0.25 + 1.0 * 0.30))


def test_reasoning_without_question_span_counts_generated_only():
    rows = torch.tensor([0.5, 0.1, 0.4]).view(1, 1, 1, 3)
    scorer = ReasoningScorer(top_k=5)
    scorer.begin(PromptBatch(torch.zeros(1, 2, dtype=torch.long), 2, torch.tensor([0]), torch.tensor([0])), 1, 1)
    scorer.step(view_from_rows(rows, [0], k=3))
    assert torch.allclose(scorer.result(), torch.tensor(0.4))
