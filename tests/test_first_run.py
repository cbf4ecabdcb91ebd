"""A researcher's first real run: bad input gets one line, re-runs resume, and nothing silent happens
(issue 11's defects, each with a test that failed before)."""
import json

from headscope.cli.commands import main
from headscope.tasks.retrieval import RetrievalOptions, grid_lengths


def run(*argv):
    return main(["detect", *argv, "--quiet"])


def data_options(data_dir):
    return ["--haystack", str(data_dir / "haystack"), "--needles", str(data_dir / "needles.jsonl"),
            "--context-lengths", "260", "--depths", "0,100", "--max-new-tokens", "4"]


def test_out_naming_a_file_is_one_line(toy_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "results"
    out.write_text("keep me")
    assert run("retrieval", "--model", str(toy_dir), "--out", str(out), *data_options(data_dir)) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"headscope: error: --out {out} is a file, not a folder"
    assert out.read_text() == "keep me"


def test_no_passing_sample_says_so_exits_1_and_writes_null_means_and_no_heatmap(toy_dir, data_dir, tmp_path, capsys):
    assert run("retrieval", "--model", str(toy_dir), "--out", str(tmp_path), *data_options(data_dir)) == 1
    assert "0 of 2 samples passed the success filter" in capsys.readouterr().err
    summary = json.loads((tmp_path / f"{toy_dir.name}_retrieval_summary.json").read_text())
    assert all(stats == {"mean": None, "std": None, "count": 0, "max": None} for stats in summary.values())
    assert not list(tmp_path.glob("*.png"))


def test_a_legacy_heads_file_is_announced_and_kept_as_documented(toy_dir, data_dir, tmp_path, capsys):
    legacy = {f"{layer}-{head}": [0.5] for layer in range(3) for head in range(4)}
    (tmp_path / f"{toy_dir.name}_retrieval_heads.json").write_text(json.dumps(legacy))
    assert run("retrieval", "--model", str(toy_dir), "--out", str(tmp_path), "--success-threshold", "-1",
               "--no-plots", *data_options(data_dir)) == 0
    assert "Retrieval_Head format" in capsys.readouterr().err
    assert json.loads((tmp_path / f"{toy_dir.name}_retrieval_base_heads.json").read_text()) == legacy
    heads = json.loads((tmp_path / f"{toy_dir.name}_retrieval_heads.json").read_text())
    assert all(scores[0] == 0.5 and len(scores) == 3 for scores in heads.values())  # the base, then 2 samples


def test_a_length_cap_is_announced(capsys):
    assert grid_lengths(RetrievalOptions(min_length=1000, max_length=50000, num_lengths=2), 4096) == [1000, 4096]
    assert "--max-length 50000 is beyond the model's maximum context of 4096" in capsys.readouterr().err


def test_a_missing_model_folder_says_so(tmp_path, capsys):
    assert run("reasoning", "--model", str(tmp_path / "nope")) == 2
    assert capsys.readouterr().err.strip() == f"headscope: error: no such model folder: {tmp_path / 'nope'}"


def test_help_names_every_command_and_task(capsys):
    for argv in (["--help"], ["detect", "--help"], ["compare", "--help"], ["organism", "train", "--help"]):
        try:
            main(argv)
        except SystemExit:
            pass
    out = capsys.readouterr().out
    for word in ("detect", "ablate", "check", "show", "compare", "export", "merge", "organism",
                 "retrieval", "reasoning", "query", "pattern", "another heads or summary file",
                 "probability that a head is ablated", "peak AdamW learning rate"):
        assert word in out, word


def test_a_real_model_gets_the_real_text_haystack(tmp_path):
    """A random Llama with a byte-level BPE tokenizer (as real models have), no --haystack: the prompts are
    built from the English essays and their needles, never from the organism's filler."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from headscope.tasks import DATA_DIR
    from headscope.families.toy import tiny_model

    essays = [path.read_text() for path in sorted((DATA_DIR / "prose").glob("*.txt"))]
    trained = ByteLevelBPETokenizer()
    trained.train_from_iterator(essays, vocab_size=600, special_tokens=["<s>", "</s>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=trained._tokenizer, bos_token="<s>", eos_token="</s>")
    model_dir = tmp_path / "tiny-llama"
    tiny_model("llama", vocab_size=len(tokenizer), num_layers=2).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    assert run("retrieval", "--model", str(model_dir), "--out", str(out), "--context-lengths", "600",
               "--depths", "50", "--save-prompts", "--max-new-tokens", "2", "--no-plots") == 1  # nothing passes
    rows = [json.loads(line) for line in (out / "tiny-llama_retrieval_samples.jsonl").read_text().splitlines()]
    needles = [json.loads(line) for line in (DATA_DIR / "prose_needles.jsonl").read_text().splitlines()]
    assert len(rows) == len(needles) and all(row["error"] is None for row in rows)
    for row, needle in zip(rows, needles):
        assert row["prompt"].startswith("On Maps and the People Who Trust Them")
        assert needle["needle"].strip() in row["prompt"] and needle["question"] in row["prompt"]
    organism_filler = (DATA_DIR / "haystack" / sorted(p.name for p in (DATA_DIR / "haystack").glob("*.txt"))[0])
    assert organism_filler.read_text()[:40] not in rows[0]["prompt"]


def test_organism_defaults_fill_only_the_options_left_unset():
    """`ablate --num-depths 3` on the organism: the organism's grid fills the task's unset options only, and
    never reaches the ablation settings (where it used to override --num-depths)."""
    import argparse

    from headscope.experiments.ablation import AblationSettings
    from headscope.cli.commands import options_from
    from headscope.tasks import TASKS

    args = argparse.Namespace(task_spec=TASKS["retrieval"], num_depths=3, top=[8], scores="s.json")
    assert options_from(args, AblationSettings) == {"top": [8], "scores": "s.json"}
    options = options_from(args, RetrievalOptions)
    assert options["num_depths"] == 3 and options["min_length"] == 300 and options["max_length"] == 1200
