"""show / compare and the maths under them, on hand-made score files with known answers."""
import json

import numpy as np
import pytest

from headscope.heads import analysis
from headscope.cli.commands import main
from headscope.errors import HeadscopeError
from headscope.heads import HeadScores
from headscope.heads.scores import companion
from headscope.runs.outputs import summarize
from headscope.scorers import keeps_zeros


def write_run(folder, name, per_sample, task="retrieval", keep_zeros=None, passed=None):
    """keep_zeros: the scorer's accumulation rule (default: retrieval keeps zeros, reasoning does not)."""
    """A run folder like `detect` writes: heads (the engine's accumulation rule), summary and samples files
    from `per_sample`, an array (samples, layers, heads) of what each sample contributes."""
    per_sample = np.asarray(per_sample, dtype=float)
    layers, heads = per_sample.shape[1:]
    keep = task == "retrieval" if keep_zeros is None else keep_zeros
    passed = [True] * len(per_sample) if passed is None else passed
    lists = {f"{l}-{h}": [float(s[l, h]) for s, ok in zip(per_sample, passed) if ok and (keep or s[l, h] > 0)]
             for l in range(layers) for h in range(heads)}
    (folder / f"{name}_{task}_heads.json").write_text(json.dumps(lists))
    (folder / f"{name}_{task}_summary.json").write_text(json.dumps(summarize(lists)))
    rows = [{"id": str(i), "task": task, "context_length": 100 * (1 + i % 3), "depth_percent": 50 * (i // 3 % 3),
             "response": "", "score": 100.0 if ok else 0.0, "passed": ok, "error": None, "head_scores": s.tolist(),
             "keep_zeros": keep}
            for i, (s, ok) in enumerate(zip(per_sample, passed))]
    (folder / f"{name}_{task}_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # The manifest holds the --keep-zeros option, which only the reasoning scorer reads: a query or pattern run
    # keeps zeros with the option off (reading the option instead of the rows' rule dropped them).
    option = bool(keep_zeros) if task == "reasoning" else False
    (folder / f"{name}_{task}_manifest.json").write_text(json.dumps({"task": task, "heads": list(lists),
                                                                     "options": {"keep_zeros": option}}))
    return folder / f"{name}_{task}_heads.json"


def write_means(path, means):
    """A summary file with the given (layers, heads) means."""
    means = np.asarray(means, dtype=float)
    path.write_text(json.dumps({f"{l}-{h}": {"mean": float(means[l, h]), "std": 0.0, "count": 1, "max": 0.0}
                                for l in range(means.shape[0]) for h in range(means.shape[1])}))
    return path


def error_line(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("headscope: error: ") and "\n" not in err
    return err


# ------------------------------------------------------------------------------------------ files

def test_heads_and_summary_files_read_the_same(tmp_path):
    heads = write_run(tmp_path, "m", np.arange(12).reshape(3, 2, 2) / 10)
    from_heads = HeadScores.load(heads).summary
    from_summary = HeadScores.load(tmp_path / "m_retrieval_summary.json").summary
    assert from_heads.keys() == from_summary.keys()
    assert all(from_heads[key] == pytest.approx(from_summary[key]) for key in from_heads)
    assert from_heads["1-1"]["mean"] == pytest.approx(0.7) and from_heads["1-1"]["count"] == 3


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "not a heads or summary file"),
    ('{"0-0": "high"}', "not a heads or summary file"),
    ('{"zero": [1]}', "not a head id"),
    ("{not json", "not valid JSON"),
])
def test_files_not_in_the_format(tmp_path, capsys, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(HeadscopeError, match=message):
        HeadScores.load(path)
    assert message in error_line(capsys, ["show", str(path)])


def test_missing_file(tmp_path, capsys):
    assert "no such score file" in error_line(capsys, ["show", str(tmp_path / "nope.json")])


def test_a_head_outside_the_grid_is_named(tmp_path):
    path = write_means(tmp_path / "m_summary.json", np.ones((2, 2)))
    data = json.loads(path.read_text())
    data["99-0"] = data["0-0"]
    path.write_text(json.dumps(data))
    with pytest.raises(HeadscopeError, match="99-0|missing"):
        HeadScores.load(path).means


def test_companion_files_of_a_run():
    assert companion("out/m_retrieval_heads.json", "samples").as_posix() == "out/m_retrieval_samples.jsonl"
    assert companion("m_reasoning_summary.json", "heatmap").name == "m_reasoning_heatmap.png"
    assert companion("m_x_heads.shard-0-of-2.json", "samples").name == "m_x_samples.shard-0-of-2.jsonl"
    assert companion("scores.json", "samples").name == "scores_samples.jsonl"


def test_show_prints_the_ranked_table(tmp_path, capsys):
    path = write_means(tmp_path / "m_summary.json", [[0.1, 0.9], [0.5, 0.3]])
    assert main(["show", str(path), "--top", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["layer", "head", "mean", "std", "count"]
    assert [line.split()[:2] for line in lines[1:]] == [["0", "1"], ["1", "0"]]


# -------------------------------------------------------------------------------------------- GQA

def test_kv_heads_aggregate_query_groups():
    """8 query heads on 2 KV heads: query heads 0-3 read KV head 0 and 4-7 read KV head 1 (repeat_kv)."""
    means = np.array([[0, 1, 2, 3, 4, 5, 6, 7], [7, 0, 0, 0, 0, 0, 0, 1]], dtype=float)
    assert analysis.kv_head_scores(means, 2, "max").tolist() == [[3, 7], [7, 1]]
    assert analysis.kv_head_scores(means, 2, "mean").tolist() == [[1.5, 5.5], [1.75, 0.25]]
    assert analysis.kv_head_scores(means, 8, "max").tolist() == means.tolist()  # MHA: unchanged
    with pytest.raises(HeadscopeError, match="divide"):
        analysis.kv_head_scores(means, 3)


def test_show_kv_heads_from_flag_and_from_model_config(tmp_path, capsys):
    from transformers import LlamaConfig

    path = write_means(tmp_path / "m_summary.json", np.arange(16).reshape(2, 8))
    assert main(["show", str(path), "--kv-heads", "max", "--num-kv-heads", "2", "--top", "1"]) == 0
    # the query heads by their ids: "1-4 to 1-7", not "4-7" (which reads as layer 4, head 7)
    assert capsys.readouterr().out.splitlines()[1].split() == ["1", "1", "15.0000", "1-4", "to", "1-7"]
    LlamaConfig(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2).save_pretrained(tmp_path / "model")
    assert main(["show", str(path), "--kv-heads", "mean", "--model", str(tmp_path / "model"), "--top", "4"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 5
    assert "--num-kv-heads" in error_line(capsys, ["show", str(path), "--kv-heads", "max"])
    LlamaConfig(num_hidden_layers=2, num_attention_heads=4).save_pretrained(tmp_path / "other")
    assert "4 attention heads" in error_line(capsys, ["show", str(path), "--kv-heads", "max",
                                                      "--model", str(tmp_path / "other")])


# -------------------------------------------------------------------------------------- agreement

def test_overlap_and_jaccard_of_constructed_sets():
    assert analysis.overlap(["0-0", "0-1", "1-0", "1-1"], ["1-0", "1-1", "2-0", "2-1"]) == (2, pytest.approx(2 / 6))
    assert analysis.overlap(["0-0"], ["0-0"]) == (1, 1.0)
    assert analysis.overlap(["0-0"], ["0-1"]) == (0, 0.0)


def test_average_ranks_share_ties():
    assert analysis.average_ranks(np.array([3.0, 1.0, 2.0, 2.0])).tolist() == [4, 1, 2.5, 2.5]


def test_spearman_of_a_known_permutation():
    """No ties: rho = 1 - 6 sum d^2 / (n (n^2 - 1))."""
    x = np.arange(10.0)
    permutation = np.array([1, 0, 2, 3, 4, 5, 6, 9, 8, 7])
    d = x - permutation
    assert analysis.spearman(x, permutation) == pytest.approx(1 - 6 * (d ** 2).sum() / (10 * 99))
    assert analysis.spearman(x, -x) == pytest.approx(-1)
    assert analysis.spearman(x, x ** 3) == pytest.approx(1)  # ranks only


def test_compare_top_k_sets(tmp_path):
    a = HeadScores.load(write_means(tmp_path / "a.json", [[9, 8, 7], [6, 5, 4]]))
    b = HeadScores.load(write_means(tmp_path / "b.json", [[9, 4, 7], [6, 5, 8]]))  # 0-1 and 1-2 swapped
    result = analysis.compare(a, b, [1, 2, 3])
    assert [(r["overlap"], r["jaccard"]) for r in result["per_k"]] == [(1, 1.0), (1, pytest.approx(1 / 3)),
                                                                      (2, pytest.approx(0.5))]
    assert result["only_a"] == ["0-1"] and result["only_b"] == ["1-2"]
    assert result["spearman"] == pytest.approx(1 - 6 * (16 + 16) / (6 * 35))


def test_compare_cli_and_its_errors(tmp_path, capsys):
    a = write_means(tmp_path / "a.json", [[9, 8, 7], [6, 5, 4]])
    b = write_means(tmp_path / "b.json", [[9, 4, 7], [6, 5, 8]])
    assert main(["compare", str(a), str(b), "--top", "1,2"]) == 0
    out = capsys.readouterr().out
    assert "spearman" in out and "top-2 only in A: 0-1" in out
    assert (tmp_path / "a_vs_b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    other = write_means(tmp_path / "c.json", np.ones((3, 3)))
    assert "different heads" in error_line(capsys, ["compare", str(a), str(other), "--no-plot"])
    assert "larger than the number of heads" in error_line(capsys, ["compare", str(a), str(b), "--top", "7",
                                                                    "--no-plot"])


# -------------------------------------------------------------------------------------- stability

def test_accumulation_rules():
    """Retrieval keeps zeros; reasoning averages only a head's positive entries."""
    contributions = np.array([[0.5, 0.0], [0.3, 0.2]])
    once = np.ones((1, 2))
    assert analysis.head_means(once, contributions, keep_zeros=True)[0].tolist() == pytest.approx([0.4, 0.1])
    assert analysis.head_means(once, contributions, keep_zeros=False)[0].tolist() == pytest.approx([0.4, 0.2])
    only_first = analysis.head_means(np.array([[2.0, 0.0]]), contributions, keep_zeros=False)[0]
    assert only_first[0] == 0.5 and np.isnan(only_first[1])  # no positive entry drawn: no value, not 0
    with_null = np.array([[0.5, np.nan], [0.3, 0.2]])  # a null entry: the head has no value in that sample
    assert analysis.head_means(once, with_null, keep_zeros=True)[0].tolist() == pytest.approx([0.4, 0.2])


@pytest.mark.parametrize("task, keep_zeros", [("retrieval", None), ("reasoning", None), ("reasoning", True),
                                              ("query", True), ("pattern", True)])
def test_bootstrap_full_data_means_match_the_heads_file(tmp_path, task, keep_zeros):
    rng = np.random.default_rng(1)
    per_sample = rng.uniform(0, 1, (6, 2, 3)) * (rng.uniform(0, 1, (6, 2, 3)) > 0.4)
    path = write_run(tmp_path, "m", per_sample, task, keep_zeros, passed=[True] * 5 + [False])
    scores = HeadScores.load(path)
    summary, keys = scores.summary, scores.keys
    rows = analysis.read_samples(companion(path, "samples"))
    keep = keeps_zeros(rows)  # the scorer's rule, read back from the rows
    assert keep == (task == "retrieval" or bool(keep_zeros))
    contributions = analysis.sample_contributions(rows, keys)
    assert contributions.shape == (5, 6)
    result = analysis.bootstrap(contributions, keep, 50, 2, seed=0)
    assert result["mean"] == pytest.approx([summary[k]["mean"] for k in keys])


def test_bootstrap_a_head_that_always_tops_is_stable_and_a_noisy_one_is_flagged(tmp_path, capsys):
    rng = np.random.default_rng(3)
    per_sample = np.zeros((12, 2, 4))
    per_sample[:, 0, 0] = 1.0  # tops every sample
    per_sample.reshape(12, 8)[:, 1:] = rng.uniform(0, 0.5, (12, 7))
    result = analysis.bootstrap(per_sample.reshape(12, 8), True, 300, 2, seed=0)
    assert result["p_top_k"][0] == 1.0 and result["ci_low"][0] == result["ci_high"][0] == 1.0
    second = np.argsort(-result["mean"], kind="stable")[1]
    assert result["p_top_k"][second] < 0.5  # the runner-up is a coin toss among the noisy heads
    assert result["ci_high"][second] - result["ci_low"][second] > 0.05
    again = analysis.bootstrap(per_sample.reshape(12, 8), True, 300, 2, seed=0)
    assert np.array_equal(again["p_top_k"], result["p_top_k"])  # seeded

    path = write_run(tmp_path, "m", per_sample)
    assert main(["show", str(path), "--bootstrap", "300", "--k", "2", "--top", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:2] == ["0", "0"] and not out[1].endswith("*")
    assert out[2].endswith("*")
    assert out[-1].startswith("1 of the top 2 heads are stable")


def test_bootstrap_errors(tmp_path, capsys):
    path = write_run(tmp_path, "m", np.ones((3, 2, 2)))
    assert "larger than the number of heads" in error_line(capsys, ["show", str(path), "--bootstrap", "10",
                                                                    "--k", "5"])
    (tmp_path / "m_retrieval_samples.jsonl").unlink()
    assert "no samples file" in error_line(capsys, ["show", str(path), "--bootstrap", "10"])
    failed = write_run(tmp_path, "f", np.ones((3, 2, 2)), passed=[False] * 3)
    assert "no passing samples" in error_line(capsys, ["show", str(failed), "--bootstrap", "10"])


def test_tied_heads_share_the_top_k_slots():
    """A block of equal heads (say all zero) is not 'stable' just because of the order they are listed in."""
    means = np.array([[0.5, 0.0, 0.0, 0.0, 0.0], [0.0, 0.6, 0.0, 0.0, 0.0]])
    assert analysis.top_k_frequency(means, 2).tolist() == pytest.approx([0.625, 0.625, 0.25, 0.25, 0.25])
    assert analysis.top_k_frequency(means, 2).sum() == pytest.approx(2)


def test_default_k_fit_a_small_model(tmp_path, capsys):
    a = write_means(tmp_path / "a.json", [[9, 8, 7], [6, 5, 4]])
    assert main(["compare", str(a), str(a), "--no-plot"]) == 0  # 6 heads: only K = 5 of 5,10,20,30
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:2]] == ["5"]


def test_signed_values_and_nulls_count_the_same_in_the_heads_file_and_the_bootstrap():
    """A scorer that drops zeros keeps negative values; a null is no value: heads.json's mean, show --bootstrap's
    and the running top-10 agree (they once dropped negatives from the count but not the total)."""
    from headscope.detection.engine import RunningTop
    from headscope.runs.store import derive_heads

    keys = ["0-0", "0-1"]
    scores = [[[2.0, 0.0]], [[-1.0, None]], [[0.0, 3.0]], [[4.0, -3.0]]]
    rows = [{"id": str(i), "passed": True, "keep_zeros": False, "head_scores": s} for i, s in enumerate(scores)]
    heads = derive_heads(rows, keys)
    assert heads == {"0-0": [2.0, -1.0, 4.0], "0-1": [3.0, -3.0]}
    contributions = analysis.sample_contributions(rows, keys)
    means = analysis.head_means(np.ones((1, len(rows))), contributions, keep_zeros=False)[0]
    assert means.tolist() == pytest.approx([5.0 / 3, 0.0])
    running = RunningTop(keys, {key: [] for key in keys})
    for row in rows:
        line = running.add(row)
    assert line.startswith("0-0 1.667")
    kept = [dict(row, keep_zeros=True) for row in rows]
    assert derive_heads(kept, keys) == {"0-0": [2.0, -1.0, 0.0, 4.0], "0-1": [0.0, 3.0, -3.0]}
