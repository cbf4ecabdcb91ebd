"""The one engine every task and scorer shares:
load -> build prompts -> generate with the recorder -> score -> accumulate -> write.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from . import check, loading, outputs, store
from .decode import StopRule, eos_token_ids, greedy_decode, newline_token_ids, num_layers_and_heads
from .errors import HeadscopeError
from .metrics import METRICS, score_response
from .scorers import PromptBatch, load_scorer
from .spans import encode_with_span
from .tasks import TASKS, prompt_template



@dataclass
class DetectOptions:
    """Every option of `headscope detect`; the CLI flags have the same names."""

    model: str | None = None  # None: the bundled organism
    dtype: str = "auto"
    device: str = "auto"
    attn: str = "sdpa"
    trust_remote_code: bool = False
    max_new_tokens: int | None = None  # None: the task's default (retrieval 50, reasoning 100)
    out: str = "head_scores"
    overwrite: bool = False
    save_prompts: bool = False
    chat: str = "auto"  # auto | on | off
    stop_at_newline: bool = True
    success_threshold: float = 50.0
    metric: str = "rouge1"
    keep_zeros: bool = False
    batch_size: int = 1
    seed: int = 0
    length_buffer: int = 200
    context_lengths: list[int] | None = None
    min_length: int = 1000
    max_length: int | None = 50000
    num_lengths: int = 20
    # retrieval
    haystack: str | None = None
    needles: str | None = None
    depths: list[float] | None = None
    num_depths: int = 10
    depth_spacing: str = "linear"
    # reasoning
    data: str | None = None
    fields: dict | None = None
    num_samples: int | None = None
    top_k: int = 5
    generated_weight: float = 1.0
    query_weight: float = 0.5
    # pattern
    block_length: int = 32
    block_repeats: int = 4
    quiet: bool = False
    append: bool = False  # add this run to a folder that holds a run with other settings
    scorer: str | None = None  # comma-separated scorer names or module:Class (default: the task's own)
    shard: str | None = None  # "I/N": run every N-th sample from the I-th (merge the shards with `headscope merge`)
    check: bool = True  # run `headscope check`'s figures on the model before the run, and refuse if it fails


@dataclass
class DetectResult:
    heads: dict[str, list[float]]  # every head's list: all runs in the folder (and a legacy base file)
    summary: dict[str, dict]
    samples: list[dict]  # this run's rows of samples.jsonl
    paths: dict = field(default_factory=dict)
    by_scorer: dict = field(default_factory=dict)  # scorer name -> DetectResult, when several ran together

    @property
    def counts(self) -> dict[str, int]:
        return {"run": len(self.samples), "passed": sum(s["passed"] for s in self.samples),
                "span_errors": sum(s["error"] is not None for s in self.samples)}


def check_options(task: str, options: DetectOptions) -> None:
    if task not in TASKS:
        raise HeadscopeError(f"unknown task {task!r}: choose from {', '.join(TASKS)}")
    if options.metric not in METRICS:
        raise HeadscopeError(f"--metric must be one of {', '.join(METRICS)}, not {options.metric!r}")
    if options.chat not in ("auto", "on", "off"):
        raise HeadscopeError(f"--chat must be auto, on or off, not {options.chat!r}")
    for name in ("batch_size", "top_k", "num_depths", "num_lengths"):
        if getattr(options, name) < 1:
            raise HeadscopeError(f"--{name.replace('_', '-')} must be at least 1")
    if options.max_new_tokens is not None and options.max_new_tokens < 1:
        raise HeadscopeError("--max-new-tokens must be at least 1")


def make_scorers(task: str, options: DetectOptions) -> list:
    names = [n.strip() for n in (options.scorer or TASKS[task].default_scorer).split(",") if n.strip()]
    scorers = [load_scorer(name, options) for name in names]
    labels = [scorer.name for scorer in scorers]
    if len(set(labels)) != len(labels):
        raise HeadscopeError(f"--scorer names a scorer twice: {options.scorer}")
    return scorers


def file_label(task: str, scorer) -> str:
    """Files are NAME_TASK_* for the task's own scorer and NAME_TASK_SCORER_* for any other."""
    return task if scorer.name == TASKS[task].default_scorer else f"{task}_{scorer.name}"


