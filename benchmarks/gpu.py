"""Long-context detection on one GPU: a random-weight model with Llama-3-8B's shape (bfloat16, GQA).

    python benchmarks/gpu.py                       # 8K, 32K, 64K, 128K tokens; fits one 8-minute call on an H100
    python benchmarks/gpu.py --lengths 8192 --new-tokens 16
    python benchmarks/gpu.py --tiny                # a CPU smoke test of the script itself

For each context length: plain `model.generate` (SDPA, greedy, the same number of new tokens) and headscope's
detection (recorder + retrieval and reasoning scorers) on the same prompt, each after a warm-up; prints
seconds per sample, peak GPU memory and the ratio to plain generation.
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from headscope.attention import recorder
from headscope.detection.decode import StopRule, greedy_decode
from headscope.scorers import PromptBatch, ReasoningScorer, RetrievalScorer

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000, max_position_embeddings=131072)


def build(shape, device, dtype):
    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def measure(function, device):
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    function()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return seconds, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="8192,32768,65536,131072")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    model = build(TINY if args.tiny else LLAMA3_8B, device, torch.float32 if device == "cpu" else torch.bfloat16)
    config = model.config
    weights = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else float("nan")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"{name}; torch {torch.__version__}; {config.num_hidden_layers} layers x {config.num_attention_heads} "
          f"heads ({config.num_key_value_heads} KV), hidden {config.hidden_size}, {model.dtype}; "
          f"weights {weights:.1f} GiB; {args.new_tokens} new tokens")
    print(f"{'tokens':>7} {'generate s':>11} {'peak GiB':>9} {'headscope s':>12} {'peak GiB':>9} {'ratio':>6}")
    torch.manual_seed(0)
    for tokens in map(int, args.lengths.split(",")):
        prompt = torch.randint(3, config.vocab_size, (1, tokens), device=device)

        def generate():
            model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

        def detect():
            scorers = [RetrievalScorer(), ReasoningScorer()]
            span = (torch.tensor([tokens // 2], device=device), torch.tensor([tokens // 2 + 8], device=device))
            for scorer in scorers:
                scorer.begin(PromptBatch(prompt, tokens, *span), config.num_hidden_layers, config.num_attention_heads)
            greedy_decode(model, prompt, None, scorers, args.new_tokens, StopRule(set(), set()))

        with torch.no_grad():
            model.set_attn_implementation("sdpa")
            measure(lambda: model.generate(prompt[:, :256], max_new_tokens=2, do_sample=False), device)  # warm-up
            generate_s, generate_gib = measure(generate, device)
            recorder.install(model)
            detect_s, detect_gib = measure(detect, device)
        print(f"{tokens:>7} {generate_s:>11.2f} {generate_gib:>9.1f} {detect_s:>12.2f} {detect_gib:>9.1f} "
              f"{detect_s / generate_s:>5.2f}x", flush=True)


if __name__ == "__main__":
    main()
