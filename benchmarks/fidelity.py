"""The fidelity table of docs/method.md: each scorer against a reference transcribed from its paper's released code
(tests/references.py), on identical tokens, default options and the other convention.

    python benchmarks/fidelity.py          # about a minute on 2 CPU cores

For each scorer and convention: the largest |headscope - reference| over every sample and head, and the
Spearman correlation of the head means (the heads files' ranking) with the reference's.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import headscope  # noqa: E402
import references  # noqa: E402
from headscope.detection import loading  # noqa: E402
from headscope.heads.analysis import spearman  # noqa: E402
from headscope.families.toy import tiny_model, word_tokenizer  # noqa: E402
from conftest import WORDS, query_records  # noqa: E402
from scripted import chain_data, chain_script, scripted_model  # noqa: E402



def agreement(rows, expected) -> tuple[float, float]:
    ours = np.array([np.array(row["head_scores"], dtype=float) for row in rows])
    expected = np.array(expected)
    return float(np.nanmax(np.abs(ours - expected))), spearman(np.nanmean(ours, 0).ravel(),
                                                              np.nanmean(expected, 0).ravel())


def chain_rows(out: Path):
    scripts = [chain_script(c, 30 - 4 * c, prompt_words=3 + 2 * c) for c in range(3)]
    model, tokenizer = scripted_model(scripts, "llama", planted=(2, 1), anchors=(5, 17))
    loaded = loading.prepare(model, tokenizer, "scripted")
    data = chain_data(out / "chains.json", scripts)
    sequences = [tokenizer(" ".join(prompt + generated)).input_ids for prompt, generated in scripts]
    texts = [tokenizer.decode(s[1:], skip_special_tokens=False, clean_up_tokenization_spaces=False) for s in sequences]
    thought_anchors = [references.thought_anchors_kurtosis(model, tokenizer, text) for text in texts]
    a2r = [references.zhang_a2r(model, tokenizer, s) for s in sequences]

    def run(name, **options):
        result = headscope.detect("chain", loaded=loaded, check=False, data=data, out=str(out / name), quiet=True,
                                  plots=False, think_start="<think>", think_end="</think>", max_new_tokens=200,
                                  scorer="receiver,reasoning_focus", **options)
        return {scorer: r.samples for scorer, r in result.by_scorer.items()}

    default = run("default")
    earlier = run("earlier", receiver_proximity=1, receiver_reduce="sum", receiver_sentences="tokens",
                  focus_include_marker=True)
    return [("receiver", "Thought Anchors", "default", agreement(default["receiver"], thought_anchors)),
            ("receiver", "Thought Anchors", "--receiver-proximity 1 --receiver-reduce sum --receiver-sentences tokens",
             agreement(earlier["receiver"], thought_anchors)),
            ("reasoning_focus", "Zhang a2r", "default", agreement(default["reasoning_focus"], a2r)),
            ("reasoning_focus", "Zhang a2r", "--focus-include-marker", agreement(earlier["reasoning_focus"], a2r))]


def word_model(path: Path):
    tokenizer = word_tokenizer(WORDS + ["book", "based", "on", "content", "question", "answer", "context"])
    model = tiny_model("llama", vocab_size=len(tokenizer), num_layers=3, num_heads=4, seed=5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def query_rows(out: Path, model_dir: str):
    records = query_records(["gold ."])
    (out / "query.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    loaded = headscope.load(model_dir)

    def run(name, **options):
        return headscope.detect("query", loaded=loaded, out=str(out / name), quiet=True, save_prompts=True,
                                data=str(out / "query.jsonl"), batch_size=2, **options).samples

    default, linear = run("default"), run("linear", query_span="question", query_outlier_mask=False)
    expected = []
    for row in default:
        ids = loaded.tokenizer(row["prompt"]).input_ids
        start, end = row["span"]
        null_ids = ids[:start] + row["null_question_ids"] + ids[end:]
        inclusive = lambda span: (span[0], span[1] - 1)  # noqa: E731
        expected.append(references.qrhead_detection_score(
            loaded.model, ids, inclusive(row["qrhead_span"]), null_ids, inclusive(row["null_qrhead_span"]),
            [inclusive(d) for d in row["documents"]], row["gold"]))
    return [("query", "QRHead detection", "default", agreement(default, expected)),
            ("query", "QRHead detection", "--query-span question --no-query-outlier-mask",
             agreement(linear, expected))]


def retrieval_rows(out: Path, model_dir: str):
    haystack = out / "haystack"
    haystack.mkdir()
    (haystack / "a.txt").write_text(" ".join(["the red fish of the blue river is gold .",
                                              "the green bird is the key of the tree ."] * 40))
    answer = " ".join(WORDS[(7 * i) % 12] for i in range(30))
    (out / "needles.jsonl").write_text(json.dumps({"needle": f"the code of the stone is {answer} .",
                                                   "question": "what is the code of the stone ?",
                                                   "real_needle": answer}))
    loaded = headscope.load(model_dir)
    result = headscope.detect("retrieval", loaded=loaded, out=str(out / "retrieval"), quiet=True, save_prompts=True,
                              haystack=str(haystack), needles=str(out / "needles.jsonl"), context_lengths=[260],
                              depths=[0, 50, 100], success_threshold=-1, max_new_tokens=34, stop_at_newline=False,
                              scorer="retrieval,r2")
    eos = loaded.tokenizer.eos_token_id
    retrieval, r2 = [], []
    for row in result.samples:
        ids = loaded.tokenizer(row["prompt"]).input_ids
        retrieval.append(references.retrieval_head_score(loaded.model, ids, row["span"], 34, eos))
        r2.append(references.headkv_r2_score(loaded.model, ids, row["span"], row["answer_tokens"], eos))
    return [("retrieval", "Retrieval_Head", "default", agreement(result.by_scorer["retrieval"].samples, retrieval)),
            ("r2", "HeadKV r2", "default", agreement(result.by_scorer["r2"].samples, r2))]


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        model_dir = word_model(out / "toy")
        rows = chain_rows(out) + query_rows(out, model_dir) + retrieval_rows(out, model_dir)
    print("| scorer | reference | options | max abs diff | Spearman of head means |")
    print("|---|---|---|---|---|")
    for scorer, reference, options, (difference, rho) in rows:
        print(f"| `{scorer}` | {reference} | {options} | {difference:.1e} | {rho:.3f} |")


if __name__ == "__main__":
    main()
