"""The top-k tie rule (ties.top_k, issue 27): entries equal at 2^-16 of their size rank by position, earliest first,
so a tie is settled alike on every backend; rows without ties keep torch.topk's picks (the papers' scores)."""
import numpy as np
import pytest
import torch

import references
from headscope.attention import ties
from headscope.attention.recorder import Recorder


def recorded_top(row: torch.Tensor, k: int) -> list[int]:
    """The positions the recorder hands the scorers for one (1, 1, length) row."""
    recorder = Recorder(1, k)
    recorder.seq_len = row.shape[-1]
    recorder.add(0, row)
    return recorder.take("cpu")[1][0, 0, 0].tolist()


def test_a_tie_at_the_boundary_goes_to_the_earliest_position_whatever_the_rounding():
    """Keys 3 and 7 tie (the same key at two positions); two backends round their weights an ulp apart, one
    way or the other. torch.topk follows the ulp, so the top-1 (retrieval) and the top-3 (r2, reasoning) changed
    with the backend; the rule gives position 3 both times."""
    base = torch.full((12,), 0.02)
    base[[1, 5]] = torch.tensor([0.30, 0.25])
    tie = 0.1
    for later_larger in (True, False):
        row = base.clone()
        row[3] = tie
        row[7] = torch.nextafter(torch.tensor(tie), torch.tensor(1.0 if later_larger else 0.0))
        assert recorded_top(row.view(1, 1, -1), 3) == [1, 5, 3]
        blank = row.clone()
        blank[[1, 5]] = 0.0
        assert recorded_top(blank.view(1, 1, -1), 1) == [3]


def test_rows_without_ties_keep_torch_topk():
    rows = torch.rand(64, 300, generator=torch.Generator().manual_seed(0)).softmax(-1)
    values, positions, tied = ties.top_k(rows, 5)
    expected = rows.topk(5)
    untied = ~tied
    assert int(untied.sum()) >= 60  # a near tie among 6 random neighbours is rare
    assert torch.equal(positions[untied], expected.indices[untied])
    assert torch.equal(values[untied], expected.values[untied])


def test_only_tied_rows_are_resolved_and_counted():
    rows = torch.rand(4, 50, generator=torch.Generator().manual_seed(1))
    rows[2] = 0.5  # every entry tied: the rule takes the first k positions
    values, positions, tied = ties.top_k(rows, 4)
    assert tied.tolist() == [False, False, True, False]
    assert positions[2].tolist() == [0, 1, 2, 3] and values[2].tolist() == [0.5] * 4
    assert torch.equal(positions[[0, 1, 3]], rows[[0, 1, 3]].topk(4).indices)


def ulps_below(value: float, ulps: int) -> float:
    bits = torch.tensor([value], dtype=torch.float32).view(torch.int32) - ulps
    return float(bits.view(torch.float32))


def test_ties_below_the_resolution_and_not_above():
    row = torch.zeros(6)
    row[4] = 0.75  # float32 bits ...0000000: the middle of its level, which spans 128 ulps
    row[2] = ulps_below(0.75, 20)  # 20 ulps below (2e-6 of it): equal at 2^-16, the earlier ranks first
    assert ties.top_k(row[None], 1)[1].tolist() == [[2]]
    row[2] = ulps_below(0.75, 200)  # 2e-5 below: another level, a real difference, the larger wins
    assert ties.top_k(row[None], 1)[1].tolist() == [[4]]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_the_references_rule_equals_headscopes(k):
    """tests/references.py transcribes the rule on its own (numpy); both agree on rows full of ties."""
    generator = torch.Generator().manual_seed(k)
    rows = (torch.randint(0, 6, (40, 30), generator=generator).float() / 6).softmax(-1)  # many exact ties
    for row in rows:
        expected = references.rule_top_k(row.numpy(), k)
        assert ties.top_k(row[None], k)[1][0].tolist() == list(expected)
    assert np.all(references.rule_top_k(np.array([0.1, 0.3, 0.3, 0.2], dtype=np.float32), 2) == [1, 2])


def test_detect_counts_the_tied_head_steps_per_sample_and_in_the_manifest(data_dir, tmp_path):
    """Queries zeroed: every row is uniform over its keys, so every head-step's top 6 is a tie the rule settles
    (the five earliest prompt tokens win); detect counts them all, per sample and in the manifest."""
    import json

    import headscope
    from headscope.detection import loading
    from headscope.families.toy import tiny_model, word_tokenizer
    from conftest import WORDS

    tokenizer = word_tokenizer(WORDS + ["book", "based", "on", "content", "question", "answer", "context"])
    model = tiny_model("llama", vocab_size=len(tokenizer), num_layers=2, num_heads=4)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "q_proj"):
                module.q_proj.weight.zero_()
    result = headscope.detect("reasoning", loaded=loading.prepare(model, tokenizer, "uniform"), check=False,
                              out=str(tmp_path), quiet=True, plots=False, data=str(data_dir / "reasoning.json"),
                              max_new_tokens=3, stop_at_newline=False, success_threshold=-1, batch_size=2)
    for row in result.samples:
        assert row["tied_head_steps"] == 3 * 2 * 4, row  # steps x layers x heads
        assert row["head_scores"] == [[0.0] * 4] * 2  # the top 5: the earliest prompt tokens, none of the question
    manifest = json.loads(next(tmp_path.glob("*_manifest.json")).read_text())
    assert manifest["tied_head_steps"] == sum(row["tied_head_steps"] for row in result.samples) > 0


@pytest.mark.parametrize("model_type", ["flint", "granite_swa"])
def test_the_sweep_finds_headscope_exact_against_a_reference_with_the_rule(model_type, tmp_path):
    """Flint's rows of repeated tokens tie exactly, and granite_swa had 7 head-steps at a near tie: the table
    said "either way" for both. headscope and the sweep's eager reference, each applying the rule, now give one
    value per score; Flint's ties are counted as settled."""
    from headscope.families import sweep

    outcome = sweep.sweep_type(model_type, tmp_path)
    assert outcome.verdict == sweep.EXACT and "either way" not in outcome.reason, outcome
    assert ("settled by the rule" in outcome.reason) == (model_type == "flint"), outcome


def test_a_tie_an_ulp_apart_is_settled_alike_whichever_way_it_rounds():
    """Two backends round the same tied entry an ulp apart, either way: the rule must pick the same position. A
    value whose float32 bits lie at a grid line (63 mod 128) is where a fixed rounding grid would split them."""
    import numpy as np

    value = np.array([63 + 128 * 100000], dtype=np.int32).view(np.float32)[0].item()
    above = np.nextafter(np.float32(value), np.float32(1)).item()
    picks = []
    for first, second in ((value, above), (above, value)):
        row = torch.full((1, 10), value / 4)
        row[0, 3], row[0, 7] = first, second
        picks.append(ties.top_k(row, 1)[1].tolist())
    assert picks == [[[3]], [[3]]]
