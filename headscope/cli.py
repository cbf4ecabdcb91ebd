"""headscope's command line: `headscope detect|ablate|check|show|compare|plot|export|merge|organism ...`."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from transformers.utils import logging as transformers_logging

from .errors import HeadscopeError


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _top(text: str) -> list[int] | str:
    return "auto" if text.strip() == "auto" else _ints(text)


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _fields(text: str) -> dict:
    from .tasks.reasoning import parse_fields

    try:
        return parse_fields(text)
    except HeadscopeError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", help="name or path of a Hugging Face causal LM (default: the bundled organism)")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    group.add_argument("--device", default="auto", help="auto (all GPUs via device_map, else CPU), cpu, cuda, cuda:1, ...")
    group.add_argument("--attn", default="sdpa", choices=["sdpa", "flash_attention_2"])
    group.add_argument("--trust-remote-code", action="store_true")


def add_detect_options(parser: argparse.ArgumentParser, task: str) -> None:
    from .tasks import TASKS

    add_model_options(parser)
    run = parser.add_argument_group("run")
    run.add_argument("--max-new-tokens", type=int, help=f"default {TASKS[task].default_max_new_tokens}")
    run.add_argument("--out", default="head_scores", help="output folder (default head_scores/)")
    run.add_argument("--overwrite", action="store_true", help="replace earlier results instead of merging with them")
    run.add_argument("--save-prompts", action="store_true", help="write each prompt into samples.jsonl")
    run.add_argument("--chat", default="auto", choices=["auto", "on", "off"], help="use the chat template")
    run.add_argument("--no-stop-at-newline", dest="stop_at_newline", action="store_false")
    run.add_argument("--success-threshold", type=float, default=50.0,
                     help="a sample counts if its metric (0-100) is strictly above this (negative: all count)")
    run.add_argument("--metric", default="rouge1", choices=["rouge1", "rougeL", "f1", "exact", "contains"])
    run.add_argument("--keep-zeros", action="store_true", help="reasoning: append zero scores to the head lists too")
    run.add_argument("--batch-size", type=int, default=1, help="decode several prompts together (left padding)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--quiet", action="store_true", help="no progress bar or running top-10")
    run.add_argument("--no-plots", dest="plots", action="store_false", help="do not draw the heatmap / NIAH grid")
    run.add_argument("--append", action="store_true",
                     help="add this run to an --out folder that holds a run with other settings")
    run.add_argument("--scorer", help="comma-separated scorers to run in one pass (registered names or "
                                      "module:Class); default: the task's own. Each writes NAME_TASK_SCORER_* files")
    run.add_argument("--shard", help="I/N: run every N-th sample from the I-th; join shards with `headscope merge`")
    run.add_argument("--no-check", dest="check", action="store_false",
                     help="skip the exactness check (`headscope check`) run on the model before the run")
    grid = parser.add_argument_group("context lengths")
    grid.add_argument("--context-lengths", type=_ints, help="e.g. 1000,2000,4000")
    grid.add_argument("--min-length", type=int, help="default 1000 (organism: 300)")
    grid.add_argument("--max-length", type=int, help="default 50000, capped at the model's maximum (organism: 1200)")
    grid.add_argument("--num-lengths", type=int, help="default 20 (organism: 4)")
    grid.add_argument("--length-buffer", type=int, default=200, help="context trimmed to length minus this")
    data = parser.add_argument_group("data")
    if task == "retrieval":
        data.add_argument("--haystack", help="folder of .txt files (default: the bundled haystack)")
        data.add_argument("--needles", help="JSON Lines of {needle, question, real_needle}")
        data.add_argument("--depths", type=_floats, help="needle depths in percent, e.g. 0,50,100")
        data.add_argument("--num-depths", type=int, help="default 10 (organism: 5)")
        data.add_argument("--depth-spacing", default="linear", choices=["linear", "sigmoid"])
    elif task == "pattern":
        data.add_argument("--block-length", type=int, default=32, help="random tokens in the repeated block")
        data.add_argument("--repeats", dest="block_repeats", type=int, default=4, help="times the block is repeated")
        data.add_argument("--num-samples", type=int, help="number of random sequences (default 8)")
    elif task == "query":
        data.add_argument("--data", help="JSON list or JSON Lines with id, documents, gold, question, answer")
        data.add_argument("--num-samples", type=int, help="sample this many records (with --seed)")
    else:
        data.add_argument("--data", help="JSON list or JSON Lines with id, context, question, answer")
        data.add_argument("--fields", type=_fields, help="rename fields, e.g. id=qid,answer=gold")
        data.add_argument("--num-samples", type=int, help="sample this many records (with --seed)")
        data.add_argument("--top-k", type=int, default=5, help="positions of each attention row scored")
        data.add_argument("--generated-weight", type=float, default=1.0)
        data.add_argument("--query-weight", type=float, default=0.5)


ORGANISM_GRID = {"min_length": 300, "max_length": 1200, "num_lengths": 4, "num_depths": 5}


def detect_options(args: argparse.Namespace) -> dict:
    """The DetectOptions fields set on the command line. Unset grid options take the defaults;
    the organism's context is short, so it has its own grid."""
    from .engine import DetectOptions

    names = {f.name for f in dataclasses.fields(DetectOptions)}
    grid = ORGANISM_GRID if args.model is None else {}
    options = {k: v if v is not None else grid.get(k) for k, v in vars(args).items() if k in names}
    return {k: v for k, v in options.items() if v is not None}


