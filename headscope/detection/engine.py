"""The one engine every task and scorer shares:
load -> build prompts -> generate with the recorder -> score -> accumulate -> write.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from tqdm import tqdm

from . import check, loading
from ..runs import identity, outputs, store
from .decode import StopRule, eos_token_ids, greedy_decode, newline_token_ids, num_layers_and_heads
from ..errors import HeadscopeError, notify, printable
from ..attention.layout import attention_layout
from ..runs.lock import writer_locks
from ..attention.runstate import HEAD_COUNT, LAYER_COUNT, config_count
from ..answers import extract_answer
from ..metrics import passes, score_response
from ..options import DetectOptions, build, flag_of, given_fields, refuse_conflicts, validate
from ..scorers import PromptBatch, load_scorer
from ..scorers.segments import locate, think_markers
from ..tasks.spans import encode_with_span, excerpt
from ..tasks import TASKS, Task
from ..tasks.base import data_files
from ..attention.ties import TieCount


@dataclass
class DetectResult:
    heads: dict[str, list[float]]  # every head's list: all runs in the folder (and a legacy base file)
    summary: dict[str, dict]
    samples: list[dict]  # this run's rows of samples.jsonl
    paths: dict = field(default_factory=dict)
    by_scorer: dict = field(default_factory=dict)  # scorer name -> DetectResult, when several ran together
    complete: bool = False  # the run was already complete: nothing was decoded or written
    locks: list = field(default_factory=list)  # the run's lock names in paths' folder: what drawing it holds

    @property
    def counts(self) -> dict[str, int]:
        return {"run": len(self.samples), "passed": sum(s["passed"] for s in self.samples),
                "span_errors": sum(s["error"] is not None for s in self.samples),
                "no_answer": sum("answer_text" in s and s["answer_text"] is None for s in self.samples),
                "unscored": sum(bool(s.get("unscored")) for s in self.samples),
                "tied_head_steps": sum(s.get("tied_head_steps", 0) for s in self.samples)}


@dataclass
class Run:
    """One run of a task on a loaded model: what every stage of the engine reads."""

    task: Task
    options: DetectOptions  # the task's own options dataclass
    loaded: loading.LoadedModel
    chat: bool  # the prompts are wrapped in the chat template
    samples: list  # the task's Samples, not yet tokenised
    scorers: list
    stop: StopRule
    encoded: dict = field(default_factory=dict)  # index -> encoded prompt, sized before the check (fits_context)

    @cached_property
    def keys(self) -> list[str]:
        """Every head's id, "LAYER-HEAD" with the layer's real index, attention layer by attention layer: the order
        of the scorers' dense (layers, heads) grid, slot i being the i-th attention layer."""
        return model_head_keys(self.loaded.model)


def model_head_keys(model) -> list[str]:
    layout = attention_layout(model)
    return outputs.head_keys(layout.layers, layout.heads)


def model_name_of(options, loaded: loading.LoadedModel | None) -> str:
    """The name the run's files carry, known before the model loads."""
    return loaded.name if loaded is not None else loading.model_name(loading.model_path(options.model))


def run_identity(task: str, options, loaded: loading.LoadedModel | None, model: dict | None = None) -> dict:
    """What makes the run's numbers besides its options (identity.py): the model's and tokenizer's fingerprints
    (`model`: model_identity's, when already taken) and the contents of every data file the task reads; known
    before the model loads."""
    model = model or model_identity(options, loaded)
    return model | {"data": identity.of_data(data_files(TASKS[task], options))}


def model_identity(options, loaded: loading.LoadedModel | None) -> dict:
    path = loaded.path if loaded is not None else loading.model_path(options.model)
    return identity.of_model(path, loaded)


