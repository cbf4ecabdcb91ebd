"""HeadScores, the one value of a loaded heads file, on files written by real runs: the toy Llama (3 layers x 4
query heads on 2 KV heads, conftest's `toy_run`) and a hybrid Qwen3-Next (attention in layers 1 and 3 only). Each
answer is worked out here from the file's own lists, never from the value's code."""
import json
import shutil

import numpy as np
import pytest

from headscope.families import recipes
from headscope.cli.commands import main
from headscope.errors import HeadscopeError
from headscope.heads import HeadScores
from headscope.runs.outputs import parse_head_key
from headscope.families.toy import word_tokenizer

from conftest import WORDS
from toy_runs import PREFIX


def file_means(path) -> dict[str, float]:
    """Each head's mean, straight from the heads file's lists (a head with no value: None)."""
    lists = json.loads(path.read_text())
    return {key: sum(values) / len(values) if values else None for key, values in lists.items()}


def by_rule(means: dict[str, float]) -> list[str]:
    """The README's order of the top K: highest mean first, ties by layer then head, no value never."""
    valued = [key for key, mean in means.items() if mean is not None]
    return sorted(valued, key=lambda key: (-means[key], parse_head_key(key)))


@pytest.fixture(scope="module")
def hybrid_run(data_dir, tmp_path_factory):
    """A retrieval run of the hybrid: its heads file names layers 1 and 3, its manifest says 4 layers."""
    model = tmp_path_factory.mktemp("qwen3_next")
    tokenizer = word_tokenizer(WORDS + ["book", "based", "on", "content", "question", "answer", "context"])
    recipes.tiny_model("qwen3_next", vocab_size=len(tokenizer), seed=5).save_pretrained(model)
    tokenizer.save_pretrained(model)
    out = tmp_path_factory.mktemp("hybrid-scores")
    assert main(["detect", "retrieval", "--model", str(model), "--out", str(out), "--haystack",
                 str(data_dir / "haystack"), "--needles", str(data_dir / "needles.jsonl"), "--context-lengths", "260",
                 "--depths", "0,100", "--success-threshold", "-1", "--max-new-tokens", "6", "--quiet",
                 "--no-stop-at-newline", "--no-plots"]) == 0
    return out / f"{model.name}_retrieval_heads.json"


def test_a_hybrids_layers_are_its_attention_layers_by_real_index(hybrid_run):
    scores = HeadScores.load(hybrid_run)
    means = file_means(hybrid_run)
    assert scores.layers == [1, 3] and scores.heads_per_layer == 4
    assert scores.model_layers == 4 and scores.named_attention_layers == [1, 3]
    assert scores.means.shape == (2, 4)
    for key, mean in means.items():  # row i is layer layers[i]: layer 3's heads are row 1, not row 3
        layer, head = parse_head_key(key)
        assert scores.means[[1, 3].index(layer), head] == pytest.approx(mean or 0.0)
    counts = {key: len(values) for key, values in json.loads(hybrid_run.read_text()).items()}
    assert scores.counts.tolist() == [[counts[f"{layer}-{head}"] for head in range(4)] for layer in (1, 3)]
    assert scores.kv_keys(2) == ["1-0", "1-1", "3-0", "3-1"]


