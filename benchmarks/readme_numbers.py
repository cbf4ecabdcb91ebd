"""The bundled organisms' numbers the README and the guides in docs/ print, recomputed by their own commands,
and checked against their text.

Each claim below runs (or reuses) the detect / ablate / kv runs it needs in a work folder and writes the passage
as its file (README.md or a guide) prints it; the passage must appear in that file (white space aside, as prose
wraps it). So a change of default cannot leave a stale table: tests/test_readme_numbers.py runs the cheap claims
in the default suite (marker `readme`) and the expensive ones under the marker `slow`.

    python benchmarks/readme_numbers.py                  # the cheap claims (about a minute on 2 cores)
    python benchmarks/readme_numbers.py --slow           # and ablation and kv (10 CPU minutes more)
    python benchmarks/readme_numbers.py --work runs      # keep the runs: a second call reuses them
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--quiet", "--no-plots", "--no-check"]  # what a run shows and checks, never what it measures
NEEDLE_GRID = ["--context-lengths", "300,700,1200", "--num-depths", "3"]  # the ablation and kv sections' grid


def headscope(*argv: str) -> None:
    """One headscope command, in this process, its console output swallowed (a finished run's "already complete"
    note too); a failure stops the script with what the command said."""
    from headscope.cli.commands import main

    said = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(said):
        code = main(list(argv))
    if code != 0:
        raise SystemExit(f"headscope {' '.join(argv)}: exit {code}: {said.getvalue().strip()}")


def detect(work: Path, name: str, task: str, *flags: str) -> Path:
    """`headscope detect TASK FLAGS` into work/name (a finished run there is read back, not run again)."""
    out = work / name
    headscope("detect", task, "--out", str(out), *FAST, *flags)
    return out


def summary(folder: Path, label: str) -> dict:
    return json.loads((folder / f"organism_{label}_summary.json").read_text())


def top(summary_: dict, k: int, form: str) -> str:
    """The top-K heads as the README lists them: "1-1 (0.93), 1-4 (0.91)" (form "{key} ({mean:.2f})")."""
    from headscope.runs.outputs import ranked

    return ", ".join(form.format(key=key, mean=stats["mean"]) for key, stats in ranked(summary_)[:k])


# ------------------------------------------------------------------------------------------ the claims

def retrieval_run(work: Path) -> Path:
    """The README's first command with r2 beside it (one generation scores both: the retrieval files are those of
    `headscope detect retrieval`)."""
    return detect(work, "both", "retrieval", "--scorer", "retrieval,r2")


def first_command_table(work: Path) -> str:
    from headscope.runs.outputs import format_table

    return "\n".join(format_table(summary(retrieval_run(work), "retrieval"), 9).splitlines())


def retrieval_heads_in_results(work: Path) -> str:
    """The README's results table: the retrieval heads of layer 1 against every other head."""
    means = {key: stats["mean"] for key, stats in summary(retrieval_run(work), "retrieval").items()}
    layer_1 = [mean for key, mean in means.items() if key.startswith("1-")]
    others = [mean for key, mean in means.items() if not key.startswith("1-")]
    return (f"the {'eight' if len(layer_1) == 8 else len(layer_1)} heads of layer 1 score {min(layer_1):.2f}–"
            f"{max(layer_1):.2f}, every other head ≤ {max(others):.3f}")


def top5_table(work: Path) -> list[str]:
    """The rows of the "On the organism" table (the pattern rows beside them come from one pattern run)."""
    both, query = retrieval_run(work), detect(work, "query", "query")
    pattern = detect(work, "pattern", "pattern", "--scorer", "induction,previous_token")
    row = "{key} ({mean:.2f})"
    return [f"| retrieval | {top(summary(both, 'retrieval'), 5, row)} |\n"
            f"| r2 (standard needles, same pass; HeadKV's steps) | {top(summary(both, 'retrieval_r2'), 5, row)} |\n"
            f"| induction | {top(summary(pattern, 'pattern_induction'), 5, row)} |\n"
            f"| previous_token | {top(summary(pattern, 'pattern_previous_token'), 5, row)} |",
            f"| query (QRHead) | {top(summary(query, 'query'), 5, row)} |"]


def query_against_retrieval(work: Path) -> str:
    from headscope.heads.analysis import compare
    from headscope.heads import HeadScores
    from headscope.runs.outputs import ranked

    query = summary(detect(work, "query", "query"), "query")
    retrieval = summary(retrieval_run(work), "retrieval")
    leading = next(i for i, (key, _) in enumerate(ranked(query) + [("end-", None)]) if not key.startswith("1-"))
    result = compare(HeadScores.from_summary(query), HeadScores.from_summary(retrieval), [8])
    return (f"The QRHead score puts {leading} layer-1 heads in its top {leading} (top-8 overlap with retrieval "
            f"{result['per_k'][0]['overlap']}/8, Spearman {result['spearman']:.2f} over all {result['num_heads']} "
            "heads")