def head_ids_before_loading(options, loaded: loading.LoadedModel | None, score_files: list) -> list[str] | None:
    """The model's head ids, before its weights load (so that a wrong score file or K is refused first); None when
    the config cannot be read here: loading the model then says why. `score_files`: the HeadScores given.

    A config does not say which layers of a hybrid have attention. The layers the score files name as such
    (HeadScores.named_attention_layers, asked only here, when the config was read) cut the config's layers x heads
    to those layers (another model's head count, a layer the model lacks and a K beyond the heads are still
    refused here; the loaded model's own ids decide the rest)."""
    from transformers import AutoConfig

    if loaded is not None:
        return model_head_keys(loaded.model)
    try:
        config = AutoConfig.from_pretrained(loading.model_path(options.model),
                                            trust_remote_code=options.trust_remote_code).get_text_config(decoder=True)
    except (OSError, ValueError):
        return None
    layers, heads = config_count(config, LAYER_COUNT), config_count(config, HEAD_COUNT)
    if not layers or not heads:
        return None
    named = {layer for scores in score_files for layer in scores.named_attention_layers}
    return outputs.head_keys([layer for layer in range(layers) if not named or layer in named], heads)



def task_options(task: str, options=None, **overrides):
    """The task's options dataclass, from any options object (the fields they share) and overrides by name."""
    if task not in TASKS:
        raise HeadscopeError(f"unknown task {task!r}: choose from {', '.join(TASKS)}")
    refuse_conflicts(TASKS[task].options, set(overrides) | (given_fields(options) if options is not None else set()))
    options = build(TASKS[task].options, options, **overrides)
    validate(options)
    if Path(options.out).exists() and not Path(options.out).is_dir():
        raise HeadscopeError(f"--out {options.out} is a file, not a folder")
    return options


@contextlib.contextmanager
def quiet_loading(quiet: bool):
    """quiet: no progress bar of transformers' either while the weights load."""
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    if quiet:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and shown:
            transformers_logging.enable_progress_bar()


def refuse_filter_flags(task: Task, given: set[str]) -> None:
    """A task without a success filter (every sample counts) has no use for the filter's flags: given on the
    command line, they are refused, not ignored (code that passes one set of options to every task may pass them)."""
    if task.success_filter:
        return
    used = sorted(spec.name for spec in dataclasses.fields(task.options)
                  if spec.metadata.get("success_filter") and spec.name in given)
    if used:
        raise HeadscopeError(f"the {task.name} task has no success filter (every sample counts): "
                             f"{flag_of(task.options, used[0])} does nothing there")


TORCH_THREADS = torch.get_num_threads()  # torch's own default (the machine's cores), before anyone changes it


def use_threads(threads: int | None) -> int:
    """Set torch's CPU threads: --threads, else the cores no other work keeps busy (at least 1). On a busy
    machine torch's default (every core) is several times slower: its threads wait for each other while other
    processes hold the cores (benchmarks/threads.py)."""
    threads = threads if threads is not None else idle_cores()
    torch.set_num_threads(threads)
    return threads


@functools.lru_cache(maxsize=1)
def idle_cores() -> int:
    """The cores no other work keeps busy, read once per process: later runs of the same process (specificity's
    tasks, an API program's calls) would count headscope's own threads in the load as other work."""
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(TORCH_THREADS, round(TORCH_THREADS - busy)))


@contextlib.contextmanager
def kept_threads():
    """Put torch's CPU threads back as they were when a command or an API call returns (start_run changes them): a
    program calling headscope keeps its own setting. Also a decorator (`@kept_threads()`)."""
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


def start_run(task: str, options, loaded: loading.LoadedModel | None, command: str = "detect",
              scorers: list = (), check_it: bool = True, done: frozenset = frozenset()) -> Run:
    """Load the model (unless given), build the samples, run the exactness check (with `scorers`, the scorers
    that read the decode, on the run's first prompts). The prompts still to decode (those of this shard not in
    `done`, the ids every scorer's file holds) are sized before the weights load and before the check."""
    use_threads(options.threads)  # the API picks as the command line does (given, else the idle cores); the
    # public functions calling this are @kept_threads(), so the caller's setting comes back on return
    prepared = None
    if loaded is None:
        prepared = prepared_before_loading(task, options, done)
        with quiet_loading(options.quiet):
            loaded = loading.load(options.model, options.dtype, options.device, options.attn, options.trust_remote_code)
    needs = {"ablate": "mask its heads", "kv": "replay a KV cache policy on it"}.get(command)
    if needs and loaded.eager_fallback:  # masking and KV policies live in headscope's attention function
        raise HeadscopeError(f"{type(loaded.model).__name__} does not use transformers' attention interface, so "
                             f"headscope cannot {needs}")
    chat, samples, encoded = prepared or (*built_samples(task, options, loaded.tokenizer, loaded.path,
                                                         loaded.max_context), {})
    stop = StopRule(eos_token_ids(loaded.model, loaded.tokenizer),
                    newline_token_ids(loaded.tokenizer) if options.stop_at_newline else set())
    run = Run(TASKS[task], options, loaded, chat, samples, list(scorers), stop, encoded)
    if options.batch_size > 1 and batch_size(run) == 1:
        notify(f"{type(loaded.model).__name__} gives a left-padded prompt other logits than the prompt alone (it "
               "ignores position_ids): its prompts are decoded one at a time, whatever --batch-size")
    if options.check and check_it:
        fits_context(run, done)
        case = scorer_case(run) if run.scorers else None
        check.require(loaded, command, need_ablation=command == "ablate", cases=[case] if case else [])
    return run


