"""`headscope kv --convention kvpress` against kvpress itself, sample for sample, on the bundled organism.

For each retrieval prompt of docs/kv.md's grid (3 context lengths x 3 depths x 5 needles) and each press, the
prompt is split where the task marks its question (kv_curve.context_tokens). kvpress compresses the context with
its press during the context's prefill (`with press(model): model.model(context)`, as its pipeline does), then
feeds the question after it and decodes greedily (its pipeline's `generate_answer`). headscope replays the
same press under kvpress's convention (kv_curve.Planner, as `headscope kv --convention kvpress` builds it) through
the engine's way. Printed per press: samples whose greedy tokens agree, samples whose first answer token equals
the full cache's on each side, and the largest logit difference at the first answer token -- over the prompts
whose context keeps at least SnapKV's window (int(C x (1 - ratio)) >= 64; below it kvpress keeps an arbitrary
part of the window, torch.topk's order among equal scores, and headscope the whole window: counted apart).
A press that raises inside kvpress is reported with its error.

DuoAttentionPress takes the heads file's pattern as `export --to duo` writes it, loaded as the kvpress snippet of
docs/look-compare-export.md loads it (DuoAttentionPress.load_attention_pattern replaced by a reader of the exported folder).

    pip install kvpress==0.5.4
    headscope detect retrieval --out head_scores          # the README's first command
    python benchmarks/kvpress_compare.py head_scores/organism_retrieval_heads.json

kvpress 0.5.4 reads its hook's `past_key_values` and `cache_position` keyword arguments, which transformers 5
renamed and dropped: `transformers5_hook` hands them on (the only change to kvpress's code path).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch


def transformers5_hook(press_class):
    """kvpress 0.5.4's forward hook under transformers 5: `cache` is handed on as `past_key_values`, and
    `cache_position` (the positions this pass fed) is rebuilt from the cache's length."""
    original = press_class.forward_hook

    def forward_hook(self, module, input, kwargs, output):
        kwargs = dict(kwargs)
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        q_len = kwargs["hidden_states"].shape[1]
        length = cache.get_seq_length(module.layer_idx)
        kwargs.setdefault("past_key_values", cache)
        kwargs.setdefault("cache_position", torch.arange(length - q_len, length))
        return original(self, module, input, kwargs, output)

    press_class.forward_hook = forward_hook


def kvpress_tokens(model, press, ids, context, steps):
    """kvpress's pipeline on one prompt: the context under the press, then the question, then greedy steps."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        if press is None:
            model.model(input_ids=ids[:, :context], past_key_values=cache)
        else:
            with press(model):
                model.model(input_ids=ids[:, :context], past_key_values=cache)
        positions = torch.arange(context, ids.shape[1])[None]
        logits = model(input_ids=ids[:, context:], past_key_values=cache, position_ids=positions).logits[0, -1]
        first, tokens = logits, [int(logits.argmax())]
        for step in range(steps - 1):
            logits = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache,
                           position_ids=torch.tensor([[ids.shape[1] + step]])).logits[0, -1]
            tokens.append(int(logits.argmax()))
    return first, tokens


def headscope_tokens(model, policy, ids, context, steps):
    """headscope's engine way under the policy: prompt[:-1] in one pass, then one token at a time."""
    from headscope.attention import kv
    from headscope.attention.caches import fresh_cache

    past, length = fresh_cache(model), ids.shape[1]
    replay = kv.replaying(model, policy, kv.Layout(length, (0,), (context,))) if policy else None
    with torch.no_grad(), (replay if replay else torch.no_grad()):
        model(ids[:, :length - 1], **past)
        token, tokens, first = ids[:, -1:], [], None
        for step in range(steps):
            logits = model(token, position_ids=torch.tensor([[length - 1 + step]]), **past).logits[0, -1]
            first = logits if first is None else first
            tokens.append(int(logits.argmax()))
            token = torch.tensor([[tokens[-1]]])
    return first, tokens