def comparing_the_sets(work: Path) -> str:
    """The "Comparing the sets" table: `headscope compare` of retrieval with induction and with r2, K = 4, 8, 16."""
    from headscope.heads.analysis import compare
    from headscope.heads import HeadScores

    both = retrieval_run(work)
    pattern = detect(work, "pattern", "pattern", "--scorer", "induction,previous_token")
    retrieval = summary(both, "retrieval")
    cells = []
    for other, first_label in ((summary(pattern, "pattern_induction"), "Jaccard "), (summary(both, "retrieval_r2"), "")):
        result = compare(HeadScores.from_summary(retrieval), HeadScores.from_summary(other), [4, 8, 16])
        per_k = [f"top-{entry['k']} {'overlap ' if index == 0 else ''}{entry['overlap']} "
                 f"({first_label if index == 0 else ''}{entry['jaccard']:.2f})"
                 for index, entry in enumerate(result["per_k"])]
        cells.append(f"{', '.join(per_k)}; Spearman {result['spearman']:.2f}")
    return f"| {cells[0]} | {cells[1]} |"


def induction_in_results(work: Path) -> str:
    """The README's results table: `headscope compare` of retrieval with induction at K = 8."""
    from headscope.heads import HeadScores
    from headscope.heads.analysis import compare

    pattern = detect(work, "pattern", "pattern", "--scorer", "induction,previous_token")
    result = compare(HeadScores.from_summary(summary(retrieval_run(work), "retrieval")),
                     HeadScores.from_summary(summary(pattern, "pattern_induction")), [8])
    top8 = result["per_k"][0]
    return (f"retrieval vs induction: top-8 overlap {top8['overlap']} (Jaccard {top8['jaccard']:.2f}), Spearman "
            f"{result['spearman']:.2f}")


def reasoning_with_and_without_current(work: Path) -> str:
    published = detect(work, "reasoning", "reasoning")
    sharper = detect(work, "no_current", "reasoning", "--exclude-current-token")
    counts = [json.loads(line)["passed"] for line in (published / "organism_reasoning_samples.jsonl").open()]
    return (f"(`headscope detect reasoning` with and without it, {sum(counts)} passing of {len(counts)}) the "
            f"published score's top 7 are seven of the eight layer-0 heads "
            f"({top(summary(published, 'reasoning'), 7, '{key} {mean:.1f}')}); without the current token, five of "
            f"them fall away and the top 8 are {top(summary(sharper, 'reasoning'), 8, '{key} {mean:.1f}')}")


def ablation_auto(work: Path) -> str:
    from headscope.experiments.ablation import format_report

    out = work / "ablate_auto"
    heads = retrieval_run(work) / "organism_retrieval_heads.json"
    headscope("ablate", "retrieval", "--scores", str(heads), "--top", "auto", "--repeats", "6", "--out", str(out),
              *NEEDLE_GRID, *FAST)
    report = json.loads((out / "organism_retrieval_ablation.json").read_text())
    return "\n".join(format_report(report).splitlines()[:4])


def ablation_sweep(work: Path) -> str:
    out = work / "sweep"
    heads = retrieval_run(work) / "organism_retrieval_heads.json"
    headscope("ablate", "retrieval", "--scores", str(heads), "--top", "1,2,4,8,16", "--repeats", "3", "--out",
              str(out), *NEEDLE_GRID, *FAST)
    sweep = json.loads((out / "organism_retrieval_ablation.json").read_text())["sweep"]
    tops = " | ".join(f"{point['top']['success_rate']:.3f}" for point in sweep)
    randoms = " | ".join(f"{point['random']['success_rate']:.3f} ± {point['random']['success_rate_std']:.3f}"
                         for point in sweep)
    return (f"| top-K success | {tops} |\n"
            f"| random-K success (mean ± std, 3 draws) | {randoms} |")


def kv_table(work: Path) -> str:
    from headscope.experiments.kv_output import format_table

    out = work / "kv"
    heads = retrieval_run(work) / "organism_retrieval_heads.json"
    common = ["--sink", "4", "--recent", "64", "--out", str(out), *NEEDLE_GRID, *FAST]
    headscope("kv", "retrieval", "--scores", str(heads), "--budgets", "0,2,4,8,16", *common)
    headscope("kv", "retrieval", "--scores", str(heads), "--policy", "headkv,snapkv", "--budgets", "8,16,32,64,128",
              *common)
    return format_table(json.loads((out / "organism_retrieval_kv.json").read_text()))