def built_samples(task: str, options, tokenizer, path: str, max_context: int | None) -> tuple[bool, list]:
    """(chat, the task's samples) for the model at `path`: the builder sees the model actually loaded (a Python-API
    `loaded` model too), e.g. to pick default data."""
    chat = use_chat(options, tokenizer)
    # chat: False, True, or the chat template's keyword arguments (a non-empty dict is "on, with these").
    built_with = dataclasses.replace(options, chat=(options.chat_template_kwargs or True) if chat else False,
                                     model=path)
    samples = TASKS[task].build(built_with, tokenizer, max_context)
    if not samples:
        raise HeadscopeError("the task produced no samples: check the data and the grid options")
    return chat, samples


def prepared_before_loading(task: str, options, done: frozenset) -> tuple[bool, list, dict] | None:
    """(chat, samples, the encoded prompts still to decode), built and sized with the model's tokenizer and config
    alone: a prompt longer than the model is refused before its weights load (minutes, on a large model). None
    when they cannot be read on their own (loading the model then says why)."""
    from transformers import AutoConfig, AutoTokenizer

    path = loading.model_path(options.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=options.trust_remote_code)
        config = AutoConfig.from_pretrained(path, trust_remote_code=options.trust_remote_code)
    except (OSError, ValueError, ImportError, KeyError):
        return None
    max_context = loading.max_context_of(config)
    chat, samples = built_samples(task, options, tokenizer, path, max_context)
    sizing = Sizing(tokenizer, max_context, options.max_new_tokens, TASKS[task].span_overlap_threshold)
    return chat, samples, sizing.encode(samples, still_to_do(options, samples, done), {})


def still_to_do(options, samples: list, done: frozenset) -> list[int]:
    """The indices of the samples this process decodes: its shard's (or all), but those already `done`."""
    shard = parse_shard(options.shard)
    return [index for index, sample in enumerate(samples)
            if (shard is None or index % shard[1] == shard[0]) and sample.id not in done]


def fits_context(run: Run, done: frozenset) -> None:
    """Every prompt this process will decode is encoded and sized before the check runs the model on any: a
    prompt longer than the model's context is refused in one line, not after the check has run on it (a
    560K-token record took the check minutes and gigabytes first). The prompts are kept for the decode."""
    run.encoded.update(encode_samples(run, still_to_do(run.options, run.samples, done)))


def scorer_case(run: Run) -> check.ScorerCase | None:
    """The run's scorers on its first two prompts (those whose span is found), for the check's scorers figure; None
    when no prompt's span is found (the run would score nothing: its rows say why)."""
    first, index = [], 0
    while len(first) < 2 and index < len(run.samples):
        prompt = encode_samples(run, [index])[index]  # sized: the check never runs on a prompt too long
        if decodable(run, prompt):
            first.append((index, run.samples[index], prompt))
        index += 1
    if not first:
        return None
    batch, attention_mask = prompt_batch(run, first)
    names = [scorer.name for scorer in run.scorers or make_scorers(run.task, run.options)]
    label = run.task.name if names == [run.task.name] else f"{run.task.name} {','.join(names)}"
    return check.ScorerCase(label, lambda: make_scorers(run.task, run.options), batch, attention_mask)


def batch_size(run: Run) -> int:
    """--batch-size, but 1 for a model whose logits depend on left padding (it ignores position_ids, layout.py):
    batching must never change a sample's numbers."""
    return run.options.batch_size if attention_layout(run.loaded.model).left_padding else 1


