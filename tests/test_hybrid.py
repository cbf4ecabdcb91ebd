"""Hybrid models (issue 20): a 4-layer Qwen3-Next with attention in layers 1 and 3 (linear attention in 0 and 2)
is scored on its attention layers only, named by their real indices in every output; ablate masks only
attention heads; a model with no attention layer at all (Mamba) is refused in one line."""
import json

import pytest
import torch

import headscope
from headscope.attention import masking
from headscope.families import recipes
from headscope.cli.commands import main
from headscope.attention.layout import attention_layout
from headscope.families.toy import word_tokenizer

from conftest import WORDS

TASK_WORDS = ["book", "based", "on", "content", "question", "answer", "context"]


def saved(model_type, folder):
    tokenizer = word_tokenizer(WORDS + TASK_WORDS)
    recipes.tiny_model(model_type, vocab_size=len(tokenizer), seed=5).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hybrid_dir(tmp_path_factory):
    return saved("qwen3_next", tmp_path_factory.mktemp("qwen3_next"))


@pytest.fixture(scope="module")
def detected(hybrid_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("hybrid-run")
    options = ["--out", str(out), "--haystack", str(data_dir / "haystack"), "--needles", str(data_dir / "needles.jsonl"),
               "--context-lengths", "260", "--depths", "0,100", "--success-threshold", "-1", "--max-new-tokens", "6",
               "--quiet", "--no-stop-at-newline"]
    assert main(["detect", "retrieval", "--model", str(hybrid_dir), *options]) == 0
    return out / f"{hybrid_dir.name}_retrieval"


def test_only_the_attention_layers_have_heads_named_by_their_real_index(hybrid_dir, detected):
    heads = json.loads(open(f"{detected}_heads.json").read())
    assert sorted({key.split("-")[0] for key in heads}) == ["1", "3"] and len(heads) == 2 * 4
    manifest = json.loads(open(f"{detected}_manifest.json").read())
    assert manifest["attention_layers"] == [1, 3] and manifest["layers"] == 4
    rows = [json.loads(line) for line in open(f"{detected}_samples.jsonl")]
    assert all(len(row["head_scores"]) == 2 for row in rows)  # one row per attention layer, in layer order
    loaded = headscope.load(str(hybrid_dir))
    assert attention_layout(loaded.model).describe() == "attention layers 1, 3 of 4"


def test_show_heatmap_and_report_say_which_layers_have_attention(detected, capsys, tmp_path):
    assert main(["show", f"{detected}_summary.json", "--top", "3"]) == 0
    assert "attention layers 1, 3 of 4" in capsys.readouterr().out
    assert main(["show", f"{detected}_summary.json", "--bootstrap", "20", "--top", "3"]) == 0
    from headscope.heads import HeadScores
    from headscope.heads.plots import heatmap

    summary = json.loads(open(f"{detected}_summary.json").read())
    for stats in summary.values():  # a map with values to draw, whatever the random model copied
        stats["mean"] = stats["mean"] or 0.5
    heatmap(HeadScores.from_summary(summary), tmp_path / "map.png")
    from headscope.cli.report import run_card

    card = run_card(json.loads(open(f"{detected}_manifest.json").read()), [], [1, 3], 4)
    assert card["grid"].startswith("attention layers 1, 3 of 4")


def test_ablation_masks_only_attention_heads(hybrid_dir, detected, data_dir, tmp_path):
    out = tmp_path / "ablate"
    code = main(["ablate", "retrieval", "--scores", f"{detected}_heads.json", "--model", str(hybrid_dir), "--out",
                 str(out), "--quiet", "--haystack", str(data_dir / "haystack"), "--needles",
                 str(data_dir / "needles.jsonl"), "--context-lengths", "260", "--depths", "0", "--top", "2",
                 "--random", "2", "--repeats", "1", "--success-threshold", "-1", "--max-new-tokens", "4"])
    assert code == 0
    report = json.loads(next(out.glob("*_ablation.json")).read_text())
    masked = set(report["top"]["heads"]) | {key for heads in report["random"]["heads"] for key in heads}
    assert {key.split("-")[0] for key in masked} <= {"1", "3"}
    loaded = headscope.load(str(hybrid_dir))
    ids = torch.randint(4, 20, (1, 12))
    with torch.no_grad():
        plain = loaded.model(ids).logits
        with masking.ablating(loaded.model, {1: [0, 1, 2, 3]}, "zero"):
            assert not torch.allclose(loaded.model(ids).logits, plain)  # layer 1's heads do mask
        with masking.ablating(loaded.model, {0: [0, 1, 2, 3]}, "zero"):
            assert torch.equal(loaded.model(ids).logits, plain)  # layer 0 has no attention heads to mask


def test_a_model_with_no_attention_layer_is_refused_in_one_line(tmp_path, data_dir, capsys):
    model_dir = saved("mamba", tmp_path / "mamba")
    out = tmp_path / "out"
    assert main(["detect", "reasoning", "--model", str(model_dir), "--out", str(out), "--data",
                 str(data_dir / "reasoning.json"), "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == "headscope: error: MambaForCausalLM has no attention layers: nothing to score"
    assert not out.exists()


def test_kv_policies_address_the_attention_layers_by_their_real_index(hybrid_dir, data_dir, tmp_path):
    """`headscope kv` on the hybrid: duo with every KV head full and budgets covering the prompt keep the whole
    cache (a policy addressed by dense slot would stream layer 3, or find no budget for it); K = 0 streams both."""
    from transformers import AutoConfig

    from headscope.experiments.kv_curve import kv_curve

    kv_heads = AutoConfig.from_pretrained(hybrid_dir).num_key_value_heads
    scores = tmp_path / "hybrid_heads.json"
    scores.write_text(json.dumps({f"{layer}-{head}": [0.1 + 0.1 * head + layer / 10] for layer in (1, 3)
                                  for head in range(4)}))
    grid = dict(model=str(hybrid_dir), haystack=str(data_dir / "haystack"), needles=str(data_dir / "needles.jsonl"),
                context_lengths=[260], depths=[0, 100], success_threshold=-1, max_new_tokens=4, quiet=True,
                check=False, plots=False, sink=2, recent=8, out=str(tmp_path / "kv"))
    report = kv_curve("retrieval", str(scores), budgets=[0, 2 * kv_heads], policy="duo", **grid)
    kept = {point["budget"]: point for point in report["points"]}
    assert kept[2 * kv_heads]["kv_kept"] == 1.0 and kept[0]["kv_kept"] < 0.5
    assert {key.split("-")[0] for key in kept[2 * kv_heads]["full_heads"]} == {"1", "3"}
    report = kv_curve("retrieval", str(scores), budgets=[400], policy="headkv", **grid)  # joins the same curve
    assert [point["kv_kept"] for point in report["points"] if point["policy"] == "headkv"] == [1.0]
