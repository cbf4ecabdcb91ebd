"""Detection time per sample against plain generation and against the eager per-head loop.

    python benchmarks/speed.py                      # 32 layers x 32 heads, hidden 256, GQA, ~2,500-token prompts
    python benchmarks/speed.py --prompt-tokens 500  # quicker

All three run in this process on the same random-weight model and the same prompts, with the same
token budget (every run writes exactly --new-tokens tokens: no stopping), and print ratios:
  generate  model.generate, greedy, SDPA: what the model costs anyway
  headscope greedy decoding with the recorder and both scorers (retrieval + reasoning)
  eager     the original scripts' way: eager attention with output_attentions at every step and a
            Python loop over layers and heads with a .item() per value (its prefill keeps no attention
            maps, or it would not fit in memory; that is what benchmarks/memory.py measures)
"""
from __future__ import annotations

import argparse
import time

import torch

from headscope.attention import recorder
from headscope.detection.decode import StopRule, greedy_decode
from headscope.scorers import PromptBatch, ReasoningScorer, RetrievalScorer
from headscope.families.toy import tiny_model


def build(attn):
    return tiny_model("llama", attn=attn, vocab_size=1000, num_layers=32, num_heads=32, hidden=256,
                      num_key_value_heads=8, max_positions=8192)


def run_generate(model, prompt, new_tokens):
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


def run_headscope(model, prompt, new_tokens):
    span = torch.tensor([prompt.shape[1] // 2]), torch.tensor([prompt.shape[1] // 2 + 8])
    scorers = [RetrievalScorer(), ReasoningScorer()]
    for scorer in scorers:
        scorer.begin(PromptBatch(prompt, prompt.shape[1], *span), 32, 32)
    greedy_decode(model, prompt, None, scorers, new_tokens, StopRule(set(), set()))


def run_eager_loop(model, prompt, new_tokens):
    """The per-head loop of the original scripts (eager attention over the cache, one row at a time)."""
    ns, ne = prompt.shape[1] // 2, prompt.shape[1] // 2 + 8
    scores = [[0.0] * 32 for _ in range(32)]
    ids = prompt[0].tolist()
    with torch.no_grad():
        # The whole prompt's attention maps would not fit (32 x 32 x 2,500^2 floats = 25.6 GB): the prefill
        # keeps none, and the last prompt token is fed as the first recorded step, as headscope does.
        out = model(prompt[:, :-1], use_cache=True)
        out = model(prompt[:, -1:], past_key_values=out.past_key_values, use_cache=True, output_attentions=True)
        for _ in range(new_tokens):
            token = int(out.logits[0, -1].argmax())
            for layer in range(32):
                for head in range(32):
                    row = out.attentions[layer][0, head, -1]
                    values, positions = row.topk(5)
                    if ns <= positions[0].item() < ne and ids[positions[0].item()] == token:
                        scores[layer][head] += 1 / (ne - ns)
                    for value, position in zip(values, positions):
                        if position.item() >= len(prompt[0]):
                            scores[layer][head] += value.item()
            ids.append(token)
            out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True,
                        output_attentions=True)


def timed(function, *args, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function(*args)
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=2500)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs (the eager loop runs once)")
    parser.add_argument("--skip-eager", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    prompt = torch.randint(4, 1000, (1, args.prompt_tokens))
    model = build("sdpa")
    with torch.no_grad():
        run_generate(model, prompt[:, :64], 2)  # warm-up
        generate_s = timed(run_generate, model, prompt, args.new_tokens, repeats=args.repeats)
        recorder.install(model)
        headscope_s = timed(run_headscope, model, prompt, args.new_tokens, repeats=args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; 32 layers x 32 heads (8 KV heads), "
          f"hidden 256; {args.prompt_tokens} prompt tokens, {args.new_tokens} new tokens")
    print(f"generate   {generate_s:8.2f} s/sample")
    print(f"headscope  {headscope_s:8.2f} s/sample   {headscope_s / generate_s:5.2f}x generate")
    if not args.skip_eager:
        eager_s = timed(run_eager_loop, build("eager"), prompt, args.new_tokens, repeats=1)
        print(f"eager loop {eager_s:8.2f} s/sample   {eager_s / generate_s:5.2f}x generate, "
              f"headscope is {eager_s / headscope_s:.1f}x faster")


if __name__ == "__main__":
    main()