def make_scorers(task: Task, options) -> list:
    names = [n.strip() for n in (options.scorer or task.default_scorer).split(",") if n.strip()]
    scorers = [load_scorer(name, options) for name in names]
    labels = [scorer.name for scorer in scorers]
    if len(set(labels)) != len(labels):
        raise HeadscopeError(f"--scorer names a scorer twice: {options.scorer}")
    return scorers


@kept_threads()
def detect(task: str, options: DetectOptions | None = None, loaded: loading.LoadedModel | None = None,
           **overrides) -> DetectResult:
    """Run one detection and write its files. `overrides` set the task's options fields by name.

    With several scorers (`scorer="retrieval,r2"`) every scorer reads the same generation; the result
    is the first scorer's, the others' are in `result.by_scorer`. The run holds its files' lock throughout,
    and decides resume or refuse before the model loads.
    """
    options = task_options(task, options, **overrides)
    started = time.time()
    scorers = make_scorers(TASKS[task], options)
    shard = parse_shard(options.shard)
    name = model_name_of(options, loaded)
    made_of = run_identity(task, options, loaded)
    run_id = store.run_id(task, dataclasses.asdict(options), identity.digests(made_of))
    prefixes = {scorer.name: f"{name}_{outputs.file_label(task, scorer.name)}" for scorer in scorers}
    paths = {scorer: outputs.prefix_paths(options.out, prefix, shard) for scorer, prefix in prefixes.items()}
    with writer_locks(options.out, [store.lock_name(prefix, shard) for prefix in prefixes.values()]):
        settings = (task, dataclasses.asdict(options))
        stores = {}
        try:
            for scorer in scorers:
                stores[scorer.name] = store.RunStore(paths[scorer.name], run_id, options.overwrite, options.append,
                                                     settings, made_of)
            done = frozenset.intersection(*(frozenset(runs.done) for runs in stores.values()))
            run = start_run(task, options, loaded, scorers=scorers, done=done)
            result = run_and_write(run, stores, shard, (run_id, made_of), started)
            result.locks = [store.lock_name(prefix, shard) for prefix in prefixes.values()]
            return result
        finally:
            for runs in stores.values():
                runs.close()


