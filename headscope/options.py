"""Options as dataclasses, and the command line generated from them.

`DetectOptions` holds what every task shares; each task extends it with its own dataclass next to its
prompt builder (tasks/<task>.py). A field's type, default and help (its `option(...)` metadata) are
the only place an option is defined: `add_arguments` turns any such dataclass into argparse flags, and
`validate` checks the choices and minimums the metadata declare.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from .errors import HeadscopeError
from .validate import LARGEST_SEED, check_value, checked


def option(default, help, **cli):
    """A dataclass field with its command-line metadata: help (text, or a function giving it when the help is
    shown), and optionally group, flag (the flag's name when not --field-name; for a True-default boolean the
    --no-... flag), choices, minimum and maximum (of a number, or of each number of a list; every number is
    also checked finite and not too large: validate.py), parse (a function str -> value for types argparse
    cannot infer), required, check (a function that raises on a bad value), excludes (fields that cannot be
    given with this one), help_for (the help for another command: {"ablate": ...}), success_filter (a flag of
    the success filter)."""
    return field(default=default, metadata={"help": help, **cli})


def parse_list(kind):
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None

    parse.__name__ = f"list of {kind.__name__}"
    return parse


parse_ints, parse_floats = parse_list(int), parse_list(float)
SCALARS = {"int": int, "float": float, "str": str, "list[int]": parse_ints, "list[float]": parse_floats}


def _template_kwargs(text: str) -> dict:
    """"enable_thinking=true,depth=2" -> {"enable_thinking": True, "depth": 2} (JSON values, else strings)."""
    import json

    kwargs = {}
    for pair in text.split(","):
        name, sep, value = (part.strip() for part in pair.partition("="))
        if not sep or not name:
            raise HeadscopeError(f"--chat-template-kwargs: expected name=value pairs, got {pair.strip()!r}")
        try:
            kwargs[name] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[name] = value
    return kwargs


def _answer_from(text: str) -> str:
    from .answers import parse_answer_from

    return parse_answer_from(text)


def _below_100(threshold: float) -> None:
    if threshold >= 100:
        raise HeadscopeError(f"--success-threshold {threshold:g}: a sample counts when its metric is above the "
                             "threshold, and metrics are 0-100: give a value below 100")


def _named(out: str) -> None:
    if not out.strip():  # "" would be the current folder, which no one meant
        raise HeadscopeError("--out is empty: name a folder")


def _scorer_help() -> str:
    from .scorers import SCORERS  # imported only to show the help: the scorers import torch

    return ("comma-separated scorers run in one pass: " + ", ".join(sorted(SCORERS)) + ", or module:Class; "
            "default: the task's own. Each writes NAME_TASK_SCORER_* files")


@dataclass
class ModelOptions:
    """Which model, and how it is loaded (`headscope check` takes these alone)."""

    model: str | None = option(None, "name or path of a Hugging Face causal LM (default: the bundled organism; "
                                     "thinker: the bundled thinking organism)", group="model")
    dtype: str = option("auto", "the weights' dtype (auto: the checkpoint's)", group="model",
                        choices=("auto", "float32", "bfloat16", "float16"))
    device: str = option("auto", "auto (every GPU via device_map, else CPU), cpu, cuda, cuda:1, ...", group="model")
    attn: str = option("sdpa", "the fast backend of the prefill", group="model", choices=("sdpa", "flash_attention_2"))
    trust_remote_code: bool = option(False, "let the model (and a metric model) run its own code: an auto_map in "
                                            "its config; without it such a model is refused", group="model")
    threads: int | None = option(None, "CPU threads of torch (default: the cores no other work keeps busy, at least "
                                       "1: on a busy machine more threads only wait for each other)", group="model",
                                 minimum=1, maximum=1024)


@dataclass
class DetectOptions(ModelOptions):
    """What every task shares; the flags have the same names (`--max-new-tokens` sets max_new_tokens)."""

    max_new_tokens: int = option(50, "decoding budget", minimum=1)
    out: str = option("head_scores", "output folder", check=_named)
    overwrite: bool = option(False, "replace the folder's run instead of resuming it")
    append: bool = option(False, "add this run to an --out folder that holds another run measuring the same thing "
                                 "on other samples (other data or grid)", ablate=False, excludes=("overwrite",))
    save_prompts: bool = option(False, "write each prompt into samples.jsonl", ablate=False)
    chat: str = option("auto", "wrap the prompt in the chat template (auto: if the tokenizer has one)",
                       choices=("auto", "on", "off"))
    chat_template_kwargs: dict | None = option(None, "keyword arguments of the chat template, e.g. "
                                                     "enable_thinking=true", parse=_template_kwargs)
    stop_at_newline: bool = option(True, "stop at a token whose text holds a newline", flag="--no-stop-at-newline")
    success_threshold: float = option(50.0, "a sample counts if its metric (0-100) is strictly above this "
                                            "(negative: every sample counts)", group="success filter",
                                      success_filter=True, check=_below_100)
    metric: str = option("rouge1", "the success metric (bertscore and embedding load --metric-model)",
                         choices=("rouge1", "rougeL", "f1", "exact", "contains", "bleu", "chrf", "bertscore",
                                  "embedding"), group="success filter", success_filter=True)
    answer_marker: str | None = option(None, "judge only what follows the last occurrence of this text (e.g. "
                                             "'so the answer is'); a response without it has no answer and fails",
                                       group="success filter", success_filter=True)
    answer_from: str = option("full", "what of the (marked) response is judged: full, after-think, boxed, "
                                      "last-number or regex:PATTERN", parse=_answer_from, check=_answer_from,
                              group="success filter", success_filter=True)
    metric_model: str | None = option(None, "the model of bertscore / embedding: a hub id or a local folder "
                                            "(default roberta-large / sentence-transformers/all-MiniLM-L6-v2)",
                                      group="success filter", success_filter=True)
    batch_size: int = option(1, "decode several prompts together (left padding)", minimum=1)
    seed: int = option(0, "seed of any sampling of the data", minimum=0, maximum=LARGEST_SEED)
    quiet: bool = option(False, "no progress bar or running top-10")
    plots: bool = option(True, "draw the heatmap / NIAH grid", flag="--no-plots",
                         help_for={"ablate": "draw the arms' NIAH grids and the ablation curve",
                                   "kv": "draw the success against the share of the KV cache kept",
                                   "specificity": "draw the specificity matrix"})
    scorer: str | None = option(None, _scorer_help, ablate=False)
    shard: str | None = option(None, "I/N: run every N-th sample from the I-th; join shards with `headscope merge`",
                               ablate=False)
    check: bool = option(True, "run the exactness check (`headscope check`) before the run", flag="--no-check")


def add_arguments(parser: argparse.ArgumentParser, options_class, defaults: dict | None = None,
                  command: str = "detect", taken: dict | None = None, label: str | None = None) -> None:
    """One flag per field of the dataclass, in argument groups. Unset flags stay out of the namespace
    (argparse.SUPPRESS), so the dataclass default applies; `defaults` only annotates the help (e.g. the
    organism's grid). A field whose metadata says `ablate=False` is not a flag of `ablate` (nor of
    `specificity`, which ablates). Several classes on one parser (specificity: one per task, `label` naming it)
    share `taken` (flag name -> its action and first default), and a flag whose default differs between them
    says each task's."""
    taken = {} if taken is None else taken
    for spec in dataclasses.fields(options_class):
        meta = spec.metadata
        if "help" not in meta or (command != "detect" and meta.get("ablate") is False):
            continue
        default = spec.default if spec.default is not dataclasses.MISSING else None
        if spec.name in taken:
            _note_other_default(taken[spec.name], default, label)
            continue
        group = _group(parser, meta.get("group", "run"))
        flag = meta.get("flag", "--" + spec.name.replace("_", "-"))
        kind = (spec.type.__name__ if isinstance(spec.type, type) else str(spec.type)).replace(" | None", "")
        shown = not (meta.get("required") or default is None or isinstance(default, bool))
        note = f" (default {default}" if shown else ""
        if note and defaults and spec.name in defaults:
            note += f"; organism {defaults[spec.name]}"
        text = meta.get("help_for", {}).get(command, meta["help"])
        help_text = (text() if callable(text) else text) + (note + ")" if note else "")
        common = dict(dest=spec.name, help=help_text.replace("%", "%%"), default=argparse.SUPPRESS)
        if kind == "bool":  # a True default is turned off by its --no-... flag
            common["help"] = ("do not " if default else "") + common["help"]
            action = group.add_argument(flag, action="store_false" if default else "store_true", **common)
        else:
            parse = meta.get("parse") or SCALARS.get(kind)
            if parse is None:
                raise TypeError(f"{options_class.__name__}.{spec.name}: give its type a parse= in option(...)")
            typed = checked(_argument_type(parse), meta.get("minimum"), meta.get("maximum"))
            action = group.add_argument(flag, type=typed, choices=meta.get("choices"),
                                        required=meta.get("required", False), **common)
        taken[spec.name] = (action, default if shown else None, label)


