"""Long reasoning budgets: what a decoding step keeps does not grow with the steps.

    python benchmarks/long_decode.py                    # organism shape and the 32 x 32 model, 4,096 new tokens
    python benchmarks/long_decode.py --new-tokens 1024  # quicker

Random weights, no stop (the budget is the only stop), the reasoning scorer attached (top-5 of every row).
Every 512 steps it prints the process's resident memory above the start of decoding, next to the KV cache's
own size at that point, for headscope and, as the baseline in the same process, for plain `generate` (a
logits processor reads the memory): headscope keeps O(layers x heads x k) per step, so what it adds beyond
`generate` should stay flat, and the time per step should grow only with the attention over a longer cache.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from headscope.attention import recorder
from headscope.detection.decode import StopRule, greedy_decode
from headscope.scorers import PromptBatch, ReasoningScorer, Scorer
from headscope.families.toy import tiny_model

SHAPES = {"organism": dict(num_layers=6, num_heads=8, hidden=128, num_key_value_heads=8),
          "32x32": dict(num_layers=32, num_heads=32, hidden=256, num_key_value_heads=8)}


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def report(steps: int, kv_bytes: float, start_rss: float, seconds: float, label: str = "") -> None:
    kv, grown = kv_bytes / 2**20, rss_mib() - start_rss
    print(f"  step {steps:5d}: memory +{grown:7.1f} MiB (KV cache {kv:6.1f} MiB, beyond it {grown - kv:+7.1f}), "
          f"{1000 * seconds:6.2f} ms/step{label}", flush=True)


class GenerateProbe:
    """A logits processor that prints the same line for plain `generate` (the baseline)."""

    def __init__(self, kv_bytes_per_token: int, prompt_tokens: int, every: int = 512):
        self.kv, self.prompt, self.every, self.steps = kv_bytes_per_token, prompt_tokens, every, 0
        self.start_rss, self.last = rss_mib(), time.perf_counter()

    def __call__(self, input_ids, scores):
        self.steps += 1
        if self.steps % self.every == 0:
            now = time.perf_counter()
            report(self.steps, self.kv * (self.prompt + self.steps), self.start_rss, (now - self.last) / self.every,
                   "  [generate]")
            self.last = now
        return scores


class Probe(Scorer):
    """Prints memory and time every `every` steps."""

    def __init__(self, kv_bytes_per_token: int, every: int = 512):
        self.kv, self.every, self.steps = kv_bytes_per_token, every, 0

    def begin(self, batch, num_layers, num_heads):
        super().begin(batch, num_layers, num_heads)
        self.start_rss, self.start, self.last = rss_mib(), time.perf_counter(), time.perf_counter()

    def step(self, view):
        self.steps += 1
        if self.steps % self.every == 0:
            now = time.perf_counter()
            report(self.steps, self.kv * (self.batch.prompt_len + self.steps), self.start_rss,
                   (now - self.last) / self.every)
            self.last = now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=4096)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--shapes", default="organism,32x32")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.prompt_tokens}-token prompt, "
          f"{args.new_tokens} new tokens, no stop")
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        model = tiny_model("llama", vocab_size=1000, max_positions=args.prompt_tokens + args.new_tokens + 8,
                           **shape)
        recorder.install(model)
        head_dim = shape["hidden"] // shape["num_heads"]
        kv_per_token = shape["num_layers"] * 2 * shape["num_key_value_heads"] * head_dim * 4  # float32 K and V
        prompt = torch.randint(4, 1000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
        span = torch.tensor([10]), torch.tensor([40])
        scorers = [ReasoningScorer(), Probe(kv_per_token)]
        for scorer in scorers:
            scorer.begin(PromptBatch(prompt, args.prompt_tokens, *span), shape["num_layers"], shape["num_heads"])
        print(f"{name}: {shape['num_layers']} layers x {shape['num_heads']} heads, hidden {shape['hidden']}")
        from transformers import LogitsProcessorList

        baseline = tiny_model("llama", vocab_size=1000, max_positions=args.prompt_tokens + args.new_tokens + 8,
                              **shape)
        started = time.perf_counter()
        with torch.no_grad():
            baseline.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                              logits_processor=LogitsProcessorList([GenerateProbe(kv_per_token, args.prompt_tokens)]))
        print(f"  generate: {args.new_tokens} tokens in {time.perf_counter() - started:.1f} s")
        del baseline
        started = time.perf_counter()
        tokens = greedy_decode(model, prompt, None, scorers, args.new_tokens, StopRule(set(), set()))
        print(f"  headscope: {len(tokens[0])} tokens in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