def run_and_write(run: Run, stores: dict, shard, made: tuple[str, dict], started: float) -> DetectResult:
    """Decode this shard's samples not yet in the files and write every scorer's files; the first write comes
    after the prompts are built and checked. made: (run id, identity)."""
    run_id = made[0]
    mine = [index for index in range(len(run.samples)) if shard is None or index % shard[1] == shard[0]]
    for runs in stores.values():
        runs.refuse_repeated_samples(run.samples[index].id for index in mine)
    todo = [i for i in mine if any(run.samples[i].id not in runs.done for runs in stores.values())]
    complete = not todo and all(runs.finished for runs in stores.values())
    if complete:  # nothing to do, and nothing is rewritten
        notify(f"this run ({run_id}) is already complete in {run.options.out}")
    else:
        encoded = encode_samples(run, todo)  # this shard's, still to do
        info = manifest(run, started, made, shard)
        for scorer in run.scorers:
            stores[scorer.name].begin(run.keys, info | {"scorer": scorer.name})
        decode_all(run, encoded, len(mine), todo, stores)
    results = {}
    for scorer in run.scorers:
        runs = stores[scorer.name]
        if complete:
            heads, summary = store.derive_heads_and_summary(runs.paths, runs.rows, run.keys)
        else:
            heads, summary = runs.finish(run.keys, info | {"scorer": scorer.name,
                                                            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                                         | tie_totals(runs.rows, run_id))
        this_run = [row for row in runs.rows if row.get("run") == run_id]
        files = {kind: path for kind, path in runs.paths.items()  # the legacy base heads only where there are any
                 if kind != "base_heads" or path.exists()}
        results[scorer.name] = DetectResult(heads, summary, this_run, files, complete=complete)
    first = results[run.scorers[0].name]
    first.by_scorer = results
    return first


def tie_totals(rows: list[dict], run_id: str) -> dict:
    """The manifest's count of the run's head-steps whose top-k row held a tie the rule settled (ties.py), over
    the run's samples that counted them; {} when its scorers read no top-k."""
    counted = [row["tied_head_steps"] for row in rows if row.get("run") == run_id and "tied_head_steps" in row]
    return {"tied_head_steps": sum(counted)} if counted else {}


def use_chat(options: DetectOptions, tokenizer) -> bool:
    """--chat on / off, or auto: on when the tokenizer has a chat template."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if options.chat == "on" and not has_template:
        raise HeadscopeError("--chat on, but the tokenizer has no chat template")
    return options.chat == "on" or (options.chat == "auto" and has_template)


def encode_samples(run: Run, indices) -> dict:
    """{index: encoded prompt} for the samples at `indices` (a shard's, still to do: never the whole grid on
    every rank); checks that each fits the model's context."""
    sizing = Sizing(run.loaded.tokenizer, run.loaded.max_context, run.options.max_new_tokens,
                    run.task.span_overlap_threshold)
    return sizing.encode(run.samples, indices, run.encoded)


LONG_SEQUENCE_WARNING = "sequence-length-is-longer-than-the-specified-maximum"  # transformers' key for it


@dataclass
class Sizing:
    """What encoding and sizing a prompt needs: the tokenizer, the model's context, the decoding budget and the
    task's span-overlap threshold."""

    tokenizer: object
    max_context: int | None
    budget: int
    threshold: float

    def encode(self, samples: list, indices, known: dict) -> dict:
        """{index: encoded prompt} (those in `known` reused), each checked to fit the model's context."""
        # A prompt too long is refused below in one line naming the sample: transformers' own warning about it (a
        # second line, given once per tokenizer) is marked as given.
        getattr(self.tokenizer, "deprecation_warnings", {})[LONG_SEQUENCE_WARNING] = True
        encoded = {}
        for index in indices:
            sample = samples[index]
            prompt = known[index] if index in known else encode_with_span(self.tokenizer, sample, self.threshold)
            if self.max_context and len(prompt.input_ids) + self.budget > self.max_context:
                raise HeadscopeError(f"sample {sample.id}: {len(prompt.input_ids)} prompt tokens + {self.budget} new "
                                     f"tokens exceed the model's maximum context of {self.max_context}")
            if len(prompt.input_ids) == 0:
                raise HeadscopeError(f"sample {sample.id}: the prompt is empty")
            encoded[index] = prompt
        return encoded


def all_items(run: Run) -> list[tuple]:
    """(index, sample, encoded prompt) of every sample: what a command that re-runs the whole grid decodes."""
    encoded = encode_samples(run, range(len(run.samples)))
    return [(index, sample, encoded[index]) for index, sample in enumerate(run.samples)]


def decode_all(run: Run, encoded: dict, total: int, todo: list[int], stores: dict) -> None:
    """Decode the samples still to do, batch by batch, appending each finished one to every scorer's file."""
    options, scorers = run.options, run.scorers
    primary = stores[scorers[0].name]
    running = RunningTop(run.keys, store.derive_heads(primary.rows, run.keys))
    progress = tqdm(total=total, initial=total - len(todo), desc=printable(f"{run.task.name} {run.loaded.name}"),
                    unit="sample", disable=options.quiet, file=sys.stderr)
    size = batch_size(run)
    for first in range(0, len(todo), size):
        items = [(index, run.samples[index], encoded[index]) for index in todo[first:first + size]]
        for row, per_scorer in run_batch(run, items, scorers):
            for scorer in scorers:
                runs = stores[scorer.name]
                if row["id"] not in runs.done:
                    per_head, unscored, fields = per_scorer.get(scorer.name, (None, None, {}))
                    runs.append({"run": runs.run, **row, "scorer": scorer.name, "keep_zeros": scorer.keep_zeros,
                                 "head_scores": None if per_head is None or unscored else values(per_head)}
                                | ({"unscored": unscored} if unscored else {}) | fields)
            progress.update(1)
            if row["passed"] and not options.quiet:
                tqdm.write("top-10: " + running.add(primary.rows[-1]), file=sys.stderr)
    progress.close()


def values(per_head: torch.Tensor) -> list[list[float | None]]:
    """(layers, heads) scores as JSON lists; NaN (no value for that head) is null."""
    return [[None if math.isnan(value) else value for value in layer] for layer in per_head.tolist()]


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """"I/N" -> (I, N): this process runs samples I, I+N, I+2N, ... of the grid."""
    if text is None:
        return None
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise HeadscopeError(f"--shard must look like I/N (e.g. 0/4), not {text!r}") from None
    if not 0 <= index < count:
        raise HeadscopeError(f"--shard {text}: I must be between 0 and N-1")
    return index, count


class RunningTop:
    """The running top-10 printed after each passing sample, from running sums (not a re-summary)."""

    def __init__(self, keys: list[str], heads: dict[str, list[float]]):
        self.keys = keys
        self.total = torch.tensor([sum(heads[k]) for k in keys], dtype=torch.float64)
        self.count = torch.tensor([len(heads[k]) for k in keys])

    def add(self, row: dict) -> str:
        flat = [score for layer in row["head_scores"] for score in layer]
        kept = torch.tensor([store.joins_list(score, row["keep_zeros"]) for score in flat])
        self.total += torch.tensor([score if ok else 0.0 for score, ok in zip(flat, kept.tolist())],
                                   dtype=torch.float64)
        self.count += kept
        mean = self.total / self.count.clamp(min=1)
        top = mean.topk(min(10, len(self.keys))).indices.tolist()
        return "  ".join(f"{self.keys[i]} {mean[i]:.3f}" for i in top)


def decodable(run: Run, prompt) -> bool:
    """Whether run_batch decodes this encoded prompt: not a needle it cannot locate."""
    return prompt.span is not None or not run.task.span_required


def run_batch(run: Run, items: list, scorers: list):
    """Decode a batch of (index, sample, encoded prompt); yield each sample's row and {scorer: (layers, heads)}."""
    started = time.time()
    runnable = []
    for index, sample, prompt in items:
        if not decodable(run, prompt):  # a needle we cannot find is an error, not a zero
            error = f"could not locate {sample.span_text!r} in the prompt"
            yield {"index": index} | sample_row(run, sample, prompt, dict(response="", score=0.0, passed=False,
                                                                          error=error, seconds=0.0)), {}
        else:
            runnable.append((index, sample, prompt))
    if not runnable:
        return
    loaded = run.loaded
    batch, attention_mask = prompt_batch(run, runnable)
    input_ids = batch.input_ids
    ties = [TieCount()] if any(scorer.reads_top_k for scorer in scorers) else []  # head-steps a tie touched
    for scorer in scorers + ties:
        scorer.begin(batch, *num_layers_and_heads(loaded.model))
    generated = greedy_decode(loaded.model, input_ids, attention_mask, scorers + ties, run.options.max_new_tokens,
                              run.stop, loaded.eager_fallback)
    per_scorer = {scorer.name: (scorer.result().float().cpu(), scorer.unscored, scorer.sample_fields())
                  for scorer in scorers}
    tied = ties[0].per_sample() if ties else None
    seconds = (time.time() - started) / len(runnable)
    for i, (index, sample, prompt) in enumerate(runnable):
        response = loaded.tokenizer.decode(generated[i], skip_special_tokens=True).strip()
        outcome = judge(run, sample, response) | dict(error=None, seconds=seconds)
        if getattr(run.options, "think_end", None) is not None or segments_by_template(run):
            markers = think_markers(loaded.tokenizer, run.options.think_start, run.options.think_end)
            sequence = list(prompt.input_ids) + generated[i]
            outcome |= locate(loaded.tokenizer, sequence, len(prompt.input_ids), *markers).spans()
        if tied is not None:
            outcome["tied_head_steps"] = tied[i]
        row = sample_row(run, sample, prompt, outcome)
        yield {"index": index} | row, {name: (scores[i], unscored.get(i), fields.get(i, {}))
                                       for name, (scores, unscored, fields) in per_scorer.items()}


def prompt_batch(run: Run, runnable: list) -> tuple[PromptBatch, torch.Tensor | None]:
    """The (index, sample, encoded prompt) items left-padded into one batch for the scorers, and the padding mask
    (None for a batch of one)."""
    loaded = run.loaded
    device = loaded.device
    width = max(len(prompt.input_ids) for _, _, prompt in runnable)
    input_ids = torch.full((len(runnable), width), loaded.pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(runnable), width), dtype=torch.long)
    span = torch.zeros(2, len(runnable), dtype=torch.long)  # start, end; empty when there is no span
    pad = torch.zeros(len(runnable), dtype=torch.long)
    for i, (_, _, prompt) in enumerate(runnable):
        pad[i] = width - len(prompt.input_ids)  # left padding: every prompt ends at position width - 1
        input_ids[i, pad[i]:] = torch.tensor(prompt.input_ids)
        attention_mask[i, pad[i]:] = 1
        if prompt.span is not None:
            span[:, i] = torch.tensor(prompt.span) + pad[i]
    input_ids = input_ids.to(device)
    batch = PromptBatch(input_ids, width, span[0].to(device), span[1].to(device), pad.to(device),
                        [sample for _, sample, _ in runnable], loaded.tokenizer)
    return batch, attention_mask.to(device) if len(runnable) > 1 else None


