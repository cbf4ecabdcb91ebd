"""The family sweep: every causal-LM type transformers ships ends exact, refused (one line) or cannot-build.

For one model type (`sweep_type`):
  1. build a tiny random model from its config class (recipes.py) and run it on its OWN eager attention: a
     forward pass and a few greedy tokens, finite logits. If that fails the recipe (or transformers) is at
     fault, not headscope: cannot-build, with the reason;
  2. save it with a word-level tokenizer and run `headscope check` on it;
  3. run `headscope detect retrieval` and `detect reasoning` (each runs the check again first) and
     recompute both heads files from the eager model's own rows -- the whole sequence at every step, no cache,
     a Python loop over layers and heads, the top k under the tie rule (docs/method.md) -- and compare each sample's
     scores (<= 1e-4 relative; same responses), counting the head-steps with a tie in their top k + 1.
  4. (exact types) replay `headscope kv`'s policies on it (`kv_replay_check`, the outcome's `kv`): a window as
     long as the sequence must give the model's own logits, and every head streaming must give the logits of the
     model's own eager attention with every key outside the sinks and the window masked out (a cache holding only
     those entries), at every step.
A command that exits 2 with one `headscope: error:` line and leaves no output file is a refusal; any other
ending -- a traceback, a failing check, a difference from eager -- is a crash or a mismatch, which the sweep
exists to drive to zero.

`python -m headscope.families.sweep TYPE` prints one type's outcome as JSON (the sweep command, benchmarks/families.py,
runs each type in its own process, so that one type's crash or hang cannot stop the others).
"""
from __future__ import annotations

import contextlib
import inspect
import io
import json
import re
import sys
import tempfile
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import HeadscopeError

EXACT, REFUSED, CANNOT_BUILD, MISMATCH, CRASH = "exact", "refused", "cannot-build", "mismatch", "crash"
WORDS = "red blue green gold fish bird tree stone river code key is the of what".split()
TASK_WORDS = ["book", "based", "on", "content", "question", "answer", "context"]
STEPS = 8  # new tokens per sample, compared step by step with eager
LIMIT = 1e-4  # as the check's scorer figure: a reasoning score sums 8 steps x 5 rows' values, each within 1e-5


@dataclass
class Outcome:
    model_type: str
    model_class: str
    checkpoint: str  # an example hub id from the config's documentation ("" when it names none)
    verdict: str  # exact | refused | cannot-build | mismatch | crash
    reason: str  # the refusal's line, why it cannot be built, or what differs; for exact, what was compared
    layers: str = ""  # "4 attention layers", "attention layers 1, 3 of 4"
    kv: str = ""  # exact types: `headscope kv`'s replay against a reduced cache ("exact ...", or what differs)


def example_checkpoint(model_type: str) -> str:
    from transformers import CONFIG_MAPPING

    found = re.search(r"\[([\w.\-]+/[\w.\-]+)\]\(https://huggingface\.co/", CONFIG_MAPPING[model_type].__doc__ or "")
    return found.group(1) if found else ""


