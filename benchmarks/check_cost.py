"""What `headscope check` costs on a 32-layer x 32-head model (random weights, CPU, float32).

    python benchmarks/check_cost.py                  # full attention, and a 4,096-token sliding window
    python benchmarks/check_cost.py --hidden 1024    # the model's width (head size = hidden / 32)

It runs the CLI's check -- rows, prefill, both default tasks' scorers on their first prompts, tokens, ablation --
and prints the seconds each part takes. A window makes the check's prompt longer than the window
(window + 40 tokens), which is what costs: the organism's check takes a few seconds.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import headscope  # noqa: E402
from headscope.detection import check, engine  # noqa: E402
from headscope.detection.loading import default_model_path  # noqa: E402
from headscope.tasks import TASKS  # noqa: E402
from headscope.families.toy import tiny_model  # noqa: E402


def timed(label: str, work):
    started = time.time()
    result = work()
    print(f"  {label:<34} {time.time() - started:7.1f} s", flush=True)
    return result


def measure(family: str, window: int | None, hidden: int, steps: int) -> None:
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    shape = dict(vocab_size=len(tokenizer), num_layers=32, num_heads=32, hidden=hidden, max_positions=8192)
    if window:
        shape["sliding_window"] = window
    model = tiny_model(family, **shape)
    loaded = headscope.prepare(model, tokenizer, path=f"random-32x32-{family}")
    print(f"{family}: 32 layers x 32 heads, hidden {hidden}, window {window or 'none'}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, {torch.get_num_threads()} threads")
    started = time.time()
    cases = [engine.scorer_case(engine.start_run(task, TASKS[task].options(model=loaded.path), loaded,
                                                 check_it=False)) for task in ("retrieval", "reasoning")]
    input_ids, mask = (t.to(loaded.device) for t in check.check_prompts(loaded, 256, steps))
    tokens, recorder, routers = timed(f"rows + prefill ({input_ids.shape[1]}-token prompt x 2)",
                                      lambda: check.decode_against_eager(loaded, input_ids, mask, steps))
    for case in cases:
        timed(f"scorers {case.label} ({case.batch.input_ids.shape[1]} tokens)",
              lambda case=case: check.scorer_figures(loaded, case, steps))
    timed("tokens (eager generate)", lambda: check.token_figure(model, input_ids, mask, tokens, routers))
    timed("ablation", lambda: check.ablation_figure(loaded, input_ids))
    print(f"  {'total':<34} {time.time() - started:7.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    measure("llama", None, args.hidden, args.steps)
    measure("mistral", 4096, args.hidden, args.steps)


if __name__ == "__main__":
    main()
