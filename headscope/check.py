"""`headscope check`: prove, on the user's own model and settings, that headscope measures what the model computes.

Three figures on a short prompt (a few hundred tokens of the bundled haystack, a few decoding steps):

  rows      At every recorded step and layer, headscope's row against the model's own
            `eager_attention_forward` (its modeling file's reference code) called on the very same
            query, key, value and mask, upcast to float32. Same inputs, so the only difference is the
            maths: max abs diff <= 1e-5 in every dtype.
  tokens    Greedy tokens with headscope against `generate` on the model's eager attention. In bf16/fp16
            the two compute logits differently (headscope takes q.k in float32), so a divergence is
            allowed only at a near tie: the reference's logit gap between the two tokens at the first
            divergence within the dtype's rounding of the logits.
  ablation  Masking one head (uniform mode) through the ablation path changes that head's attention
            output and leaves the layer's other heads unchanged.

`detect` and `ablate` run the same check before a long run (`--no-check` skips it).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import masking
from .decode import StopRule, greedy_decode, num_layers_and_heads
from .errors import HeadscopeError
from .runstate import state_of
from .scorers import PromptBatch, Scorer

ROW_LIMIT = 1e-5
SPY = "headscope-check"


@dataclass
class Figure:
    name: str
    value: str
    limit: str
    ok: bool


@dataclass
class CheckReport:
    figures: list[Figure] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(figure.ok for figure in self.figures)

    def failing(self) -> list[Figure]:
        return [figure for figure in self.figures if not figure.ok]

    def table(self) -> str:
        lines = [f"{'figure':<9} {'value':<36} {'limit':<48} ok"]
        lines += [f"{f.name:<9} {f.value:<36} {f.limit:<48} {'yes' if f.ok else 'NO'}" for f in self.figures]
        return "\n".join(lines)


class RowKeeper(Scorer):
    """Keeps the last full row each layer recorded, for the spy to compare."""

    full_rows = True

    def begin(self, batch, num_layers, num_heads):
        super().begin(batch, num_layers, num_heads)
        self.rows = {}

    def step_rows(self, layer, probs, offset):
        self.rows[layer] = probs

    def step(self, view):
        pass


def check_prompt(loaded, length: int) -> torch.Tensor:
    """(1, length) token ids of the model's default haystack (repeated if short), BOS as the tokenizer adds it."""
    from .tasks.retrieval import default_data, load_haystack

    haystack_dir, _ = default_data(loaded.path)
    ids = loaded.tokenizer(load_haystack(haystack_dir)[: 20 * length]).input_ids
    while len(ids) < length:
        ids = ids + ids
    return torch.tensor([ids[:length]])


def run_check(loaded, prompt_tokens: int = 256, steps: int = 8, need_ablation: bool = True) -> CheckReport:
    """The three figures on the loaded model (its dtype, device and attention backend)."""
    model, report = loaded.model, CheckReport()
    device = loaded.device
    input_ids = check_prompt(loaded, prompt_tokens).to(device)
    if loaded.eager_fallback:
        report.figures.append(Figure("rows", "eager output_attentions (fallback)", "the model's own rows", True))
    tokens, diffs = decode_and_compare_rows(loaded, input_ids, steps)
    if not loaded.eager_fallback:
        layers, _ = num_layers_and_heads(model)
        complete = len(diffs) == layers * len(tokens) and not any(math.isnan(d) for d in diffs)
        value = f"max abs diff {max(diffs):.1e} ({len(diffs)} rows)" if complete else \
            f"{len(diffs)} rows, {sum(math.isnan(d) for d in diffs)} with no eager reference"
        report.figures.append(Figure("rows", value, f"<= {ROW_LIMIT:.0e}, every layer and step",
                                     complete and max(diffs) <= ROW_LIMIT))
    report.figures.append(token_figure(model, input_ids, tokens))
    if need_ablation:
        report.figures.append(ablation_figure(loaded, input_ids))
    return report


def decode_and_compare_rows(loaded, input_ids, steps) -> tuple[list[int], list[float]]:
    """headscope's greedy tokens, and each recorded row's max abs diff from the model's eager code on the same inputs."""
    model = loaded.model
    keeper = RowKeeper()
    layers, heads = num_layers_and_heads(model)
    no_span = torch.zeros(1, dtype=torch.long, device=input_ids.device)
    keeper.begin(PromptBatch(input_ids, input_ids.shape[1], no_span, no_span), layers, heads)
    diffs = []  # one max abs diff per (step, layer) row compared

    def compare(module, query, key, value, attention_mask, kwargs, output):
        if query.shape[2] != 1 or module.layer_idx not in keeper.rows:
            return
        reference = eager_reference(module, query, key, value, attention_mask, kwargs)  # (batch, heads, kv_len)
        ours = keeper.rows.pop(module.layer_idx)
        diffs.append(float((ours - reference[..., -ours.shape[-1]:]).abs().max()))  # NaN: no eager reference

    with Spying(model, compare, enabled=not loaded.eager_fallback):
        tokens = greedy_decode(model, input_ids, None, [keeper], steps, StopRule(set(), set()),
                               loaded.eager_fallback)[0]
    return tokens, diffs