def test_kv_pooling_of_a_grouped_query_model(toy_run, tmp_path):
    """The toy has 4 query heads on 2 KV heads: KV head g of a layer reads query heads 2g and 2g + 1 (repeat_kv).
    The run's own scores are mostly 0, so the file is also read with distinct scores put in its lists."""
    path = toy_run / f"{PREFIX}_heads.json"
    scores = HeadScores.load(path)
    assert scores.layers == [0, 1, 2] and scores.named_attention_layers == [0, 1, 2]  # as its manifest says
    alone = tmp_path / "alone_heads.json"  # no manifest, layers 0..n-1: nothing says which layers have attention
    shutil.copy(path, alone)
    assert HeadScores.load(alone).named_attention_layers == []
    distinct = tmp_path / "distinct_heads.json"
    distinct.write_text(json.dumps({key: [((7 * l + 3 * h) % 12) / 12, 0.0]
                                    for key, (l, h) in ((key, parse_head_key(key)) for key in scores.keys)}))
    for path in (path, distinct):
        scores, mean = HeadScores.load(path), {key: value or 0.0 for key, value in file_means(path).items()}
        expected_max = [[max(mean[f"{l}-{2 * g}"], mean[f"{l}-{2 * g + 1}"]) for g in range(2)] for l in range(3)]
        expected_mean = [[(mean[f"{l}-{2 * g}"] + mean[f"{l}-{2 * g + 1}"]) / 2 for g in range(2)] for l in range(3)]
        assert np.allclose(scores.kv_scores(2, "max"), expected_max)
        assert np.allclose(scores.kv_scores(2, "mean"), expected_mean)
        assert np.allclose(scores.kv_scores(4), [[mean[f"{l}-{h}"] for h in range(4)] for l in range(3)])  # MHA
    assert np.allclose(scores.kv_scores(2) * 24, [[3, 9], [10, 4], [5, 11]])  # the distinct file, by hand
    with pytest.raises(HeadscopeError, match="must divide"):
        scores.kv_scores(3)


def test_top_k_follows_the_tie_rule(toy_run, tmp_path):
    path = toy_run / f"{PREFIX}_heads.json"
    scores, means = HeadScores.load(path), file_means(path)
    order = by_rule(means)
    assert [scores.top(k) for k in range(1, len(order) + 1)] == [order[:k] for k in range(1, len(order) + 1)]
    assert scores.top_k_list(3) == [[*parse_head_key(key), means[key]] for key in order[:3]]
    razor = {}
    for key in order[:5]:
        layer, head = parse_head_key(key)
        razor.setdefault(str(layer), []).append(head)
    assert scores.razor(5) == {layer: sorted(razor[layer]) for layer in sorted(razor, key=int)}
    # the same file with every head tied: the order is layer then head, and a head with no value is never taken
    tied = json.loads(path.read_text())
    tied = {key: [0.5] for key in tied} | {"0-0": []}
    (tmp_path / "tied_heads.json").write_text(json.dumps(tied))
    even = HeadScores.load(tmp_path / "tied_heads.json")
    assert even.top(3) == ["0-1", "0-2", "0-3"]
    with pytest.raises(HeadscopeError, match="only 11 of the 12 heads have a value"):
        even.top(12)


def test_patterns_are_what_export_writes_and_kv_replays(toy_run, tmp_path):
    path = tmp_path / f"{PREFIX}_heads.json"
    shutil.copy(toy_run / f"{PREFIX}_heads.json", path)
    shutil.copy(toy_run / f"{PREFIX}_manifest.json", tmp_path / f"{PREFIX}_manifest.json")
    scores, means = HeadScores.load(path), file_means(path)
    pooled = {f"{l}-{g}": max(means[f"{l}-{2 * g}"] or 0.0, means[f"{l}-{2 * g + 1}"] or 0.0)
              for l in range(3) for g in range(2)}
    best = sorted(pooled, key=lambda key: (-pooled[key], parse_head_key(key)))  # ties by layer, KV head
    for k in range(7):  # DuoAttention keeps the k best KV heads full: --sparsity 1 - k/6, and `kv`'s duo-k
        assert scores.top_kv(2, k) == sorted(best[:k], key=parse_head_key)
        pattern = scores.duo(2, sparsity=1 - k / 6)
        assert [f"{l}-{g}" for l, g in zip(*np.nonzero(pattern))] == sorted(best[:k], key=parse_head_key)
    assert main(["export", str(path), "--to", "duo", "--num-kv-heads", "2", "--raw"]) == 0
    written = np.loadtxt(tmp_path / f"{PREFIX}_duo" / "full_attention_heads.tsv", delimiter="\t")
    assert written.tolist() == scores.duo(2, raw=True).tolist()
    order = sorted(pooled, key=lambda key: -written[parse_head_key(key)])  # the raw scores rank as keep_best
    assert order == best
    assert main(["export", str(path), "--to", "headkv", "--budget", "10"]) == 0
    budgets = json.loads((tmp_path / f"{PREFIX}_headkv.json").read_text())
    assert budgets == {f"{l}-{h}": int(scores.headkv(10)[l, h]) for l in range(3) for h in range(4)}
    assert sum(budgets.values()) == 10 * 12  # HeadKV's pool shared out exactly
    assert main(["export", str(path), "--to", "razor", "--top", "4"]) == 0
    assert json.loads((tmp_path / f"{PREFIX}_razor.json").read_text()) == scores.razor(4)
    per_kv_head = scores.headkv(10, num_kv_heads=2)  # `kv --policy headkv`: a KV head scores its query heads' mean
    assert per_kv_head.shape == (3, 2) and per_kv_head.sum() == 10 * 6