def run_detect(args: argparse.Namespace) -> None:
    from .engine import DetectOptions, detect
    from .outputs import format_table

    options = DetectOptions(**detect_options(args))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        result = distributed_detect(args.task, options)
        if result is None:  # not rank 0: rank 0 prints the merged results
            return
    else:
        result = detect(args.task, options)
    print(format_table(result.summary, 30))
    counts = result.counts
    print(f"samples run: {counts['run']}  passed: {counts['passed']}  span errors: {counts['span_errors']}")
    for error in sorted({row["error"] for row in result.samples if row["error"]}):
        print(f"span error: {error}")
    print(f"wrote {result.paths['heads']}")
    if args.plots:
        from .plots import plot_run

        for name, scorer_result in (result.by_scorer or {None: result}).items():
            for picture in plot_run(scorer_result.paths["heads"]):
                print(f"wrote {picture}")


def distributed_detect(task, options):
    """Under torchrun: each rank runs its shard of the sample grid; rank 0 merges the shards."""
    import torch
    import torch.distributed as dist

    from .engine import detect
    from .store import merge

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if options.shard is not None:
        raise HeadscopeError("--shard is set by torchrun's ranks: leave it out")
    if torch.cuda.is_available() and options.device in ("auto", "cuda"):  # each rank on its own GPU
        options.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if options.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(options.device))  # before NCCL: object collectives use this GPU
    dist.init_process_group("nccl" if options.device.startswith("cuda") else "gloo")
    try:
        options.shard = f"{rank}/{world}"
        options.quiet = options.quiet or rank != 0
        failure = None
        try:
            detect(task, options)
        except HeadscopeError as error:
            failure = error
        failures = [None] * world
        dist.all_gather_object(failures, str(failure) if failure else None)
        if any(failures):
            raise HeadscopeError(next(f for f in failures if f))
        result = None
        if rank == 0:
            merge([options.out])
            options.shard, options.quiet = None, True
            result = _merged_result(task, options)
        dist.barrier()
        return result
    finally:
        dist.destroy_process_group()


def _merged_result(task, options):
    import json

    from .engine import DetectResult
    from .loading import default_model_path, model_name
    from .outputs import output_paths
    from .store import read_rows

    paths = output_paths(options.out, model_name(options.model or default_model_path()), task)
    summary = json.loads(paths["summary"].read_text())
    return DetectResult(json.loads(paths["heads"].read_text()), summary, read_rows(paths["samples"]), paths)


def run_ablate(args: argparse.Namespace) -> None:
    from .ablation import ablate, format_report
    from .engine import DetectOptions

    report = ablate(args.task, args.scores, args.top, args.random, args.repeats, args.mode,
                    DetectOptions(**detect_options(args)), min_score=args.min_score)
    print(format_report(report))
    print(f"wrote {report['path']}")
    for picture in report["pictures"]:
        print(f"wrote {picture}")


