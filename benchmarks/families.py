"""The family sweep over every causal-LM type transformers ships, and its table, docs/families.md.

    python benchmarks/families.py                      # every type of MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    python benchmarks/families.py --types llama,mamba  # some (the table keeps the other rows it had)

Each type runs in its own process (`python -m headscope.families.sweep TYPE`, see headscope/families/sweep.py) with a time
limit, so a crash or a hang of one type is that type's row, not the end of the sweep. Rows are kept in
headscope/data/families.json as they finish, with the transformers release they were measured on (a re-run with
--types redoes those rows only, on the same release); docs/families.md is written from it, with the counts per
class. Upgrading transformers: run the whole sweep on the new release (see docs/development.md, *Upgrading dependencies*).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from headscope.families.sweep import CRASH, Outcome, causal_lm_class, example_checkpoint  # noqa: E402
from headscope.detection.sweep_table import RESULTS, Sweep, load, save, write_table  # noqa: E402


def run_type(model_type: str, limit: int) -> dict:
    started = time.time()
    try:
        done = subprocess.run([sys.executable, "-m", "headscope.families.sweep", model_type], cwd=ROOT, capture_output=True,
                              text=True, timeout=limit)
        line = next((line for line in reversed(done.stdout.splitlines()) if line.startswith("{")), None)
        row = json.loads(line) if line else vars(Outcome(model_type, causal_lm_class(model_type),
                                                          example_checkpoint(model_type), CRASH,
                                                          (done.stderr.strip().splitlines() or ["no output"])[-1]))
    except subprocess.TimeoutExpired:
        row = vars(Outcome(model_type, causal_lm_class(model_type), example_checkpoint(model_type), CRASH,
                           f"the sweep of this type ran past {limit} s"))
    row["seconds"] = round(time.time() - started, 1)
    print(f"{model_type:<28} {row['verdict']:<13} {row['seconds']:>6.1f} s  {row['reason'][:110]}", flush=True)
    return row


def main() -> None:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", help="comma-separated model types (default: every causal-LM type)")
    parser.add_argument("--jobs", type=int, default=1, help="types swept at once (default 1)")
    parser.add_argument("--limit", type=int, default=600, help="seconds per type (default 600)")
    args = parser.parse_args()
    types = args.types.split(",") if args.types else list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    sweep = Sweep(transformers.__version__, {})
    if args.types:
        sweep = load()
        if sweep.transformers != transformers.__version__:
            sys.exit(f"{RESULTS} is of transformers {sweep.transformers}, this is {transformers.__version__}: a "
                     "partial sweep would mix two releases in one table; run the whole sweep (no --types)")
    with ThreadPoolExecutor(args.jobs) as pool:
        for row in pool.map(lambda model_type: run_type(model_type, args.limit), types):
            sweep.rows[row["model_type"]] = row
            save(sweep)
    print(f"wrote {write_table(sweep)}")


if __name__ == "__main__":
    main()