def model_eager_attention(module):
    """The reference attention function of the module's modeling file (None for code that has none)."""
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)


def eager_reference(module, query, key, value, attention_mask, kwargs) -> torch.Tensor:
    """The model's own eager attention probabilities, float32, from the given q, k, v and transformers' mask."""
    eager = model_eager_attention(module)
    if eager is None:  # nothing to compare with: the rows figure fails (NaN), it is not skipped
        return torch.full(query.shape[:2] + key.shape[2:3], float("nan"), device=query.device)
    if attention_mask is not None and attention_mask.dtype == torch.bool:  # eager adds a float mask
        attention_mask = torch.zeros(attention_mask.shape, device=query.device).masked_fill(
            ~attention_mask.to(query.device), float("-inf"))
    elif attention_mask is not None:
        attention_mask = attention_mask.float()
    arguments = {name: value for name, value in kwargs.items() if name != "dropout"}
    with torch.no_grad():
        _, weights = eager(module, query.float(), key.float(), value.float(), attention_mask, dropout=0.0,
                           **arguments)
    return weights[:, :, -1].float()


def token_figure(model, input_ids, tokens) -> Figure:
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=len(tokens),
                                 do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
    finally:
        model.set_attn_implementation(previous)
    expected = out.sequences[0, input_ids.shape[1]:].tolist()
    same = sum(a == b for a, b in zip(expected, tokens))
    limit = "all equal, or the first divergence a near tie"
    if expected == tokens:
        return Figure("tokens", f"{same}/{len(tokens)} equal", limit, True)
    step = next(s for s, (a, b) in enumerate(zip(expected, tokens)) if a != b)
    logits = out.logits[step][0].float()
    gap = float(logits[expected[step]] - logits[tokens[step]])
    tolerance = float(logits.abs().max()) * torch.finfo(model.dtype).eps * 4  # the dtype's rounding of a logit
    return Figure("tokens", f"differ from step {step}: gap {gap:.2e}", f"{limit} (gap <= {tolerance:.1e})",
                  gap <= tolerance)


def ablation_figure(loaded, input_ids) -> Figure:
    layers, heads = num_layers_and_heads(loaded.model)
    layer, head = layers // 2, heads - 1
    name = f"masking {layer}-{head}"
    if loaded.eager_fallback:
        return Figure("ablation", "attention not on the interface", f"{name} changes its output", False)
    outputs = {}

    def keep(module, query, key, value, attention_mask, kwargs, output):
        if module.layer_idx == layer:
            outputs[state_of(loaded.model).ablation is not None] = output.float()  # (batch, q_len, heads, dim)

    with Spying(loaded.model, keep), torch.no_grad():
        loaded.model(input_ids)
        with masking.ablating(loaded.model, {layer: [head]}, "uniform"):
            loaded.model(input_ids)
    if len(outputs) != 2:
        return Figure("ablation", f"layer {layer} not reached", f"{name} changes its output", False)
    change = (outputs[True] - outputs[False]).abs()
    other_heads = change[:, :, torch.arange(heads) != head]
    masked_change, others = float(change[:, :, head].max()), float(other_heads.max()) if heads > 1 else 0.0
    return Figure("ablation", f"head {masked_change:.2e}, others {others:.1e}",
                  f"{name} changes it (> 0), the others 0", masked_change > 0 and others == 0)


class Spying:
    """Route the model's attention through a spy that calls headscope's function, then `watch(...)`."""

    def __init__(self, model, watch, enabled: bool = True):
        self.model, self.watch, self.enabled = model, watch, enabled

    def __enter__(self):
        if not self.enabled:
            return self
        self.previous = self.model.config._attn_implementation
        inner = ALL_ATTENTION_FUNCTIONS[self.previous]

        def spy(module, query, key, value, attention_mask, **kwargs):
            output, _ = inner(module, query, key, value, attention_mask, **kwargs)
            self.watch(module, query, key, value, attention_mask, kwargs, output)
            return output, None

        ALL_ATTENTION_FUNCTIONS.register(SPY, spy)
        ALL_MASK_ATTENTION_FUNCTIONS.register(SPY, ALL_MASK_ATTENTION_FUNCTIONS[self.previous])
        self.model.set_attn_implementation(SPY)
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.model.set_attn_implementation(self.previous)
        return False


def require(loaded, command: str, need_ablation: bool) -> None:
    """Before a long run: the check, once per loaded model; refuse with one line when it fails."""
    key = "ablate" if need_ablation else "detect"
    if key in loaded.checked:
        return
    report = run_check(loaded, need_ablation=need_ablation)
    if not report.passed:
        worst = report.failing()[0]
        raise HeadscopeError(f"{loaded.name} fails headscope's exactness check ({worst.name}: {worst.value}); "
                             f"run `headscope check --model {loaded.path}` for the table, or pass --no-check to "
                             f"{command} anyway")
    loaded.checked.add(key)