def detect(task: str, options: DetectOptions | None = None, loaded: loading.LoadedModel | None = None,
           **overrides) -> DetectResult:
    """Run one detection and write its files. `overrides` set DetectOptions fields by name.

    With several scorers (`scorer="retrieval,r2"`) every scorer reads the same generation; the result
    is the first scorer's, the others' are in `result.by_scorer`.
    """
    options = dataclasses.replace(options or DetectOptions(), **overrides)
    check_options(task, options)
    started = time.time()
    scorers = make_scorers(task, options)
    loaded = loaded or loading.load(options.model, options.dtype, options.device, options.attn,
                                    options.trust_remote_code)
    if options.check:
        check.require(loaded, "detect", need_ablation=False)
    chat = use_chat(options, loaded.tokenizer)
    samples = build_samples(task, options, loaded, chat)
    max_new_tokens = options.max_new_tokens or TASKS[task].default_max_new_tokens

    shard = parse_shard(options.shard)
    mine = [index for index in range(len(samples)) if shard is None or index % shard[1] == shard[0]]
    num_layers, num_heads = num_layers_and_heads(loaded.model)
    keys = [outputs.head_key(layer, head) for layer in range(num_layers) for head in range(num_heads)]
    run = store.run_id(task, dataclasses.asdict(options), loaded.name)
    stores = {}
    try:
        for scorer in scorers:
            paths = outputs.output_paths(options.out, loaded.name, file_label(task, scorer), shard)
            stores[scorer.name] = store.RunStore(paths, run, keys, options.overwrite, options.append)
        todo = [i for i in mine if any(samples[i].id not in runs.done for runs in stores.values())]
        if options.append and not todo:
            raise HeadscopeError(f"this run ({run}) is already complete in {options.out}: nothing to append")
        encoded = encode_samples(task, samples, todo, loaded, max_new_tokens)  # this shard's, still to do
        info = manifest(task, options, loaded, chat, started, run, keys, shard)
        for scorer in scorers:
            outputs.atomic_write_json(stores[scorer.name].paths["manifest"], info | {"scorer": scorer.name})
        decode_all(loaded, task, options, samples, encoded, mine, todo, scorers, stores, max_new_tokens, keys)
    finally:
        for runs in stores.values():
            runs.close()

    results = {}
    for scorer in scorers:
        runs = stores[scorer.name]
        heads, summary = store.write_derived(runs.paths, runs.rows, keys)
        finished = info | {"scorer": scorer.name, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        outputs.atomic_write_json(runs.paths["manifest"], finished)
        this_run = [row for row in runs.rows if row.get("run") == run]
        results[scorer.name] = DetectResult(heads, summary, this_run, runs.paths)
    first = results[scorers[0].name]
    first.by_scorer = results
    return first


def use_chat(options: DetectOptions, tokenizer) -> bool:
    """--chat on / off, or auto: on when the tokenizer has a chat template."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if options.chat == "on" and not has_template:
        raise HeadscopeError("--chat on, but the tokenizer has no chat template")
    return options.chat == "on" or (options.chat == "auto" and has_template)


def stop_rule(loaded, options: DetectOptions) -> StopRule:
    return StopRule(eos_token_ids(loaded.model, loaded.tokenizer),
                    newline_token_ids(loaded.tokenizer) if options.stop_at_newline else set())


def build_samples(task, options, loaded, chat) -> list:
    """The task's samples (prompt texts and spans), not yet tokenised."""
    samples = TASKS[task].build(dataclasses.replace(options, chat=chat), loaded.tokenizer, loaded.max_context)
    if not samples:
        raise HeadscopeError("the task produced no samples: check the data and the grid options")
    return samples


def encode_samples(task, samples, indices, loaded, max_new_tokens) -> dict:
    """{index: encoded prompt} for the samples at `indices` (a shard's, still to do: never the whole grid on
    every rank); checks that each fits the model's context."""
    encoded = {}
    for index in indices:
        sample = samples[index]
        prompt = encode_with_span(loaded.tokenizer, sample, TASKS[task].span_overlap_threshold)
        if loaded.max_context and len(prompt.input_ids) + max_new_tokens > loaded.max_context:
            raise HeadscopeError(f"sample {sample.id}: {len(prompt.input_ids)} prompt tokens + {max_new_tokens} new "
                                 f"tokens exceed the model's maximum context of {loaded.max_context}")
        if len(prompt.input_ids) == 0:
            raise HeadscopeError(f"sample {sample.id}: the prompt is empty")
        encoded[index] = prompt
    return encoded


def prepare_samples(task, options, loaded, chat):
    """Every sample of the task, tokenised: (samples, encoded prompts, max_new_tokens). For ablation's arms."""
    samples = build_samples(task, options, loaded, chat)
    max_new_tokens = options.max_new_tokens or TASKS[task].default_max_new_tokens
    encoded = encode_samples(task, samples, range(len(samples)), loaded, max_new_tokens)
    return samples, [encoded[index] for index in range(len(samples))], max_new_tokens


def decode_all(loaded, task, options, samples, encoded, mine, todo, scorers, stores, max_new_tokens, keys):
    """Decode the samples still to do, batch by batch, appending each finished one to every scorer's file."""
    stop = stop_rule(loaded, options)
    primary = stores[scorers[0].name]
    running = RunningTop(keys, store.derive_heads(primary.rows, keys))
    progress = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"{task} {loaded.name}", unit="sample",
                    disable=options.quiet, file=sys.stderr)
    for first in range(0, len(todo), options.batch_size):
        items = [(index, samples[index], encoded[index]) for index in todo[first:first + options.batch_size]]
        for row, per_scorer in run_batch(loaded, items, scorers, max_new_tokens, stop, task, options):
            for scorer in scorers:
                runs = stores[scorer.name]
                if row["id"] not in runs.done:
                    per_head = per_scorer.get(scorer.name)
                    runs.append({"run": runs.run, **row, "scorer": scorer.name, "keep_zeros": scorer.keep_zeros,
                                 "head_scores": None if per_head is None else per_head.tolist()})
            progress.update(1)
            if row["passed"] and not options.quiet:
                tqdm.write("top-10: " + running.add(primary.rows[-1]), file=sys.stderr)
    progress.close()


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
        scores = torch.tensor(row["head_scores"], dtype=torch.float64).flatten()
        kept = torch.ones_like(scores, dtype=torch.bool) if row["keep_zeros"] else scores > 0
        self.total += torch.where(kept, scores, 0.0)
        self.count += kept
        mean = self.total / self.count.clamp(min=1)
        top = mean.topk(min(10, len(self.keys))).indices.tolist()
        return "  ".join(f"{self.keys[i]} {mean[i]:.3f}" for i in top)