def test_another_models_file_is_refused_in_one_line(toy_run, hybrid_run, toy_dir, data_dir, tmp_path, capsys):
    toy = HeadScores.load(toy_run / f"{PREFIX}_heads.json")
    hybrid = HeadScores.load(hybrid_run)
    with pytest.raises(HeadscopeError) as refused:
        hybrid.refuse_other_model(toy.keys)
    assert str(refused.value) == (f"{hybrid_run} scores 2 layers x 4 heads, and the model being run has 3 layers x 4 "
                                  "heads (it has head 3-0, which the model does not have): the score file is for "
                                  "another model")
    toy.refuse_other_model(toy.manifest["heads"])  # its own model: no refusal
    out = tmp_path / "ablated"
    assert main(["ablate", "retrieval", "--scores", str(hybrid_run), "--top", "2", "--model", str(toy_dir),
                 "--out", str(out), "--haystack", str(data_dir / "haystack"), "--needles",
                 str(data_dir / "needles.jsonl"), "--context-lengths", "260", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    # before its weights load, the toy's config is cut to the layers the hybrid's file names (1 of its 3 layers)
    assert err == (f"headscope: error: {hybrid_run} scores 2 layers x 4 heads, and the model being run has 1 layers "
                   "x 4 heads (it has head 3-0, which the model does not have): the score file is for another model")
    assert not out.exists() or not any(out.iterdir())  # refused before anything was written


def test_a_head_its_model_cannot_have_is_refused_by_its_manifest(toy_run, tmp_path):
    """`checked`: the manifest beside the file lists the model's heads; a file that adds one is another model's."""
    for name in (f"{PREFIX}_heads.json", f"{PREFIX}_manifest.json"):
        shutil.copy(toy_run / name, tmp_path / name)
    lists = json.loads((tmp_path / f"{PREFIX}_heads.json").read_text())
    (tmp_path / f"{PREFIX}_heads.json").write_text(json.dumps(lists | {"3-0": [0.5]}))
    with pytest.raises(HeadscopeError, match="it has head 3-0, which the model does not have"):
        HeadScores.load(tmp_path / f"{PREFIX}_heads.json").checked()
    assert HeadScores.load(toy_run / f"{PREFIX}_heads.json").checked().layers == [0, 1, 2]


def test_the_value_imports_nothing_above_the_run_folder():
    """heads/ may import errors, schema, outputs and store only: loading it in a fresh interpreter pulls in no
    engine, experiment, command line or report (nor torch)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    loaded = subprocess.run([sys.executable, "-c", "import sys, headscope.heads; print(' '.join(sys.modules))"],
                            capture_output=True, text=True, check=True, cwd=root,
                            env=os.environ | {"PYTHONPATH": str(root)}).stdout.split()
    above = {"headscope.detection.engine", "headscope.experiments.ablation", "headscope.experiments.kv_curve", "headscope.experiments.specificity",
             "headscope.experiments.rescore", "headscope.cli.commands", "headscope.cli.analysis_commands", "headscope.cli.report", "headscope.heads.analysis",
             "headscope.heads.exports", "headscope.heads.plots", "torch"}
    assert not above & set(loaded)