def segments_by_template(run: Run) -> bool:
    """The reasoning task on a model whose chat template has a thinking block: rows record the segments."""
    return hasattr(run.options, "think_end") and run.chat and \
        "</think>" in (getattr(run.loaded.tokenizer, "chat_template", None) or "")


def judge(run: Run, sample, response: str) -> dict:
    """response, score, passed, and answer_text (what was judged) when an answer is extracted."""
    options = run.options
    extracting = options.answer_marker is not None or options.answer_from != "full"
    answer = extract_answer(response, options.answer_from, options.answer_marker) if extracting else response
    score = 0.0 if answer is None else score_response(options.metric, sample.answer, answer, options.metric_model,
                                                        options.trust_remote_code)
    passed = (answer is not None and passes(score, options.success_threshold)) or not run.task.success_filter
    return {"response": response, "score": score, "passed": passed} | ({"answer_text": answer} if extracting else {})


def sample_row(run: Run, sample, prompt, outcome: dict) -> dict:
    """A samples.jsonl row; outcome: response, score, passed, error, seconds, and answer_text if extracted."""
    row = {"id": sample.id, "task": run.task.name, **sample.meta, "reference": sample.answer,
           "prompt_tokens": len(prompt.input_ids),
           "span": list(prompt.span) if prompt.span else None, "span_method": prompt.method,
           "excerpt": excerpt(run.loaded.tokenizer, prompt.input_ids, prompt.span),
           "response": outcome["response"], "score": outcome["score"], "passed": outcome["passed"],
           "error": outcome["error"], "duration_s": round(outcome["seconds"], 4)}
    for key in ("answer_text", "think_span", "answer_span", "tied_head_steps"):  # answer_text None: it fails
        if key in outcome:
            row[key] = outcome[key]
    if run.options.save_prompts:
        row["prompt"] = sample.prompt
    return row


