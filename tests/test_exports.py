"""Exports for KV-cache methods: shapes, ranges, exact budgets, and one clear error for bad input."""
import json

import numpy as np
import pytest

from headscope.heads import exports
from headscope.cli.commands import main
from headscope.errors import HeadscopeError
from headscope.heads import HeadScores, patterns
from headscope.runs.outputs import summarize


def write_heads(path, means):
    means = np.asarray(means, dtype=float)
    path.write_text(json.dumps({f"{l}-{h}": [float(means[l, h])] for l in range(means.shape[0])
                                for h in range(means.shape[1])}))
    return path


def means_summary(means):
    means = np.asarray(means, dtype=float)
    return summarize({f"{l}-{h}": [float(means[l, h])] for l in range(means.shape[0]) for h in range(means.shape[1])})


GQA = np.array([[0.0, 0.1, 0.9, 0.2, 0.0, 0.0, 0.0, 0.05],
                [0.3, 0.0, 0.0, 0.0, 0.6, 0.7, 0.0, 0.0],
                [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.4]])  # 3 layers, 8 query heads on 2 KV heads


def test_top_k_and_razor():
    scores = HeadScores.from_summary(means_summary(GQA))
    assert scores.top_k_list(3) == [[0, 2, 0.9], [1, 5, 0.7], [1, 4, 0.6]]
    assert scores.razor(4) == {"0": [2], "1": [4, 5], "2": [7]}
    with pytest.raises(HeadscopeError, match="larger than the number of heads"):
        scores.razor(25)


def test_duo_pattern_shape_and_values():
    raw = patterns.duo_pattern(GQA, 2, raw=True)
    assert raw.shape == (3, 2) and raw.min() >= 0 and raw.max() == 1
    assert raw == pytest.approx(np.array([[1.0, 0.05 / 0.9], [0.3 / 0.9, 0.7 / 0.9], [0.0, 0.4 / 0.9]]))
    assert patterns.duo_pattern(GQA, 2, threshold=0.35).tolist() == [[1, 0], [0, 1], [0, 1]]
    half = patterns.duo_pattern(GQA, 2, sparsity=0.5)
    assert half.tolist() == [[1, 0], [0, 1], [0, 1]]  # the 3 best of 6 KV heads: 0.9, 0.7, 0.4
    assert patterns.duo_pattern(GQA, 2, sparsity=0.0).sum() == 6 and patterns.duo_pattern(GQA, 2, sparsity=1.0).sum() == 0
    with pytest.raises(HeadscopeError, match="exactly one"):
        patterns.duo_pattern(GQA, 2, threshold=0.3, sparsity=0.5)
    with pytest.raises(HeadscopeError, match="between 0 and 1"):
        patterns.duo_pattern(GQA, 2, sparsity=1.5)


def test_duo_export_is_a_folder_duoattention_loads(tmp_path, capsys):
    path = write_heads(tmp_path / "m_retrieval_heads.json", GQA)
    assert main(["export", str(path), "--to", "duo", "--num-kv-heads", "2", "--sparsity", "0.5"]) == 0
    folder = tmp_path / "m_retrieval_duo"
    # DuoAttention's load_attn_pattern: np.loadtxt(tsv, delimiter="\t") and config.json's sink/recent sizes.
    pattern = np.loadtxt(folder / "full_attention_heads.tsv", dtype=float, delimiter="\t")
    assert pattern.shape == (3, 2) and set(pattern.ravel()) <= {0.0, 1.0}
    assert json.loads((folder / "config.json").read_text()) == {"sink_size": 64, "recent_size": 256}
    assert "3 of 6 KV heads" in capsys.readouterr().out
    assert main(["export", str(path), "--to", "duo", "--sparsity", "0.5"]) == 2
    assert "--num-kv-heads" in capsys.readouterr().err
    assert main(["export", str(path), "--to", "duo", "--num-kv-heads", "3", "--raw"]) == 2
    assert "divide" in capsys.readouterr().err


def test_largest_remainder_sums_exactly():
    assert patterns.largest_remainder(np.array([2.5, 7.5, 0.0, 10.0]), 20).tolist() == [3, 7, 0, 10]
    shares = np.random.default_rng(0).dirichlet(np.ones(50)) * 997
    assert patterns.largest_remainder(shares, 997).sum() == 997


def test_headkv_budgets_by_hand():
    """B = 10, beta = 2: each head keeps 10 - floor(10 / 2) = 5 and the pool is 5 * 4 = 20,
    shared 1:3:0:4 (T = 1) -> 2.5, 7.5, 0, 10 -> 3, 7, 0, 10 by largest remainder."""
    means = np.array([[1.0, 3.0], [0.0, 4.0]])
    assert patterns.headkv_budgets(means, 10, beta=2).tolist() == [[8, 12], [5, 15]]
    # T = 2 sharpens: shares 1:9:0:16 of 20 -> 0.77, 6.92, 0, 12.31 -> 1, 7, 0, 12
    assert patterns.headkv_budgets(means, 10, beta=2, temperature=2).tolist() == [[6, 12], [5, 17]]
    assert patterns.headkv_budgets(means, 10, beta=2, temperature=0).tolist() == [[10, 10], [10, 10]]
    assert patterns.headkv_budgets(means, 10, beta=1).min() == 0  # beta 1: everything pooled