def causal_lm_class(model_type: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def sweep_tokenizer():
    from .toy import word_tokenizer

    return word_tokenizer(WORDS + TASK_WORDS)


def write_data(folder: Path) -> dict:
    """Small-vocabulary data: a needle answer holding every token a random model can write, so that heads copy."""
    (folder / "haystack").mkdir(parents=True, exist_ok=True)
    filler = " ".join(["the red fish of the blue river is gold .", "the green bird is the key of the tree ."] * 40)
    (folder / "haystack" / "a.txt").write_text(filler)
    answer = " ".join((WORDS + [".", ",", "?", ":", "<", ">", "/"])[(7 * i) % 22] for i in range(44))
    (folder / "needles.jsonl").write_text(json.dumps({"needle": f"the code of the stone is {answer} .",
                                                      "real_needle": answer,
                                                      "question": "what is the code of the stone ?"}))
    records = [{"id": f"q{i}", "context": " ".join(WORDS[i:] + WORDS[:i]) * 6 + " .",
                "question": f"what is the {WORDS[i]} ?", "answer": WORDS[i]} for i in range(2)]
    (folder / "reasoning.json").write_text(json.dumps(records))
    common = ["--success-threshold", "-1", "--save-prompts", "--quiet", "--no-plots", "--max-new-tokens", str(STEPS),
              "--no-stop-at-newline"]
    return {"retrieval": common + ["--haystack", str(folder / "haystack"), "--needles", str(folder / "needles.jsonl"),
                                   "--context-lengths", "120,200", "--length-buffer", "40", "--depths", "0,100"],
            "reasoning": common + ["--data", str(folder / "reasoning.json")]}


def build(model_type: str, vocab_size: int):
    """(model on eager attention, None) or (None, why the type cannot be built and run on its own eager code)."""
    from . import recipes

    try:
        model = recipes.tiny_model(model_type, vocab_size=vocab_size, attn="eager")
        ids = torch.randint(4, vocab_size, (1, 3 * recipes.WINDOW), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = model(ids).logits
            model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=1, eos_token_id=None)
    except Exception as error:  # the type's own code fails on the recipe: not headscope's to answer for
        return None, first_line(error)
    if not torch.isfinite(logits).all():
        return None, "its eager forward pass gives non-finite logits"
    return model, None


def save(model, model_type: str, tokenizer, workdir: Path) -> Path:
    """Save the model as a checkpoint of its type: a composite type whose causal LM is its text part (Mllama, Emu3)
    gets the composite config, which AutoModelForCausalLM loads (the text part's own type it does not map)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from . import recipes

    model_dir = workdir / model_type
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    if model.config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        recipes.tiny_config(model_type, len(tokenizer)).save_pretrained(model_dir)
    return model_dir


def headscope_cli(argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `headscope ARGV` run in this process; a traceback is exit code -1."""
    from ..cli.commands import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except Exception:
            return -1, out.getvalue(), err.getvalue() + traceback.format_exc()
    return code, out.getvalue(), err.getvalue()


def refusal_or_problem(code: int, out: str, err: str, out_dir: Path | None) -> tuple[str, str] | None:
    """(verdict, reason) for a command that did not succeed; None when it exited 0."""
    if code == 0:
        return None
    if code == -1:
        return CRASH, err.strip().splitlines()[-1][:300]
    lines = [line for line in err.strip().splitlines() if not line.startswith("headscope: note:")
             and "falling back to eager attention" not in line]
    if code == 2 and len(lines) == 1 and lines[0].startswith("headscope: error: ") and \
            not (out_dir is not None and out_dir.exists() and any(out_dir.iterdir())):
        return REFUSED, lines[0].removeprefix("headscope: error: ")
    if code == 1:  # the check ran and failed
        return MISMATCH, "check fails: " + " / ".join(line.strip() for line in out.splitlines() if line.endswith("NO"))
    return CRASH, f"exit {code}: {' | '.join(lines)[:300]}"


def rule_top_k(row: torch.Tensor, k: int) -> tuple[list[tuple[int, float]], bool]:
    """The row's top k under the tie rule (docs/method.md), written out on its own (numpy): sorted by value, an entry
    within 2^-16 of its size of the entry above it is on that entry's level, and within a level the earliest
    position ranks first. Returns the (position, value) pairs and whether two of the top k + 1 share a level (a
    tie the rule settled; headscope's `tied_head_steps` counts the same)."""
    import numpy as np

    values = np.maximum(row.float().numpy(), np.float32(0))
    by_value = np.lexsort((np.arange(len(values)), -values))  # value descending, then position
    ranked = values[by_value]
    level = np.concatenate([[0], np.cumsum(ranked[:-1] - ranked[1:] > np.float32(2.0 ** -16) * ranked[:-1])])
    order = by_value[np.lexsort((by_value, level))]  # by level, then position
    tied = bool((np.diff(level[:k + 1]) == 0).any())
    return [(int(p), float(values[p])) for p in order[:k]], tied


def reference_heads(model, tokenizer, rows: list[dict], task: str, keys: list[str]) -> tuple[dict, list[str], int]:
    """Each head's score per sample recomputed the original scripts' way: eager rows of the whole sequence at every
    step (no cache), one head at a time, the top k under the tie rule; the responses; and how many (step, head)
    rows had a tie in their top k + 1 (settled by the rule)."""
    from ..detection.decode import eos_token_ids
    from ..attention.reference import recording_eager_rows

    eos = eos_token_ids(model, tokenizer)
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    expected = {key: [] for key in keys}
    responses, ties = [], 0
    for row in rows:
        ids = tokenizer(row["prompt"]).input_ids
        prompt_len, span = len(ids), row["span"]
        score = {key: 0.0 for key in keys}
        for _ in range(STEPS):
            rows_by_layer = {}
            as_generate = {"position_ids": torch.arange(len(ids))[None]} if takes_positions else {}  # as generate()
            with recording_eager_rows(model, lambda layer, r: rows_by_layer.setdefault(layer, r)), torch.no_grad():
                output = model(torch.tensor([ids]), output_attentions=True, **as_generate)
            if not rows_by_layer:  # attention off the interface: its own eager weights, one per layer
                rows_by_layer = dict(enumerate(w.float() for w in output.attentions if w is not None))
            token = int(output.logits[0, -1].argmax())
            if task == "retrieval":  # top-1 on a needle token that is the token written
                k, credit = 1, lambda p, v: (1 / (span[1] - span[0])) if span[0] <= p < span[1] and ids[p] == token else 0
            else:  # top-5 mass on generated tokens, half on the question's
                k, credit = 5, lambda p, v: v * ((p >= prompt_len) + 0.5 * bool(span and span[0] <= p < span[1]))
            for key in keys:
                layer, head = (int(part) for part in key.split("-"))
                top, tied = rule_top_k(rows_by_layer[layer][0, head, -1], k)
                score[key] += sum(credit(p, v) for p, v in top)
                ties += tied
            ids.append(token)
            if token in eos:  # the step that writes EOS is scored, and is the last
                break
        for key, value in score.items():
            expected[key].append(value)
        responses.append(tokenizer.decode(ids[prompt_len:], skip_special_tokens=True).strip())
    return expected, responses, ties


def compare_heads(rows: list[dict], expected: dict) -> str | None:
    """What differs between each sample's head scores (the samples file, zeros included) and eager's (None:
    nothing beyond LIMIT, relative to scores above 1: a reasoning score sums dozens of row values over the steps,
    each within float32 rounding). The heads file is derived from these rows (tested in tests/)."""
    layers = sorted({int(key.split("-")[0]) for key in expected})
    for key, scores in expected.items():
        layer, head = (int(part) for part in key.split("-"))
        values = [row["head_scores"][layers.index(layer)][head] for row in rows]
        worst = max((abs((value or 0.0) - score) / max(1.0, abs(score)) for value, score in zip(values, scores)),
                    default=0.0)
        if worst > LIMIT:
            return f"head {key} differs from eager by {worst:.1e}"
    return None


def sweep_type(model_type: str, workdir: Path) -> Outcome:
    """One type's class (module docstring)."""
    outcome = Outcome(model_type, causal_lm_class(model_type), example_checkpoint(model_type), "", "")
    tokenizer = sweep_tokenizer()
    model, why = build(model_type, len(tokenizer))
    if model is None:
        outcome.verdict, outcome.reason = CANNOT_BUILD, why
        return outcome
    model_dir = save(model, model_type, tokenizer, workdir)
    options = write_data(workdir / "data")
    code, out, err = headscope_cli(["check", "--model", str(model_dir), "--prompt-tokens", "96", "--steps", "4"])
    problem = refusal_or_problem(code, out, err, None)
    if problem is not None:
        outcome.verdict, outcome.reason = problem
        return outcome
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The reference reads the model and tokenizer as headscope loads them (a type may map the tokenizer to its own
    # class), on the model's own eager attention.
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", trust_remote_code=False).eval()
    compared = []
    for task in ("retrieval", "reasoning"):
        out_dir = workdir / f"out-{task}"
        code, out, err = headscope_cli(["detect", task, "--model", str(model_dir), "--out", str(out_dir),
                                        *options[task]])
        problem = refusal_or_problem(code, out, err, out_dir)
        if problem is not None:
            outcome.verdict, outcome.reason = problem[0], f"detect {task}: {problem[1]}"
            return outcome
        prefix = out_dir / f"{model_type}_{task}"
        heads = json.loads(Path(f"{prefix}_heads.json").read_text())
        rows = [json.loads(line) for line in Path(f"{prefix}_samples.jsonl").read_text().splitlines()]
        expected, responses, ties = reference_heads(model, tokenizer, rows, task, list(heads))
        differs = compare_heads(rows, expected) or next(
            (f"sample {row['id']}: response {row['response']!r}, eager {response!r}"
             for row, response in zip(rows, responses) if row["response"] != response), None)
        if differs:
            outcome.verdict, outcome.reason = MISMATCH, f"detect {task}: {differs}"
            return outcome
        compared.append(f"{len(rows)} {task} samples" + (f" ({ties} head-steps at a top-k tie, settled by the rule)"
                                                          if ties else ""))
    from ..attention.layout import attention_layout

    outcome.layers = attention_layout(model).describe()
    try:
        outcome.kv = kv_replay_check(model_dir)
    except HeadscopeError as error:  # kv refuses it by name (a per-head mask, ...): detection stays exact
        outcome.kv = f"refused: {error}"
    outcome.verdict, outcome.reason = EXACT, f"check passes; {' and '.join(compared)} equal eager ({outcome.layers})"
    return outcome


KV_SINK, KV_RECENT, KV_STEPS = 2, 8, 4  # a streaming window far shorter than the prompt (and than recipes.WINDOW)
KV_REFERENCE = "headscope-kv-reference"


class StreamingReference:
    """Every head streaming, computed by the module's own eager attention: the model's mask plus -inf on every key
    that is not among the first KV_SINK tokens or the last KV_RECENT before the query. Positions count forward
    passes (a hook on the model), so a layer's second call in a pass (DiffLlama) sees the same ones."""

    def __init__(self, model):
        self.passes, self.seen, self.first = 0, {}, {}
        model.register_forward_pre_hook(lambda module, args: setattr(self, "passes", self.passes + 1))
        for module in model.modules():
            module.headscope_kv_reference = self

    def positions(self, layer, q_len: int) -> int:
        """The padded position of this call's first query."""
        seen_pass, first = self.first.get(layer, (None, 0))
        if seen_pass != self.passes:
            first = self.seen.get(layer, 0)
            self.seen[layer], self.first[layer] = first + q_len, (self.passes, first)
        return first

    def attend(self, module, query, key, value, attention_mask, **kwargs):
        from ..attention.reference import float_mask, model_eager_attention
        from ..attention.runstate import calling_layer, module_state

        q_len, kv_len = query.shape[2], key.shape[2]
        first = self.positions(calling_layer(module, module_state(module)), q_len)
        query_pos = torch.arange(first, first + q_len)[:, None]
        key_pos = torch.arange(first + q_len - kv_len, first + q_len)[None]
        kept = (key_pos < KV_SINK) | (query_pos - key_pos < KV_RECENT)
        mask = float_mask(attention_mask, query.device)
        mask = torch.zeros(1, 1, q_len, kv_len) if mask is None else mask[..., -kv_len:]
        # A key the model hides with its dtype's minimum is hidden, as headscope reads the mask: a query left no key
        # (Qwen4-Exp's selection outside the window) gets 0, not the model's even average over hidden keys.
        mask = mask.masked_fill(mask <= torch.finfo(mask.dtype).min / 2, float("-inf"))
        output, weights = model_eager_attention(module)(module, query, key, value,
                                                        mask.masked_fill(~kept.to(mask.device), float("-inf")),
                                                        **kwargs)
        return output.nan_to_num(0.0), weights


def kv_replay_check(model_dir: Path) -> str:
    """Step 4 of the module docstring, on a prompt of 3 windows and KV_STEPS decoding steps: "exact (...)" with the
    largest differences, or what differs."""
    from transformers import AutoModelForCausalLM
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from ..attention import kv, recorder
    from . import recipes
    from ..attention.layout import attention_layout
    from ..attention.reference import model_eager_attention

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager",
                                                 trust_remote_code=False).eval()  # the sweep's own tiny model
    if not recorder.install(model) or not attention_layout(model).via_interface:  # as `headscope kv` decides
        return "off the interface: kv refuses it"
    if any(model_eager_attention(module) is None for module in model.modules() if hasattr(module, "layer_idx")):
        return "no eager attention to compare with"
    ids = torch.randint(4, model.config.get_text_config().vocab_size, (1, 3 * recipes.WINDOW + KV_STEPS),
                        generator=torch.Generator().manual_seed(1))
    plain = replayed(model, None, ids)
    everything = replayed(model, kv.StreamingHeads({}, KV_SINK, ids.shape[1]), ids)
    streaming = replayed(model, kv.StreamingHeads({}, KV_SINK, KV_RECENT), ids)
    ALL_ATTENTION_FUNCTIONS.register(KV_REFERENCE, lambda module, *args, **kwargs:
                                     module.headscope_kv_reference.attend(module, *args, **kwargs))
    ALL_MASK_ATTENTION_FUNCTIONS.register(KV_REFERENCE, ALL_MASK_ATTENTION_FUNCTIONS.get("eager", sdpa_mask))
    model.set_attn_implementation(KV_REFERENCE)
    StreamingReference(model)
    reference = replayed(model, None, ids)
    kept_all, streamed = float((everything - plain).abs().max()), float((streaming - reference).abs().max())
    if float((streaming - plain).abs().max()) == 0:  # nothing was compared: not "exact"
        return (f"no effect: streaming every head to sink {KV_SINK} + recent {KV_RECENT} left the logits exactly as "
                "they were")
    if kept_all > LIMIT or streamed > LIMIT:
        return f"differs: keeping everything by {kept_all:.1e}, streaming from a reduced cache by {streamed:.1e}"
    return (f"exact (a window over everything {kept_all:.1e}; streaming sink {KV_SINK} + recent {KV_RECENT} vs a "
            f"reduced cache {streamed:.1e}; the window moves the logits by {float((streaming - plain).abs().max()):.2f})")


def replayed(model, policy, ids) -> torch.Tensor:
    """The engine's way under `policy` (None: none): all but the last KV_STEPS + 1 tokens in one pass, then one token
    at a time; the logits of those steps."""
    from ..attention import kv
    from ..attention.caches import fresh_cache

    prompt = ids.shape[1] - KV_STEPS
    past = fresh_cache(model)
    replay = kv.replaying(model, policy, kv.Layout(prompt, (0,))) if policy else contextlib.nullcontext()
    with torch.no_grad(), replay:
        model(ids[:, :prompt - 1], **past)
        return torch.stack([model(ids[:, t:t + 1], position_ids=torch.tensor([[t]]), **past).logits[0, -1]
                            for t in range(prompt - 1, ids.shape[1])])


def main(argv: list[str]) -> int:
    """`python -m headscope.families.sweep TYPE`: one type's outcome as one JSON line."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as workdir:
        try:
            outcome = sweep_type(argv[0], Path(workdir))
        except Exception as error:  # a crash of the sweep itself is still a crash, reported as one
            outcome = Outcome(argv[0], causal_lm_class(argv[0]), example_checkpoint(argv[0]), CRASH,
                              first_line(error))
    print(json.dumps(asdict(outcome)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
