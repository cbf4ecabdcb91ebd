"""How many CPU threads make `headscope detect` fastest, on this machine as it is now.

Runs the README's first command (`headscope detect retrieval`: the organism's 100 needle prompts) in a fresh
process per setting, settings interleaved so that a change in the machine's load hits them alike, and prints
the wall time of each with the load average (other work on the machine) seen at its start.

    python benchmarks/threads.py                     # --threads 1, torch's default (every core), and the default
    python benchmarks/threads.py --threads 1,2,4 --repeats 3 -- --context-lengths 300 --depths 0,50
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time


def run_once(threads: str, extra: list[str]) -> float:
    """Seconds of one detect in a fresh process; `threads` "auto" leaves the flag out (headscope's default)."""
    flag = [] if threads == "auto" else ["--threads", threads]
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "headscope", "detect", "retrieval", "--out", out, "--quiet", "--no-plots",
                   *flag, *extra]
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cores = os.cpu_count() or 1
    parser.add_argument("--threads", default=f"1,{cores},auto", help=f"settings (default 1,{cores},auto)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("extra", nargs="*", help="more detect flags, after --")
    args = parser.parse_args()
    settings = args.threads.split(",")
    times: dict[str, list[float]] = {setting: [] for setting in settings}
    loads = []
    for _ in range(args.repeats):
        for setting in settings:
            loads.append(os.getloadavg()[0])
            times[setting].append(run_once(setting, args.extra))
            print(f"  --threads {setting}: {times[setting][-1]:.1f} s (load {loads[-1]:.1f})", file=sys.stderr)
    print(f"{cores} cores, load average {min(loads):.1f}-{max(loads):.1f} during the runs")
    print(f"{'threads':>8} {'best s':>8} {'median s':>9}")
    for setting, seconds in times.items():
        print(f"{setting:>8} {min(seconds):>8.1f} {statistics.median(seconds):>9.1f}")


if __name__ == "__main__":
    main()