def test_headkv_budgets_sum_exactly_and_follow_the_scores():
    means = np.random.default_rng(2).gamma(0.5, 1.0, (4, 8))
    for budget, beta, temperature in ((128, 1.2, 1.0), (37, 1.01, 1.0), (64, 5.0, 3.0)):
        budgets = patterns.headkv_budgets(means, budget, beta, temperature)
        assert budgets.sum() == budget * means.size
        order = np.argsort(means.ravel())
        assert np.all(np.diff(budgets.ravel()[order]) >= 0)  # a higher score never gets less
    for bad, message in (({"beta": 0.5}, "beta"), ({"temperature": -1}, "temperature")):
        with pytest.raises(HeadscopeError, match=message):
            patterns.headkv_budgets(means, 128, **bad)
    with pytest.raises(HeadscopeError, match="every head scores 0"):
        patterns.headkv_budgets(np.zeros((2, 2)), 128)


def test_export_cli_formats(tmp_path, capsys):
    path = write_heads(tmp_path / "m_retrieval_heads.json", GQA)
    assert main(["export", str(path), "--to", "headkv", "--budget", "64"]) == 0
    budgets = json.loads((tmp_path / "m_retrieval_headkv.json").read_text())
    assert len(budgets) == 24 and sum(budgets.values()) == 64 * 24 and max(budgets, key=budgets.get) == "0-2"
    out = tmp_path / "matrix.json"
    assert main(["export", str(path), "--to", "headkv", "--layout", "matrix", "--out", str(out)]) == 0
    assert np.array(json.loads(out.read_text())).shape == (3, 8)
    assert main(["export", str(path), "--to", "topk", "--top", "2"]) == 0
    assert json.loads((tmp_path / "m_retrieval_topk.json").read_text()) == [[0, 2, 0.9], [1, 5, 0.7]]
    assert main(["export", str(path), "--to", "razor", "--top", "2"]) == 0
    assert json.loads((tmp_path / "m_retrieval_razor.json").read_text()) == {"0": [2], "1": [5]}
    capsys.readouterr()
    assert main(["export", str(path), "--to", "topk", "--top", "99"]) == 2
    assert "larger than the number of heads" in capsys.readouterr().err


def test_default_top_fits_a_small_model(tmp_path):
    path = write_heads(tmp_path / "m_retrieval_heads.json", [[0.3, 0.1], [0.2, 0.4]])
    assert main(["export", str(path), "--to", "topk"]) == 0  # 4 heads: all of them, not 20
    assert len(json.loads((tmp_path / "m_retrieval_topk.json").read_text())) == 4


def test_kvpress_streams_the_heads_headscope_streams_at_every_ratio(tmp_path):
    """The kvpress snippet of docs/look-compare-export.md: DuoAttentionPress reads `export --to duo`'s folder
    (np.loadtxt, clipped to [0, 1]) and streams the round(N x ratio) lowest-scoring KV heads by np.argsort, whose order among equal scores is
    unspecified. With ties -- a tie at the top, and half the heads at 0 -- the raw export still gives, at every
    ratio, exactly the heads `headscope kv`'s duo (keep_best) keeps full; a binary export at its own ratio too."""
    import references

    means = np.zeros((6, 8))  # 48 KV heads (no GQA): argsort sorts more than 16 values (not insertion sort)
    means[1, :4] = 0.9  # four tied at the top
    means[2, 2:6], means[4, ::3] = 0.3, 0.3  # ties in the middle
    means[5, 1:3] = 0.05
    raw = tmp_path / "raw"
    exports.write_duo(patterns.duo_pattern(means, 8, raw=True), raw, 4, 64)
    loaded = np.clip(np.loadtxt(raw / "full_attention_heads.tsv", dtype=float, delimiter="\t"), 0, 1)
    for full in range(49):
        streaming = references.kvpress_duo_streaming_mask(loaded, 1 - full / 48).numpy()
        assert np.array_equal(~streaming, patterns.keep_best(means, full).astype(bool)), full
    binary = tmp_path / "binary"
    exports.write_duo(patterns.duo_pattern(means, 8, sparsity=0.75), binary, 4, 64)
    pattern = np.loadtxt(binary / "full_attention_heads.tsv", dtype=float, delimiter="\t")
    streaming = references.kvpress_duo_streaming_mask(pattern, 1 - pattern.mean()).numpy()
    assert np.array_equal(~streaming, pattern == 1) and pattern.sum() == 12
