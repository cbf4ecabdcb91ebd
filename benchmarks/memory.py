"""Peak memory against context length, on CPU: headscope's recorder against the eager way.

    python benchmarks/memory.py                       # the 32 x 32 small-width model, 1K..16K tokens
    python benchmarks/memory.py --model organism      # the bundled organism

Each point runs in a fresh process (peak RSS is per process) and decodes 4 tokens:
  headscope  prefill on SDPA, recorded single-query steps, both scores
  eager      the original reasoning script's way: eager attention with output_attentions=True over
             the whole prompt (every layer's T x T probabilities), then the same decoding steps
The eager way is skipped where its attention maps alone would pass --eager-limit-gb; its
predicted size is printed instead. Ratios are against the smallest context of the same method.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

from headscope.attention import recorder
from headscope.detection.decode import StopRule, greedy_decode
from headscope.scorers import PromptBatch, ReasoningScorer, RetrievalScorer


def build(name: str, attn: str):
    if name == "organism":
        from transformers import AutoModelForCausalLM

        from headscope.organism import CHECKPOINT_DIR

        model = AutoModelForCausalLM.from_pretrained(CHECKPOINT_DIR, attn_implementation=attn, dtype=torch.float32)
        model.config.max_position_embeddings = max(model.config.max_position_embeddings, 32768)
        return model.eval()
    from headscope.families.toy import tiny_model

    return tiny_model("llama", attn=attn, vocab_size=1000, num_layers=32, num_heads=32, hidden=256,
                      num_key_value_heads=8, max_positions=32768)


def one_point(name: str, method: str, tokens: int) -> None:
    """Run in a child process: print the peak resident memory in MiB."""
    torch.manual_seed(0)
    model = build(name, "eager" if method == "eager" else "sdpa")
    vocab = model.config.vocab_size
    prompt = torch.randint(4, vocab, (1, tokens))
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        if method == "eager":
            out = model(prompt, use_cache=True, output_attentions=True)
            for _ in range(4):
                token = out.logits[:, -1:].argmax(-1)
                out = model(token, cache=out.past_key_values, use_cache=True, output_attentions=True)
        else:
            recorder.install(model)
            scorers = [RetrievalScorer(), ReasoningScorer()]
            span = torch.tensor([tokens // 2]), torch.tensor([tokens // 2 + 8])
            for scorer in scorers:
                scorer.begin(PromptBatch(prompt, tokens, *span), model.config.num_hidden_layers,
                             model.config.num_attention_heads)
            greedy_decode(model, prompt, None, scorers, 4, StopRule(set(), set()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": peak / 1024, "above_model_mib": (peak - baseline) / 1024}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", choices=["small", "organism"])
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    parser.add_argument("--eager-limit-gb", type=float, default=6.0)
    parser.add_argument("--point", nargs=2, metavar=("METHOD", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        return one_point(args.model, args.point[0], int(args.point[1]))
    config = build(args.model, "sdpa").config
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    print(f"model: {args.model} ({layers} layers x {heads} heads); peak RSS above the loaded model, MiB")
    print(f"{'tokens':>7} {'headscope':>10} {'ratio':>6} {'eager':>10} {'ratio':>6}")
    first = {}
    for tokens in map(int, args.lengths.split(",")):
        cells = []
        for method in ("headscope", "eager"):
            attention_gb = layers * heads * tokens * tokens * 4 / 2**30
            if method == "eager" and attention_gb > args.eager_limit_gb:
                cells += [f"~{attention_gb * 1024:>8.0f}*", ""]
                continue
            run = subprocess.run([sys.executable, __file__, "--model", args.model, "--point", method, str(tokens)],
                                 capture_output=True, text=True)
            if run.returncode != 0:
                cells += ["failed", ""]
                continue
            used = json.loads(run.stdout.strip().splitlines()[-1])["above_model_mib"]
            first.setdefault(method, (tokens, used))
            base_tokens, base_used = first[method]
            cells += [f"{used:>10.0f}", f"{used / max(base_used, 1):>5.1f}x"]
        print(f"{tokens:>7} {cells[0]:>10} {cells[1]:>6} {cells[2]:>10} {cells[3]:>6}")
    print("* not run: the eager attention maps alone would need this many MiB (layers x heads x T^2 x 4 bytes)")


if __name__ == "__main__":
    main()