def thinker_run(work: Path) -> Path:
    """The reasoning-models guide's worked example: the three reasoning scores on the bundled thinker."""
    return detect(work, "thinker", "reasoning", "--model", "thinker", "--scorer", "reasoning,receiver,reasoning_focus")


def thinker_in_results(work: Path) -> str:
    """The README's results table: the thinker's answers, how many chains `receiver` scores, and how often its
    top-5 heads read a planted anchor most (thinker.anchor_reading, against the planted anchors' chance rate)."""
    from headscope.organism.thinker import anchor_reading
    from headscope.runs.outputs import ranked

    folder = thinker_run(work)
    rows = [json.loads(line) for line in (folder / "thinker_reasoning_receiver_samples.jsonl").open()]
    heads = [key for key, _ in ranked(json.loads((folder / "thinker_reasoning_receiver_summary.json").read_text()))[:5]]
    reading = anchor_reading(rows, heads)
    scored = sum("most_received" in row for row in rows)
    return (f"on the [thinker](docs/thinker.md) ({sum(row['passed'] for row in rows)}/{len(rows)} right), "
            f"`receiver` scores {scored}/{len(rows)} chains and for its top 5 heads the most-read sentence is a "
            f"planted anchor in {reading['head_rate']:.0%} of head-samples (chance {reading['chance']:.0%})")


def thinker_ablation(work: Path) -> list[str]:
    """The thinker guide's two ablation tables: the top-8 receiver heads, then the top-8 reasoning_focus heads,
    each against 8 random ones (3 draws)."""
    from headscope.experiments.ablation import format_report

    tables = []
    for scores in ("receiver", "reasoning_focus"):
        out = work / f"thinker_ablate_{scores}"
        headscope("ablate", "reasoning", "--model", "thinker", "--scores",
                  str(thinker_run(work) / f"thinker_reasoning_{scores}_heads.json"), "--top", "8", "--repeats", "3",
                  "--out", str(out), *FAST)
        report = json.loads((out / "thinker_reasoning_ablation.json").read_text())
        tables.append("\n".join(format_report(report).splitlines()[:4]))
    return tables


@dataclass(frozen=True)
class Claim:
    name: str
    produce: Callable[[Path], str | list[str]]  # the passage, or passages that each appear (not together)
    doc: str  # the file that prints it, from the repository's root
    slow: bool = False

    def passages(self, work: Path) -> list[str]:
        produced = self.produce(work)
        return [produced] if isinstance(produced, str) else produced


    @property
    def path(self) -> Path:
        return ROOT / self.doc


CLAIMS = [
    Claim("the first command's table", first_command_table, "README.md"),
    Claim("the results table: retrieval heads", retrieval_heads_in_results, "README.md"),
    Claim("the results table: induction", induction_in_results, "README.md"),
    Claim("the top-5 heads on the organism (retrieval, r2, induction, previous_token, query)", top5_table,
          "docs/scorers.md"),
    Claim("query against retrieval", query_against_retrieval, "docs/scorers.md"),
    Claim("comparing the sets", comparing_the_sets, "docs/scorers.md"),
    Claim("reasoning with and without --exclude-current-token", reasoning_with_and_without_current, "docs/method.md"),
    Claim("the results table: the thinker", thinker_in_results, "README.md"),
    Claim("ablation, --top auto", ablation_auto, "docs/experiments.md", slow=True),
    Claim("ablation sweep", ablation_sweep, "docs/experiments.md", slow=True),
    Claim("kv on the organism", kv_table, "docs/kv.md", slow=True),
    Claim("ablation on the thinker", thinker_ablation, "docs/thinker.md", slow=True),
]


def printed_in(passage: str, text: str) -> bool:
    """Whether the text holds the passage, white space aside (prose wraps lines anywhere)."""
    return " ".join(passage.split()) in " ".join(text.split())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slow", action="store_true", help="the ablation and kv claims too (minutes)")
    parser.add_argument("--work", help="folder of the runs (default: a temporary one); a second call reuses them")
    args = parser.parse_args()
    stale = 0
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(args.work or temporary)
        for claim in (claim for claim in CLAIMS if args.slow or not claim.slow):
            for passage in claim.passages(work):
                fresh = printed_in(passage, claim.path.read_text())
                stale += not fresh
                print(f"{'ok' if fresh else 'STALE'}: {claim.name} ({claim.doc})\n{passage}\n")
    print(f"{stale} stale passage(s): replace them in the files named with the text above" if stale else
          "every passage is where it belongs")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
