"""headscope's command line: `headscope detect|ablate|kv|specificity|rescore|check|show|compare|plot|export|
merge|report|organism ...`.

Only the command being run has its arguments built (and its modules imported): `headscope --help` lists the
commands without importing torch."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pickle
import sys
from pathlib import Path

from ..errors import EscapedStream, HeadscopeError, printable


def options_from(args: argparse.Namespace, options_class) -> dict:
    """The fields of `options_class` set on the command line (flags that cannot be combined refused); on a
    bundled model (no --model: the organism; --model thinker), the task's defaults for it for those left unset and
    not replaced by a flag given (--context-lengths replaces the organism's --min-length ...)."""
    from ..detection.engine import refuse_filter_flags
    from ..options import excluded_by, refuse_conflicts

    names = {spec.name for spec in dataclasses.fields(options_class)}
    given = {name: value for name, value in vars(args).items() if name in names}
    refuse_conflicts(options_class, set(given))
    task = getattr(args, "task_spec", None)
    if task is None:
        return given
    refuse_filter_flags(task, set(given))
    defaults = {k: v for k, v in bundled_defaults(task, getattr(args, "model", None)).items()
                if k in names and not excluded_by(options_class, k, set(given))}  # only this class's fields take them
    return defaults | given


def bundled_defaults(task, model: str | None) -> dict:
    """The option values a task takes on a bundled model unless set: the organism's (no --model) or the thinker's
    (--model thinker: its answer follows </think>; organism/thinker.py); none on any other model."""
    from .. import bundled

    if model is None:
        return task.organism_defaults
    if bundled.name_of(model) == "thinker":
        from ..organism.thinker import TASK_DEFAULTS

        return TASK_DEFAULTS.get(task.name, {})
    return {}


def run_detect(args: argparse.Namespace) -> int:
    from ..detection.engine import detect

    options = args.task_spec.options(**options_from(args, args.task_spec.options))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        result = distributed_detect(args.task, options)
        if result is None:  # not rank 0: rank 0 prints the merged results
            return 0
    else:
        result = detect(args.task, options)
    counts = result.counts
    by_scorer = result.by_scorer or {options.scorer: result}
    if counts["passed"]:
        for name, scorer_result in by_scorer.items():
            print(scorer_table(name, scorer_result, len(by_scorer) > 1))
    print(f"samples run: {counts['run']}  passed: {counts['passed']}  span errors: {counts['span_errors']}"
          + (f"  no extractable answer: {counts['no_answer']}" if options.answer_marker or options.answer_from != "full"
             else "") + (f"  tied head-steps: {counts['tied_head_steps']} (top-k ties, settled by the rule)"
                         if any("tied_head_steps" in row for row in result.samples) else ""))
    for error in sorted({row["error"] for row in result.samples if row["error"]}):
        print(f"span error: {error}")
    for name, scorer_result in by_scorer.items():
        print_unscored(name, scorer_result.samples)
    if not result.complete:
        for scorer_result in by_scorer.values():
            for kind in ("heads", "summary", "samples", "manifest"):
                said_wrote(scorer_result.paths[kind])
    if options.shard is not None and not counts["run"]:  # more shards than samples: a finished, empty shard
        print(f"shard {options.shard} holds no sample of this grid (it has fewer samples than shards): nothing to "
              f"decode; when every shard has finished: headscope merge {options.out}")
        return 0
    if not counts["passed"]:
        print(f"headscope: {counts['passed']} of {counts['run']} samples passed the success filter ({options.metric} > "
              f"{options.success_threshold:g}): no head has a value, so there is nothing to rank; re-judge the "
              f"responses with `headscope rescore {printable(options.out)}`", file=sys.stderr)
        return 1
    if options.plots and not result.complete:
        from ..runs.lock import writer_locks
        from ..heads.plots import plot_run

        with writer_locks(options.out, result.locks):  # the pictures are of the heads file no writer is changing
            for scorer_result in by_scorer.values():
                for picture in plot_run(scorer_result.paths["heads"]):
                    said_wrote(picture)
    if options.shard is not None:
        print(f"when every shard has finished: headscope merge {options.out}")
    else:
        print(f"see it in the browser: headscope report {options.out}")
    return 0


def said_wrote(path) -> None:
    """'wrote PATH', the path escaped whole (a folder named with a newline cannot make it two lines)."""
    from .analysis_commands import wrote

    wrote(path)


def scorer_table(name: str, result, titled: bool) -> str:
    """A scorer's ranked table, under its name when several scorers ran together."""
    from ..runs.outputs import format_table

    return (f"{name}:\n" if titled else "") + format_table(result.summary, 30)


def print_unscored(scorer: str | None, rows: list[dict]) -> None:
    """Samples a scorer could not score (a chain too short for a kurtosis, no answer segment): counted, with
    their reasons, never silently left out of the heads file."""
    from collections import Counter

    reasons = Counter(row["unscored"] for row in rows if row.get("unscored"))
    if reasons:
        listed = "; ".join(f"{reason} ({count})" for reason, count in reasons.most_common(3))
        more = f"; and {len(reasons) - 3} other reasons" if len(reasons) > 3 else ""
        print(f"{scorer or 'scorer'}: {sum(reasons.values())} of {len(rows)} samples have no score (not in the heads "
              f"file): {listed}{more}")


def distributed_detect(task, options):
    """Under torchrun: each rank runs its shard of the sample grid; rank 0 merges the shards."""
    import torch
    import torch.distributed as dist

    from ..detection.engine import detect
    from ..runs.store import merge

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

    from ..detection.engine import DetectResult
    from ..detection.loading import model_name, model_path
    from ..runs.outputs import output_paths
    from ..runs.store import read_rows

    paths = output_paths(options.out, model_name(model_path(options.model)), task)
    summary = json.loads(paths["summary"].read_text())
    return DetectResult(json.loads(paths["heads"].read_text()), summary, read_rows(paths["samples"]), paths)


def run_ablate(args: argparse.Namespace) -> None:
    from ..experiments.ablation import AblationSettings, ablate, format_report

    options = args.task_spec.options(**options_from(args, args.task_spec.options))
    settings = options_from(args, AblationSettings)
    report = ablate(args.task, settings.pop("scores"), settings.pop("top"), options, **settings)
    print(format_report(report))
    said_wrote(report["path"])
    for picture in report["pictures"]:
        said_wrote(picture)


def run_kv(args: argparse.Namespace) -> None:
    from ..experiments.kv_curve import KVSettings, kv_curve
    from ..experiments.kv_output import format_table

    options = args.task_spec.options(**options_from(args, args.task_spec.options))
    settings = options_from(args, KVSettings)
    report = kv_curve(args.task, settings.pop("scores"), options, **settings)
    print(format_table(report))
    said_wrote(report["path"])
    for picture in report["pictures"]:
        said_wrote(picture)


def run_check(args: argparse.Namespace) -> int:
    from ..detection.check import run_check as check_model
    from ..detection.engine import scorer_case, start_run
    from ..errors import quiet_notes
    from ..attention.layout import attention_layout
    from ..detection.loading import load
    from ..options import ModelOptions
    from ..tasks import TASKS

    model = ModelOptions(**options_from(args, ModelOptions))
    loaded = load(model.model, model.dtype, model.device, model.attn, model.trust_remote_code)
    cases = []
    for task in ("retrieval", "reasoning"):  # each task's default scorer on its first two prompts
        defaults = bundled_defaults(TASKS[task], model.model)
        options = TASKS[task].options(**(defaults | dataclasses.asdict(model)))
        with quiet_notes():  # notes on the task's grid name flags that check does not have
            case = scorer_case(start_run(task, options, loaded, check_it=False))
        if case is None:
            print(f"headscope: note: no {task} prompt's span is found with this tokenizer: its scorer is not checked",
                  file=sys.stderr)
        else:
            cases.append(case)
    report = check_model(loaded, args.prompt_tokens, args.steps, cases=cases)
    layout = attention_layout(loaded.model)
    window = layout.smallest_window
    batch = "a left-padded batch of 2" if layout.left_padding else \
        "a batch of 2 without padding (this model is decoded one prompt at a time)"
    print(f"model {loaded.path}  dtype {str(loaded.model.dtype).removeprefix('torch.')}  device {loaded.device}  "
          f"attention {loaded.attention}")
    print(f"prompt {report.prompt_tokens} tokens" + (f" (> the smallest window, {window})" if window else "") +
          f", {batch}, {args.steps} steps")
    print(report.table())
    if loaded.eager_fallback:
        print("note: attention off transformers' interface: rows are eager attention's own on decoding steps; no "
              "prefill-row scorer and no ablation (ablate refuses this model)")
    if report.passed:
        print("verdict: PASS: headscope's rows, scorers, tokens and masking are exact on this model with these "
              "settings")
        return 0
    failing = ", ".join(figure.name for figure in report.failing())
    print(f"verdict: FAIL ({failing}): do not trust headscope's scores on this model with these settings")
    return 1


def run_rescore(args: argparse.Namespace) -> None:
    from ..experiments.rescore import draw, format_report, rescore

    report = rescore(args.run_dir, args.metric, args.threshold, args.task, args.metric_model, args.trust_remote_code)
    print(format_report(report))
    said_wrote(os.path.join(args.run_dir, "rescore", "rescore.json"))
    if not args.no_plots:
        from ..runs.lock import writer_lock

        with writer_lock(args.run_dir, "rescore"):  # rescore's own lock: no rescore rewrites rescore/ meanwhile
            for picture in draw(report, Path(args.run_dir)):
                said_wrote(picture)


def run_specificity(args: argparse.Namespace) -> None:
    from ..options import excluded_by, refuse_conflicts
    from ..experiments.specificity import Arms, draw, format_matrix, specificity
    from ..tasks import TASKS

    given = {name: value for name, value in vars(args).items()
             if name not in ("command", "handler", "scores", "tasks", "top", "random", "repeats", "mode")}
    tasks = [TASKS[task] for task in args.tasks if task in TASKS]
    for task in tasks:
        refuse_conflicts(task.options, set(given))
    # a bundled model: each task's defaults for it, unless set or replaced
    given = {k: v for task in tasks for k, v in bundled_defaults(task, given.get("model")).items()
             if not excluded_by(task.options, k, set(given))} | given
    report = specificity(args.scores, args.tasks, Arms(args.top, args.random, args.repeats, args.mode), **given)
    print(format_matrix(report))
    said_wrote(report["path"])
    if given.get("plots", True):
        from ..runs.lock import writer_lock

        path = Path(report["path"])
        with writer_lock(path.parent, path.stem):  # specificity's own lock (NAME_specificity)
            said_wrote(draw(report))


def run_merge(args: argparse.Namespace) -> None:
    from ..runs.store import merge

    for path in merge(args.dirs, args.out):
        said_wrote(path)


def run_organism_train(args: argparse.Namespace, rest: list[str]) -> None:
    """The organism's training command, or the thinker's with --which thinker (each parses every flag itself)."""
    from ..organism import thinker, train
    from ..parser import HeadscopeParser

    which = HeadscopeParser(prog="headscope organism train", add_help=False)
    which.add_argument("--which", choices=train.WHICH, default="organism")
    (thinker.main if which.parse_known_args(rest)[0].which == "thinker" else train.main)(rest)


# ------------------------------------------------------------------------------------------ the parser

def add_detect(detect) -> None:
    from ..options import add_arguments
    from ..tasks import TASKS

    tasks = detect.add_subparsers(dest="task", required=True)
    for task in TASKS.values():
        task_parser = tasks.add_parser(task.name, help=task.help, description=task.help)
        add_arguments(task_parser, task.options, task.organism_defaults)
        task_parser.set_defaults(task_spec=task, handler=run_detect)


def add_rerun(parser, settings_class, handler, what: str, command: str) -> None:
    """A command that re-runs a task with a success filter under settings of its own (`ablate`, `kv`): one
    subcommand per task, the settings' flags and the task's (those `ablate` uses; the help of `command`)."""
    from ..options import add_arguments
    from ..tasks import TASKS

    tasks = parser.add_subparsers(dest="task", required=True)
    for task in (task for task in TASKS.values() if task.success_filter):
        task_parser = tasks.add_parser(task.name, help=f"{what} on the {task.name} task")
        add_arguments(task_parser, settings_class)
        add_arguments(task_parser, task.options, task.organism_defaults, command=command)
        task_parser.set_defaults(task_spec=task, handler=handler)


def add_ablate(ablate) -> None:
    from ..experiments.ablation import AblationSettings

    add_rerun(ablate, AblationSettings, run_ablate, "ablation", "ablate")


def add_kv(kv) -> None:
    from ..experiments.kv_curve import KVSettings

    add_rerun(kv, KVSettings, run_kv, "KV cache policies", "kv")


def add_check(check) -> None:
    from ..options import ModelOptions, add_arguments
    from ..validate import integer

    add_arguments(check, ModelOptions)
    check.add_argument("--prompt-tokens", type=integer(1, 1 << 20), default=256,
                       help="length of the test prompt (default 256)")
    check.add_argument("--steps", type=integer(1, 10_000), default=8, help="decoding steps compared (default 8)")
    check.set_defaults(handler=run_check)


def add_rescore(rescore) -> None:
    from ..options import parse_floats, parse_list
    from ..validate import checked

    rescore.add_argument("run_dir", help="a detect --out folder")
    rescore.add_argument("--task", help="only this task's runs in the folder (default: every run)")
    rescore.add_argument("--metric", type=parse_list(str), default=["rouge1", "f1", "bleu", "chrf"],
                         help="comma-separated metrics (default rouge1,f1,bleu,chrf; also rougeL, exact, contains, "
                              "bertscore, embedding)")
    rescore.add_argument("--threshold", type=checked(parse_floats), default=[40.0, 50.0, 60.0],
                         help="comma-separated thresholds: a sample passes when metric > threshold (default 40,50,60)")
    rescore.add_argument("--metric-model", help="bertscore / embedding model: a hub id or a local folder")
    rescore.add_argument("--trust-remote-code", action="store_true",
                         help="let the metric model run its own code (an auto_map in its config); off by default")
    rescore.add_argument("--no-plots", action="store_true", help="do not draw the stability picture")
    rescore.set_defaults(handler=run_rescore)


def add_specificity(specific) -> None:
    from ..options import add_arguments, parse_list
    from ..tasks import TASKS
    from ..validate import integer

    specific.add_argument("--scores", type=parse_list(str), required=True, help="comma-separated heads files")
    specific.add_argument("--tasks", type=parse_list(str), default=["retrieval", "reasoning"],
                          help="comma-separated tasks (default retrieval,reasoning)")
    specific.add_argument("--top", type=integer(1), required=True, help="K: the top-K heads of each file are masked")
    specific.add_argument("--random", type=integer(0), help="K random heads outside each file's top K (default: K)")
    specific.add_argument("--repeats", type=integer(1), default=3, help="random draws (default 3)")
    specific.add_argument("--mode", default="uniform", choices=["uniform", "zero", "mean"],
                          help="how heads are masked (default uniform)")
    taken: dict = {}
    for task in ("retrieval", "reasoning"):
        add_arguments(specific, TASKS[task].options, TASKS[task].organism_defaults, command="specificity",
                      taken=taken, label=task)
    specific.set_defaults(handler=run_specificity)


def add_merge(merge) -> None:
    merge.add_argument("dirs", nargs="+", help="folders holding *_samples.shard-I-of-N.jsonl files")
    merge.add_argument("--out", help="where to write the merged files (default: the first folder); a whole run "
                                     "already there is never replaced")
    merge.set_defaults(handler=run_merge)


def add_organism(organism) -> None:
    organism_commands = organism.add_subparsers(dest="organism_command", required=True)
    organism_commands.add_parser("train", help="train the organism from scratch (options: see `train --help`)",
                                 add_help=False)


def tasks_registered() -> list[str]:
    from ..tasks import TASKS  # light: the tasks' modules import no torch

    return list(TASKS)


COMMANDS = {  # name: (help, what builds its arguments)
    "detect": (lambda: f"find the heads of a task ({', '.join(tasks_registered())})", add_detect),
    "ablate": ("mask the top-K heads (and K random ones) and re-run the task", add_ablate),
    "kv": ("replay KV cache policies from a heads file (DuoAttention, HeadKV, and random and uniform baselines): "
           "the task's success at each share of the cache kept", add_kv),
    "check": ("prove on your model and settings that headscope is exact (exit 0) or show where it is not (exit 1)",
              add_check),
    "rescore": ("re-judge a finished run under other success filters (metrics, thresholds) without running the "
                "model; head-set stability", add_rescore),
    "specificity": ("is a score file's head set specific to its skill? mask each file's top-K heads (and K random "
                    "ones) on each task", add_specificity),
    "merge": ("merge the shard files of `detect --shard I/N` runs", add_merge),
    "organism": ("the bundled model organism", add_organism),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """headscope's parser, with the arguments of `command` only (every command is listed in the help)."""
    from . import analysis_commands as cli_analysis
    from ..parser import HeadscopeParser

    parser = HeadscopeParser(prog="headscope", description="Find the retrieval and reasoning heads of any "
                             "Hugging Face causal LM, and prove that they matter.")
    commands = parser.add_subparsers(dest="command", required=True)
    builders = {name: (text, add) for name, (text, add) in COMMANDS.items()}
    builders |= {name: (cli_analysis.HELP[name], add) for name, add in cli_analysis.COMMANDS.items()}
    for name, (text, add) in builders.items():
        subparser = commands.add_parser(name, help=text() if callable(text) else text)
        if name == command:
            add(subparser)
    return parser


def user_error(error: BaseException) -> str | None:
    """The one line for a failure that the user's files or machine caused; None for a bug (its traceback shows)."""
    if isinstance(error, HeadscopeError):
        return str(error)
    if isinstance(error, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({error.reason} at byte offset {error.start})"
    if isinstance(error, OSError):  # a full disk, a permission, a folder where a file should be, ...
        reason = error.strerror or str(error) or type(error).__name__
        return f"{error.filename}: {reason}" if error.filename else reason
    if isinstance(error, pickle.UnpicklingError):  # torch's own message advises weights_only=False: never
        return ("the model's pickled weights hold more than tensors: torch's safe loader refused them, and headscope "
                "never unpickles weights unsafely (use a safetensors checkpoint)")
    if type(error).__name__ == "SafetensorError":
        return f"a safetensors file cannot be read ({str(error).splitlines()[0]}): is it complete?"
    return None


TORCH_COMMANDS = {"detect", "ablate", "kv", "specificity", "check", "rescore"}  # the commands that compute with torch


@contextlib.contextmanager
def command_threads(args: argparse.Namespace):
    """torch's CPU threads while a command runs: --threads, else the cores no other work keeps busy
    (engine.use_threads, as the Python API picks them); put back after it, so that a program calling main() keeps
    its own setting."""
    if args.command not in TORCH_COMMANDS:
        yield
        return
    from ..detection.engine import kept_threads, use_threads

    with kept_threads():
        use_threads(getattr(args, "threads", None))
        yield


def quiet_libraries() -> None:
    """Our own progress bar and errors only: no download bars, no huggingface_hub retry lines before our error."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    hub_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(next((word for word in argv if not word.startswith("-")), None))
    args, rest = parser.parse_known_args(argv)
    if rest and not (args.command == "organism"):
        from ..parser import unrecognized

        unrecognized(parser, args, rest)
    try:
        quiet_libraries()
        if args.command == "organism":
            run_organism_train(args, rest)
            return 0
        with command_threads(args), contextlib.redirect_stdout(EscapedStream(sys.stdout)):
            return args.handler(args) or 0
    except KeyboardInterrupt:
        print("headscope: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `headscope show FILE | head`: the reader left; stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # and no second error at exit
        return 141
    except Exception as error:
        line = user_error(error)
        if line is None:
            raise
        print(f"headscope: error: {printable(' '.join(line.splitlines()))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