def _group(parser: argparse.ArgumentParser, title: str):
    """The parser's argument group of that title: one "data" group however many classes add to it."""
    found = next((group for group in parser._action_groups if group.title == title), None)
    return found or parser.add_argument_group(title)


def _note_other_default(first: tuple, default, label: str | None) -> None:
    """specificity takes each task's flags once: where another task's default differs, the help says each."""
    action, first_default, first_label = first
    if label and first_default is not None and default != first_default:
        action.help = action.help.replace(f"(default {first_default}",
                                          f"(default {first_default} for {first_label}, {default} for {label}", 1)


def _argument_type(parse):
    """argparse reports ArgumentTypeError as one usage line; a parser's HeadscopeError becomes one."""
    def typed(text: str):
        try:
            return parse(text)
        except HeadscopeError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    typed.__name__ = getattr(parse, "__name__", "value")
    return typed


# Option groups that choose which samples a run decodes (its data and grid), not what its scores mean: runs that
# differ only in these, and in the seed that samples the data, measure the same thing (--append may pool them).
SAMPLE_GROUPS = ("data", "context lengths")


def sample_fields(options_class) -> set[str]:
    return {spec.name for spec in dataclasses.fields(options_class)
            if spec.metadata.get("group") in SAMPLE_GROUPS} | {"seed"}