def duo_pattern_folder(heads_file: str, kv_heads: int, sink: int, recent: int) -> Path:
    """`headscope export --to duo --raw`'s folder for the heads file (the scores DuoAttentionPress ranks)."""
    from headscope.heads import exports
    from headscope.heads import HeadScores

    folder = Path(tempfile.mkdtemp()) / "duo"
    exports.write_duo(HeadScores.load(heads_file).duo(kv_heads, raw=True), folder, sink, recent)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("heads", help="the organism's retrieval heads file")
    parser.add_argument("--ratios", default="0.25,0.5,0.75")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--recent", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    import kvpress
    from kvpress import DuoAttentionPress, SnapKVPress, StreamingLLMPress
    from transformers import AutoModelForCausalLM

    from headscope.experiments import kv_curve
    from headscope.detection.engine import all_items, start_run, task_options
    from headscope.heads import HeadScores
    from headscope.organism import CHECKPOINT_DIR

    transformers5_hook(kvpress.presses.base_press.BasePress)
    options = task_options("retrieval", None, context_lengths=[300, 700, 1200], num_depths=3, check=False,
                           out=tempfile.mkdtemp(), quiet=True)
    run = start_run("retrieval", options, None, command="kv", check_it=False)
    items = all_items(run)
    contexts = kv_curve.context_lengths(run, items)
    plain = AutoModelForCausalLM.from_pretrained(CHECKPOINT_DIR, attn_implementation="sdpa").eval()
    kv_heads = plain.config.num_key_value_heads
    folder = duo_pattern_folder(args.heads, kv_heads, args.sink, args.recent)

    def exported_pattern(model):  # docs/look-compare-export.md's snippet: DuoAttentionPress reads `export --to duo`'s folder
        import json
        config = json.loads((folder / "config.json").read_text())
        scores = np.loadtxt(folder / "full_attention_heads.tsv", dtype=float, delimiter="\t")
        return config["sink_size"], config["recent_size"], np.clip(scores, 0, 1)

    DuoAttentionPress.load_attention_pattern = staticmethod(exported_pattern)
    settings = kv_curve.with_convention_defaults(kv_curve.KVSettings(scores=args.heads, convention="kvpress",
                                                                     sink=args.sink, recent=args.recent))
    planner = kv_curve.Planner(settings, HeadScores.load(args.heads), kv_heads, 0)
    full = {sample.id: kvpress_tokens(plain, None, torch.tensor([prompt.input_ids]), contexts[sample.id],
                                      args.steps)[1] for _, sample, prompt in items}
    print(f"{len(items)} prompts; {args.steps} greedy tokens; sink {args.sink}, recent {args.recent}")
    print(f"{'press':<28} {'tokens agree':>12} {'kvpress 1st = full':>18} {'headscope 1st = full':>20} "
          f"{'max |logit diff|':>16}")
    for ratio in [float(r) for r in args.ratios.split(",")]:
        presses = {"StreamingLLMPress": (StreamingLLMPress(compression_ratio=ratio, n_sink=args.sink), "streaming"),
                   "SnapKVPress": (SnapKVPress(compression_ratio=ratio), "snapkv"),
                   "DuoAttentionPress": (DuoAttentionPress(head_compression_ratio=ratio), "duo")}
        for name, (press, policy) in presses.items():
            agree = first_theirs = first_ours = compared = 0
            worst = 0.0
            try:
                for _, sample, prompt in items:
                    ids, context = torch.tensor([prompt.input_ids]), contexts[sample.id]
                    if policy == "snapkv" and int(context * (1 - ratio)) < settings.window:
                        continue  # kvpress keeps part of the window by topk's order among ties
                    theirs = kvpress_tokens(plain, press, ids, context, args.steps)
                    ours = headscope_tokens(run.loaded.model, planner.point(policy, ratio, 0).build(), ids, context,
                                            args.steps)
                    compared += 1
                    agree += theirs[1] == ours[1]
                    first_theirs += theirs[1][0] == full[sample.id][0]
                    first_ours += ours[1][0] == full[sample.id][0]
                    worst = max(worst, float((theirs[0] - ours[0]).abs().max()))
            except Exception as error:  # kvpress's own failure on this model, reported as it is
                print(f"{name + f' {ratio}':<28} kvpress raised: {str(error).splitlines()[0]}")
                continue
            print(f"{name + f' {ratio}':<28} {agree:>9}/{compared} {first_theirs:>15}/{compared} "
                  f"{first_ours:>17}/{compared} {worst:>16.2e}")


if __name__ == "__main__":
    main()