def device_name(device: torch.device) -> str:
    """The device the model ran on, with the accelerator's name (numbers can differ between cards and kernels)."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({platform.machine()})"


def manifest(run: Run, started: float, made: tuple[str, dict], shard) -> dict:
    """What made the run's numbers (model, tokenizer and data fingerprints, options, versions, device, dtype) and
    what it covers (heads, grid, shard)."""
    run_id, made_of = made
    versions = {}
    for package in ("headscope", "torch", "transformers", "tokenizers", "rouge-score"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    loaded = run.loaded
    return {
        "task": run.task.name,
        "options": dataclasses.asdict(run.options),
        "model_path": os.path.abspath(loaded.path) if os.path.isdir(loaded.path) else loaded.path,  # any cwd
        "model_revision": getattr(loaded.model.config, "_commit_hash", None),
        "identity": made_of,
        "dtype": str(loaded.model.dtype).removeprefix("torch."),
        "device": device_name(loaded.device),
        "attention": loaded.attention,
        "chat_template": run.chat,
        "prompt_template": run.task.prompt_template(run.chat),
        "seed": run.options.seed,
        "versions": versions,
        "python": platform.python_version(),
        "run": run_id,
        "shard": f"{shard[0]}/{shard[1]}" if shard else None,
        "heads": run.keys,
        "layers": attention_layout(loaded.model).total_layers,  # the heads' layers are the attention layers only
        "attention_layers": list(attention_layout(loaded.model).layers),
        "grid_size": len(run.samples),  # merge checks that the shards cover it exactly once
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "finished": None,
    }