def unused_by(command: str, options_class) -> set[str]:
    """The fields a command does not use (`ablate=False` in their metadata)."""
    return {spec.name for spec in dataclasses.fields(options_class) if spec.metadata.get(command) is False}


def refuse_conflicts(options_class, given: set[str]) -> None:
    """Flags that cannot be combined (a field's `excludes`): one line naming both, never one silently ignored."""
    for spec in dataclasses.fields(options_class):
        clash = next((other for other in spec.metadata.get("excludes", ()) if other in given), None)
        if spec.name in given and clash:
            raise HeadscopeError(f"{flag_of(options_class, clash)} and {flag_of(options_class, spec.name)} cannot be "
                                 "combined: give one of them")


def excluded_by(options_class, name: str, given: set[str]) -> bool:
    """Whether a field is excluded by a given one (an organism default the user's flag replaces)."""
    specs = {spec.name: spec for spec in dataclasses.fields(options_class)}
    return name in specs and any(other in given for other in specs[name].metadata.get("excludes", ()))


def flag_of(options_class, name: str) -> str:
    spec = next(spec for spec in dataclasses.fields(options_class) if spec.name == name)
    return spec.metadata.get("flag", "--" + name.replace("_", "-"))


def given_fields(options) -> set[str]:
    """The fields of an options object that differ from their defaults (set by the user)."""
    return {spec.name for spec in dataclasses.fields(options)
            if spec.default is not dataclasses.MISSING and getattr(options, spec.name) != spec.default}


def validate(options) -> None:
    """The choices and ranges the fields declare (and every number finite and not too large: validate.py): one
    clear line for the first that does not hold."""
    for spec in dataclasses.fields(options):
        value, meta = getattr(options, spec.name), spec.metadata
        flag = meta.get("flag", "--" + spec.name.replace("_", "-"))
        if value is None:
            continue
        if "choices" in meta and value not in meta["choices"]:
            raise HeadscopeError(f"{flag} must be one of {', '.join(map(str, meta['choices']))}, not {value!r}")
        check_value(flag, value, meta.get("minimum"), meta.get("maximum"))
        if "check" in meta:
            meta["check"](value)


def build(options_class, options=None, **overrides):
    """An `options_class` instance from another options object (the fields they share) and overrides by name."""
    names = {spec.name for spec in dataclasses.fields(options_class)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise HeadscopeError(f"unknown option {unknown[0]!r} for {options_class.__name__}")
    shared = {} if options is None else {n: getattr(options, n) for n in names if hasattr(options, n)}
    return options_class(**{**shared, **overrides})
