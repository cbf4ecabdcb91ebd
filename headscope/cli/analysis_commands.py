"""`headscope show | compare | plot | export | report`: read score files back, check them, draw them, hand them on."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ..options import parse_ints
from ..validate import LARGEST_SEED, checked, integer, real, refuse_overwriting

MOST_RESAMPLES = 100_000  # resamples x heads floats are held at once: 100,000 x 1,024 heads is 0.8 GB


def add_kv_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-kv-heads", type=integer(1), help="KV heads per layer (GQA); default: read from --model")
    parser.add_argument("--model", help="read num_key_value_heads from this model's config.json "
                                        "(default: the model in the run's manifest, if any)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let that config run its own code (an auto_map); off by default, even for a model "
                             "named by a manifest")


HELP = {
    "show": "ranked table of a heads or summary file",
    "compare": "agreement of two score files: top-K overlap, Spearman",
    "plot": "heatmap (and NIAH grid) PNGs next to a score file",
    "export": "scores in the format of a KV-cache method",
    "report": "one self-contained HTML page per run: heatmap, ranked table, NIAH grid, samples, "
              "ablation/KV cache/rescore/specificity, comparison",
}


def add_show(show) -> None:
    show.add_argument("file", help="NAME_TASK_heads.json or NAME_TASK_summary.json")
    show.add_argument("--top", type=integer(1), default=30, help="rows to print (default 30)")
    show.add_argument("--kv-heads", choices=["max", "mean"], help="aggregate query heads onto their KV head (GQA)")
    add_kv_options(show)
    stability = show.add_argument_group("stability (needs NAME_TASK_samples.jsonl beside the file)")
    stability.add_argument("--bootstrap", type=integer(0, MOST_RESAMPLES), default=0, metavar="N",
                           help="resample the samples N times")
    stability.add_argument("--seed", type=integer(0, LARGEST_SEED), default=0,
                           help="seed of the resampling (default 0)")
    stability.add_argument("--k", type=integer(1),
                           help="the top K whose membership is tested (default 10 or all heads)")
    show.set_defaults(handler=run_show)


def add_compare(compare) -> None:
    compare.add_argument("a", help="a heads or summary file (its scores are the x axis)")
    compare.add_argument("b", help="another heads or summary file of the same model (the y axis)")
    compare.add_argument("--top", type=checked(parse_ints, 1),
                         help="values of K (default 5,10,20,30, those up to the head count)")
    compare.add_argument("--plot", help="scatter plot path (default: A_vs_B.png next to A; a link is written "
                                        "through)")
    compare.add_argument("--no-plot", action="store_true", help="print the table only")
    compare.set_defaults(handler=run_compare)


def add_plot(plot) -> None:
    plot.add_argument("file", help="NAME_TASK_heads.json or NAME_TASK_summary.json")
    plot.add_argument("--top", type=integer(0), default=10, help="label this many best heads (default 10)")
    plot.set_defaults(handler=run_plot)


def add_export(export) -> None:
    export.add_argument("file", help="NAME_TASK_heads.json or NAME_TASK_summary.json")
    export.add_argument("--to", required=True, choices=["topk", "duo", "razor", "headkv"],
                        help="topk: [[layer, head, score], ...]; duo: DuoAttention; razor: RazorAttention; "
                             "headkv: HeadKV budgets")
    export.add_argument("--top", type=integer(1),
                        help="topk, razor: how many heads (default 20, or the heads with a value)")
    export.add_argument("--out", help="output path (duo: a folder); default next to FILE; a link (or /dev/stdout) is "
                                      "written through")
    duo = export.add_argument_group("duo")
    duo.add_argument("--threshold", type=real(), help="1 where the KV head's score >= T")
    duo.add_argument("--sparsity", type=real(0, 1), help="keep the top (1 - S) fraction of KV heads")
    duo.add_argument("--raw", action="store_true", help="scores / max, for DuoAttention to threshold itself")
    duo.add_argument("--sink-size", type=integer(0), default=64, help="written to config.json (default 64)")
    duo.add_argument("--recent-size", type=integer(0), default=256, help="written to config.json (default 256)")
    add_kv_options(duo)
    headkv = export.add_argument_group("headkv")
    headkv.add_argument("--budget", type=integer(1), default=128, help="average KV entries per head (default 128)")
    headkv.add_argument("--beta", type=real(1), default=1.2,
                        help="floor(budget / beta) per head is pooled; larger beta, bigger floor (default 1.2)")
    headkv.add_argument("--temperature", type=real(0), default=1.0, help="exponent on the score shares (default 1)")
    headkv.add_argument("--layout", choices=["keys", "matrix"], default="keys",
                        help='{"L-H": budget} or a layers x heads list (default keys)')
    export.set_defaults(handler=run_export)


def add_report(report) -> None:
    report.add_argument("run_dir", help="a detect --out folder (e.g. head_scores), or an ablate --out folder holding "
                                        "ablations only (the page of the ablated heads file's run)")
    report.add_argument("--out", help="the page's path (default RUN_DIR/report.html; RUN_DIR/NAME_TASK_report.html "
                                      "each when the folder holds several runs); a link is written through")
    report.add_argument("--run", metavar="NAME_TASK", help="only this run of the folder (e.g. organism_retrieval)")
    report.add_argument("--compare", metavar="OTHER",
                        help="another run: its folder, or one of its files (e.g. NAME_TASK_r2_heads.json): top-K "
                             "overlap, Jaccard, Spearman and a scatter of the two")
    report.add_argument("--bootstrap", type=integer(maximum=MOST_RESAMPLES), default=1000, metavar="N",
                        help="resamples behind each head's 95%% interval and P(top K) (default 1000; 0: none)")
    report.add_argument("--k", type=integer(), help="the K of P(top K) (default 10 or all heads)")
    report.set_defaults(handler=run_report)


COMMANDS = {"show": add_show, "compare": add_compare, "plot": add_plot, "export": add_export, "report": add_report}


def score_name(scores) -> str:
    """What a score file (a HeadScores) measures, for axis labels: its run's task and scorer (from the manifest),
    else its name."""
    manifest = scores.manifest
    if manifest.get("task") and manifest.get("scorer"):
        task, scorer = manifest["task"], manifest["scorer"]
        return task if task == scorer else f"{task} ({scorer})"
    return Path(scores.path).stem.removesuffix("_heads").removesuffix("_summary")


def run_show(args) -> None:
    from ..heads import analysis
    from ..errors import HeadscopeError
    from ..heads import HeadScores
    from ..runs.outputs import format_table

    scores = HeadScores.load(args.file)
    if args.top < 1:
        raise HeadscopeError("--top must be at least 1")
    if args.kv_heads and args.bootstrap:
        raise HeadscopeError("--kv-heads and --bootstrap cannot be combined")
    scores.checked()
    if args.kv_heads:
        print(kv_table(args, scores))
        return
    hybrid = analysis.layers_line(scores.layers, scores.model_layers)
    if hybrid:
        print(hybrid)
    if args.bootstrap:
        print(stability(args, scores))
    else:
        print(format_table(scores.summary, args.top))


def kv_table(args, scores) -> str:
    """Query heads aggregated onto their KV head (GQA), best first."""
    num_kv = num_kv_heads(args, scores)
    pooled = scores.kv_scores(num_kv, args.kv_heads)
    group = scores.heads_per_layer // num_kv
    order = sorted(np.ndindex(pooled.shape), key=lambda lg: (-pooled[lg], lg))
    lines = [f"{'layer':>5} {'kv_head':>7} {args.kv_heads:>8}  query heads"]
    for row, kv in order[:args.top]:
        layer, first, last = scores.layers[row], kv * group, (kv + 1) * group - 1  # row i: the i-th attention layer
        served = f"{layer}-{first}" if group == 1 else f"{layer}-{first} to {layer}-{last}"  # head ids, as elsewhere
        lines.append(f"{layer:>5} {kv:>7} {pooled[row, kv]:>8.4f}  {served}")
    return "\n".join(lines)


def num_kv_heads(args, scores) -> int:
    """--num-kv-heads, else --model's config, else the config of the model in the run's manifest."""
    from ..heads.analysis import num_kv_heads_from_config
    from ..errors import HeadscopeError

    if args.num_kv_heads is not None:
        return args.num_kv_heads
    source, local_only = (args.model, False) if args.model else (scores.model_path, True)
    if not source:
        raise HeadscopeError("the number of KV heads is needed: pass --num-kv-heads K or --model PATH")
    heads, kv_heads = num_kv_heads_from_config(source, local_only, args.trust_remote_code)
    if heads != scores.heads_per_layer:
        raise HeadscopeError(f"{source} has {heads} attention heads per layer but {scores.path} has "
                             f"{scores.heads_per_layer}")
    return kv_heads


def stability(args, scores) -> str:
    """The bootstrap table of the samples beside the file (heads with no value shown as '-', never as 0)."""
    from ..heads import analysis
    from ..runs import store
    from ..errors import HeadscopeError
    from ..heads.scores import companion
    from ..scorers import keeps_zeros

    keys, summary = scores.keys, scores.summary
    paths = {"samples": analysis.existing_samples(companion(args.file, "samples")),
             "manifest": companion(args.file, "manifest")}
    rows = store.run_rows(paths, scores.manifest or None)
    contributions = analysis.sample_contributions(rows, keys)
    if not contributions.size:
        raise HeadscopeError(f"{paths['samples']} has no passing samples with head_scores to resample")
    keep_zeros = keeps_zeros(rows)  # the rule the scorer declared, as written into each row
    k = args.k if args.k is not None else min(10, len(keys))
    result = analysis.bootstrap(contributions, keep_zeros, args.bootstrap, k, args.seed)
    table, stable = analysis.stability_table(keys, result, args.top)
    lines = [table]
    file_means = np.array([np.nan if summary[key]["mean"] is None else summary[key]["mean"] for key in keys])
    if not np.allclose(file_means, result["mean"], rtol=1e-4, atol=1e-6, equal_nan=True):
        lines.append(f"note: the means from {paths['samples'].name} differ from {Path(args.file).name} "
                     "(merged or legacy runs?): the table uses the samples")
    lines.append(f"{stable} of the top {k} heads are stable (P(top {k}) >= 0.5 over {args.bootstrap} resamples "
                 f"of {result['num_samples']} passing samples); * marks the others, - a head with no value")
    return "\n".join(lines)


def run_compare(args) -> None:
    from ..heads import analysis, plots
    from ..heads import HeadScores

    refuse_overwriting(args.plot, "--plot", [args.a, args.b], [Path(args.a).parent, Path(args.b).parent])
    a, b = (HeadScores.load(path).plain() for path in (args.a, args.b))  # no value counts as 0 here
    heads = len(a.summary)
    ks = args.top if args.top is not None else [k for k in (5, 10, 20, 30) if k <= heads] or [heads]
    result = analysis.compare(a, b, ks)
    print(f"{'K':>4} {'overlap':>7} {'jaccard':>7}")
    for row in result["per_k"]:
        print(f"{row['k']:>4} {row['overlap']:>7} {row['jaccard']:>7.3f}")
    print(f"spearman rank correlation over {result['num_heads']} heads: {result['spearman']:.4f}")
    k = result["largest_k"]
    print(f"top-{k} only in A: {' '.join(result['only_a']) or '-'}")
    print(f"top-{k} only in B: {' '.join(result['only_b']) or '-'}")
    if not args.no_plot:
        path_a, path_b = Path(args.a), Path(args.b)
        out = Path(args.plot) if args.plot else path_a.with_name(f"{path_a.stem}_vs_{path_b.stem}.png")
        wrote(plots.scatter(a, b, out, (score_name(a), score_name(b)), follow=args.plot is not None))


def run_plot(args) -> None:
    from ..heads import plots

    for path in plots.plot_run(args.file, top=args.top):
        wrote(path)


def run_export(args) -> None:
    from ..heads import exports
    from ..heads import HeadScores
    from ..heads.scores import companion
    from ..runs.outputs import atomic_write_json

    refuse_overwriting(args.out, "--out", [args.file], [Path(args.file).parent])
    scores = HeadScores.load(args.file).checked()
    default = companion(args.file, args.to)
    top = args.top if args.top is not None else min(20, scores.valued) or 1
    if args.to == "duo":
        num_kv = num_kv_heads(args, scores)
        pattern = scores.duo(num_kv, args.threshold, args.sparsity, args.raw or None)
        written = exports.write_duo(pattern, args.out or default.with_suffix(""), args.sink_size, args.recent_size)
        print(f"{int((pattern > 0).sum())} of {pattern.size} KV heads marked full attention" if not args.raw else
              f"{pattern.size} KV heads, scores scaled to [0, 1]")
    else:
        if args.to == "topk":
            content = scores.top_k_list(top)
        elif args.to == "razor":
            content = scores.razor(top)
        else:
            content = exports.headkv_json(scores.headkv(args.budget, args.beta, args.temperature), args.layout,
                                          scores.layers)
        out = Path(args.out or default.with_suffix(".json"))
        atomic_write_json(out, content, follow=args.out is not None)  # a path the user named: through links
        written = [out]
    for path in written:
        wrote(path)


def wrote(path, detail: str = "") -> None:
    """'wrote PATH' on stdout, or on stderr when PATH was written in place (--out /dev/stdout): the output stays
    clean."""
    from ..runs.outputs import write_target

    from ..errors import printable

    print(f"wrote {printable(str(path))}{detail}",
          file=sys.stderr if write_target(path, follow=True) is None else sys.stdout)


def run_report(args) -> None:
    from .report import report

    for path in report(args.run_dir, args.out, args.compare, args.run, args.bootstrap, args.k):
        wrote(path, f" ({path.stat().st_size / 1e6:.1f} MB)")