def run_batch(loaded, items, scorers, max_new_tokens, stop, task, options):
    """Decode a batch of (index, sample, encoded prompt); yield each sample's row and {scorer: (layers, heads)}."""
    started = time.time()
    runnable = []
    for index, sample, prompt in items:
        if prompt.span is None and TASKS[task].span_required:  # a needle we cannot find is an error, not a zero
            yield {"index": index} | sample_row(sample, prompt, task, options, response="", score=0.0, passed=False,
                                                error=f"could not locate {sample.span_text!r} in the prompt",
                                                seconds=0.0), {}
        else:
            runnable.append((index, sample, prompt))
    if not runnable:
        return
    device = loaded.device
    width = max(len(prompt.input_ids) for _, _, prompt in runnable)
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(runnable), width), pad_id, dtype=torch.long)
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
                        [sample for _, sample, _ in runnable])
    for scorer in scorers:
        scorer.begin(batch, *num_layers_and_heads(loaded.model))
    generated = greedy_decode(loaded.model, input_ids, attention_mask.to(device) if len(runnable) > 1 else None,
                              scorers, max_new_tokens, stop, loaded.eager_fallback)
    per_scorer = {scorer.name: scorer.result().float().cpu() for scorer in scorers}  # each (batch, layers, heads)
    seconds = (time.time() - started) / len(runnable)
    for i, (index, sample, prompt) in enumerate(runnable):
        response = loaded.tokenizer.decode(generated[i], skip_special_tokens=True).strip()
        score = score_response(options.metric, sample.answer, response)
        passed = score > options.success_threshold or not TASKS[task].success_filter
        row = sample_row(sample, prompt, task, options, response, score, passed, None, seconds)
        yield {"index": index} | row, {name: scores[i] for name, scores in per_scorer.items()}


def sample_row(sample, prompt, task, options, response, score, passed, error, seconds) -> dict:
    row = {"id": sample.id, "task": task, **sample.meta, "prompt_tokens": len(prompt.input_ids),
           "span": list(prompt.span) if prompt.span else None, "span_method": prompt.method,
           "response": response, "score": score, "passed": passed, "error": error, "duration_s": round(seconds, 4)}
    if options.save_prompts:
        row["prompt"] = sample.prompt
    return row


def manifest(task, options, loaded, chat, started, run, keys, shard) -> dict:
    versions = {}
    for package in ("headscope", "torch", "transformers", "tokenizers", "rouge-score"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    config = loaded.model.config
    return {
        "task": task,
        "options": dataclasses.asdict(options),
        "model_path": loaded.path,
        "model_revision": getattr(config, "_commit_hash", None),
        "dtype": str(loaded.model.dtype).removeprefix("torch."),
        "attention": loaded.attention,
        "chat_template": chat,
        "prompt_template": prompt_template(task, chat),
        "seed": options.seed,
        "versions": versions,
        "python": platform.python_version(),
        "run": run,
        "shard": f"{shard[0]}/{shard[1]}" if shard else None,
        "heads": keys,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "finished": None,
    }
