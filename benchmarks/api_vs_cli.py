"""The Python API against the command line on one grid: `headscope.detect(...)` with no `threads` should take
what `headscope detect` takes (both pick torch's threads from the idle cores, engine.use_threads).

Each run is a fresh process (imports and the model load included), the two interleaved so that a change in the
machine's load hits them alike; prints each one's best and median wall time and their ratio.

    python benchmarks/api_vs_cli.py                                  # the organism, 2 lengths x 3 depths
    python benchmarks/api_vs_cli.py --repeats 3 --context-lengths 500,1000,2000
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

API = ("import headscope\n"
       "headscope.detect('retrieval', context_lengths={lengths}, depths={depths}, out={out!r}, quiet=True, "
       "plots=False, overwrite=True)\n")


def seconds(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def commands(lengths: list[int], depths: list[int], out: str) -> dict[str, list[str]]:
    """The same detection as a command and as an API call."""
    cli = [sys.executable, "-m", "headscope", "detect", "retrieval", "--out", out + "/cli", "--quiet", "--no-plots",
           "--overwrite", "--context-lengths", ",".join(map(str, lengths)), "--depths", ",".join(map(str, depths))]
    api = [sys.executable, "-c", API.format(lengths=lengths, depths=depths, out=out + "/api")]
    return {"cli": cli, "api": api}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context-lengths", default="500,1000")
    parser.add_argument("--depths", default="0,50,100")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    lengths = [int(x) for x in args.context_lengths.split(",")]
    depths = [int(x) for x in args.depths.split(",")]
    times: dict[str, list[float]] = {"cli": [], "api": []}
    with tempfile.TemporaryDirectory() as out:
        runs = commands(lengths, depths, out)
        for _ in range(args.repeats):
            for name, command in runs.items():
                times[name].append(seconds(command))
                print(f"  {name}: {times[name][-1]:.1f} s", file=sys.stderr)
    print(f"organism retrieval, context lengths {lengths}, depths {depths}, {args.repeats} runs each")
    print(f"{'':>4} {'best s':>8} {'median s':>9}")
    for name, values in times.items():
        print(f"{name:>4} {min(values):>8.1f} {statistics.median(values):>9.1f}")
    print(f"api / cli (best): {min(times['api']) / min(times['cli']):.2f}")


if __name__ == "__main__":
    main()