def run_check(args: argparse.Namespace) -> int:
    from .check import run_check as check_model
    from .loading import load

    loaded = load(args.model, args.dtype, args.device, args.attn, args.trust_remote_code)
    report = check_model(loaded, args.prompt_tokens, args.steps)
    print(f"model {loaded.path}  dtype {str(loaded.model.dtype).removeprefix('torch.')}  device {loaded.device}  "
          f"attention {loaded.attention}  prompt {args.prompt_tokens} tokens, {args.steps} steps")
    print(report.table())
    if report.passed:
        print("verdict: PASS: headscope's rows, tokens and masking are exact on this model with these settings")
        return 0
    failing = ", ".join(figure.name for figure in report.failing())
    print(f"verdict: FAIL ({failing}): do not trust headscope's scores on this model with these settings")
    return 1


def run_merge(args: argparse.Namespace) -> None:
    from .store import merge

    for path in merge(args.dirs, args.out):
        print(f"wrote {path}")


def run_organism_train(args: argparse.Namespace, rest: list[str]) -> None:
    from .organism import train

    train.main(rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headscope", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    detect = commands.add_parser("detect", help="find retrieval or reasoning heads")
    tasks = detect.add_subparsers(dest="task", required=True)
    for task, text in (("retrieval", "needle-in-a-haystack retrieval heads (Wu et al. 2024)"),
                       ("reasoning", "reasoning heads: attention on generated tokens and the question"),
                       ("query", "query-focused retrieval heads (QRHead): question -> gold document attention"),
                       ("pattern", "previous-token, duplicate-token, induction and echo heads on repeated tokens")):
        add_detect_options(tasks.add_parser(task, help=text, description=text), task)
    ablate = commands.add_parser("ablate", help="mask the top-K heads (and K random ones) and re-run the task")
    ablate_tasks = ablate.add_subparsers(dest="task", required=True)
    for task in ("retrieval", "reasoning"):
        parser_ = ablate_tasks.add_parser(task, help=f"ablation on the {task} task")
        group = parser_.add_argument_group("ablation")
        group.add_argument("--scores", required=True, help="a heads or summary file (NAME_TASK_heads.json)")
        group.add_argument("--top", type=_top, required=True,
                           help="K, a sweep 1,5,10,20, or auto: the heads scoring at least --min-score")
        group.add_argument("--min-score", type=float, default=0.1,
                           help="with --top auto (default 0.1, Wu et al.'s cut for a retrieval head)")
        group.add_argument("--random", type=int, help="K random heads outside the top K (default: the same K; "
                                                      "0: no random arm)")
        group.add_argument("--repeats", type=int, default=3, help="random draws (mean and std are reported)")
        group.add_argument("--mode", default="uniform", choices=["uniform", "zero", "mean"])
        add_detect_options(parser_, task)
    check = commands.add_parser("check", help="prove on your model and settings that headscope is exact (exit 0) "
                                              "or show where it is not (exit 1)")
    add_model_options(check)
    check.add_argument("--prompt-tokens", type=int, default=256, help="length of the test prompt (default 256)")
    check.add_argument("--steps", type=int, default=8, help="decoding steps compared (default 8)")
    merge = commands.add_parser("merge", help="merge the shard files of `detect --shard I/N` runs")
    merge.add_argument("dirs", nargs="+", help="folders holding *_samples.shard-I-of-N.jsonl files")
    merge.add_argument("--out", help="where to write the merged files (default: the first folder)")
    organism = commands.add_parser("organism", help="the bundled model organism")
    organism_commands = organism.add_subparsers(dest="organism_command", required=True)
    organism_commands.add_parser("train", help="train the organism from scratch (options: see `train --help`)",
                                 add_help=False)
    from . import cli_analysis
    cli_analysis.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not (args.command == "organism"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    transformers_logging.disable_progress_bar()  # our own progress bar is enough; errors stay one line
    try:
        if args.command == "detect":
            run_detect(args)
        elif args.command == "merge":
            run_merge(args)
        elif args.command == "ablate":
            run_ablate(args)
        elif args.command == "check":
            return run_check(args)
        elif hasattr(args, "handler"):
            args.handler(args)
        elif args.command == "organism":
            run_organism_train(args, rest)
    except HeadscopeError as error:
        print(f"headscope: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("headscope: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `headscope show FILE | head`: the reader left; stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # and no second error at exit
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
