"""The one engine every task and scorer shares:
load -> build prompts -> generate with the recorder -> score -> accumulate -> write.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import platform
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from . import loading, outputs
from .decode import StopRule, eos_token_ids, greedy_decode, newline_token_ids, num_layers_and_heads
from .errors import HeadscopeError
from .metrics import METRICS, score_response
from .scorers import SCORERS, PromptBatch, ReasoningScorer
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
    quiet: bool = False


@dataclass
class DetectResult:
    heads: dict[str, list[float]]  # every head's list, merged with an earlier file unless overwrite
    summary: dict[str, dict]
    samples: list[dict]  # this run's rows of samples.jsonl
    paths: dict = field(default_factory=dict)

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


def make_scorer(task: str, options: DetectOptions):
    name = TASKS[task].default_scorer
    if name == "reasoning":
        return ReasoningScorer(options.top_k, options.generated_weight, options.query_weight, options.keep_zeros)
    return SCORERS[name]()


def detect(task: str, options: DetectOptions | None = None, loaded: loading.LoadedModel | None = None,
           **overrides) -> DetectResult:
    """Run one detection and write its files. `overrides` set DetectOptions fields by name."""
    options = dataclasses.replace(options or DetectOptions(), **overrides)
    check_options(task, options)
    started = time.time()
    loaded = loaded or loading.load(options.model, options.dtype, options.device, options.attn,
                                    options.trust_remote_code)
    tokenizer = loaded.tokenizer
    chat = options.chat == "on" or (options.chat == "auto" and bool(getattr(tokenizer, "chat_template", None)))
    if options.chat == "on" and not getattr(tokenizer, "chat_template", None):
        raise HeadscopeError("--chat on, but the tokenizer has no chat template")
    spec = TASKS[task]
    samples = spec.build(dataclasses.replace(options, chat=chat), tokenizer, loaded.max_context)
    if not samples:
        raise HeadscopeError("the task produced no samples: check the data and the grid options")
    encoded = [encode_with_span(tokenizer, sample, spec.span_overlap_threshold) for sample in samples]
    max_new_tokens = options.max_new_tokens or spec.default_max_new_tokens
    for sample, prompt in zip(samples, encoded):
        if loaded.max_context and len(prompt.input_ids) + max_new_tokens > loaded.max_context:
            raise HeadscopeError(f"sample {sample.id}: {len(prompt.input_ids)} prompt tokens + {max_new_tokens} new "
                                 f"tokens exceed the model's maximum context of {loaded.max_context}")
        if len(prompt.input_ids) == 0:
            raise HeadscopeError(f"sample {sample.id}: the prompt is empty")

    paths = outputs.output_paths(options.out, loaded.name, task)
    earlier = {} if options.overwrite or not paths["heads"].exists() else outputs.read_heads(paths["heads"])
    num_layers, num_heads = num_layers_and_heads(loaded.model)
    keys = [outputs.head_key(layer, head) for layer in range(num_layers) for head in range(num_heads)]
    unknown = set(earlier) - set(keys)
    if unknown:
        raise HeadscopeError(f"{paths['heads']} holds head {sorted(unknown)[0]}, which this model does not have: "
                             "use --overwrite or another --out")
    heads = {key: list(earlier.get(key, [])) for key in keys}

    scorer = make_scorer(task, options)
    stop = StopRule(eos_token_ids(loaded.model, tokenizer),
                    newline_token_ids(tokenizer) if options.stop_at_newline else set())
    log = outputs.SampleLog(paths["samples"], truncate=options.overwrite)
    rows = []
    running_sum = torch.tensor([sum(heads[k]) for k in keys], dtype=torch.float64)  # for the running top-10
    running_count = torch.tensor([len(heads[k]) for k in keys])
    try:
        order = range(0, len(samples), options.batch_size)
        for first in tqdm(order, desc=f"{task} {loaded.name}", unit="batch" if options.batch_size > 1 else "sample",
                          disable=options.quiet, file=sys.stderr):
            batch = list(zip(samples[first:first + options.batch_size], encoded[first:first + options.batch_size]))
            for row, per_head in run_batch(loaded, batch, scorer, stop, max_new_tokens, task, options):
                if row["passed"]:
                    flat = per_head.flatten()
                    kept = flat > 0 if not scorer.keep_zeros else torch.ones_like(flat, dtype=torch.bool)
                    values = flat.tolist()
                    for index in kept.nonzero().flatten().tolist():
                        heads[keys[index]].append(values[index])
                    running_sum += torch.where(kept, flat, 0.0)
                    running_count += kept
                    if not options.quiet:
                        mean = running_sum / running_count.clamp(min=1)
                        top = mean.topk(min(10, len(keys))).indices.tolist()
                        tqdm.write("top-10: " + "  ".join(f"{keys[i]} {mean[i]:.3f}" for i in top), file=sys.stderr)
                log.append(row)
                rows.append(row)
    finally:
        log.close()

    summary = outputs.summarize(heads)
    outputs.atomic_write_json(paths["heads"], heads)
    outputs.atomic_write_json(paths["summary"], summary)
    outputs.atomic_write_json(paths["manifest"], manifest(task, options, loaded, chat, started))
    return DetectResult(heads, summary, rows, paths)


def run_batch(loaded, batch, scorer, stop, max_new_tokens, task, options):
    """Decode a batch of (sample, encoded prompt) and yield (samples.jsonl row, (layers, heads) scores)."""
    started = time.time()
    runnable = []
    for sample, prompt in batch:
        if prompt.span is None and TASKS[task].span_required:  # a needle we cannot find is an error, not a zero
            yield sample_row(sample, prompt, task, options, response="", score=0.0, passed=False,
                             error=f"could not locate {sample.span_text!r} in the prompt", seconds=0.0), None
        else:
            runnable.append((sample, prompt))
    if not runnable:
        return
    device = loaded.device
    width = max(len(prompt.input_ids) for _, prompt in runnable)
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(runnable), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(runnable), width), dtype=torch.long)
    span_start = torch.zeros(len(runnable), dtype=torch.long)
    span_end = torch.zeros(len(runnable), dtype=torch.long)
    for i, (_, prompt) in enumerate(runnable):
        pad = width - len(prompt.input_ids)  # left padding: every prompt ends at position width - 1
        input_ids[i, pad:] = torch.tensor(prompt.input_ids)
        attention_mask[i, pad:] = 1
        if prompt.span is not None:
            span_start[i], span_end[i] = prompt.span[0] + pad, prompt.span[1] + pad
    input_ids = input_ids.to(device)
    scorer.begin(PromptBatch(input_ids, width, span_start.to(device), span_end.to(device)),
                 *num_layers_and_heads(loaded.model))
    generated = greedy_decode(loaded.model, input_ids, attention_mask.to(device) if len(runnable) > 1 else None,
                              [scorer], max_new_tokens, stop, loaded.eager_fallback)
    per_sample = scorer.result().float().cpu()  # (batch, layers, heads)
    seconds = (time.time() - started) / len(runnable)
    for i, (sample, prompt) in enumerate(runnable):
        response = loaded.tokenizer.decode(generated[i], skip_special_tokens=True).strip()
        score = score_response(options.metric, sample.answer, response)
        yield sample_row(sample, prompt, task, options, response, score, score > options.success_threshold,
                         None, seconds, per_sample[i]), per_sample[i]


def sample_row(sample, prompt, task, options, response, score, passed, error, seconds, per_head=None) -> dict:
    row = {"id": sample.id, "task": task, **sample.meta, "prompt_tokens": len(prompt.input_ids),
           "span": list(prompt.span) if prompt.span else None, "span_method": prompt.method,
           "response": response, "score": score, "passed": passed, "error": error, "duration_s": round(seconds, 4)}
    if per_head is not None:
        row["head_scores"] = per_head.tolist()  # (layers, heads): what this sample contributes
    if options.save_prompts:
        row["prompt"] = sample.prompt
    return row


def manifest(task, options, loaded, chat, started) -> dict:
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
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def read_jsonl(path) -> list[dict]:
    with open(path) as file:
        return [json.loads(line) for line in file if line.strip()]
