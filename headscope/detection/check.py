"""`headscope check`: prove, on the user's own model and settings, that headscope measures what the model computes,
on what `detect` does.

The check's batch: two prompts of the bundled haystack, the second left-padded by PAD tokens, at least
`--prompt-tokens` long and longer than the model's smallest sliding window (by PREFILL_TAIL + 8 tokens), so
that windows bind; decoded `--steps` steps. Its figures, over the model's attention layers (layout.py):

  rows      every decoding row (each step, attention layer and sample) against the model's own eager rows
            (reference.py: its modeling file's eager code on the very same query, key, value and mask, upcast
            to float32, as the weights it applies to the values -- Granite-SWA's sink scale included): the
            mass each row moves (rowcheck.mass_moved: half the L1 distance) <= 1e-5 in every dtype, so a
            diffuse row at 100K keys is judged as strictly as a sharp one at 256;
  prefill   the prefill rows the pattern and query scorers read: the first FIRST_ROWS real rows of the padded
            sample and the last PREFILL_TAIL rows of the prompt (past the window), the same comparison;
  outputs   the attention outputs of those same rows (prefill and decoding) against eager's outputs: a wrong
            output (a prefill run non-causal) changes every later layer's input while each layer's rows, given
            its own inputs, still look right;
  scorers   one figure per scorer the run will use, on the run's own first prompts (`headscope check`: the
            retrieval and reasoning tasks' first prompts), fed headscope's rows and fed the eager rows: equal
            (<= 1e-4), and the rows of that pass (decoding, prefill, replay) against eager's. Scorers that read
            the finished sequence read the prompts followed by a scripted think block (`scripted_think`); a
            scorer with no value even there is "not checked", with why (`detect` says so in a note);
  tokens    each sample's greedy tokens in the padded batch against `generate` on eager attention on that prompt
            alone (a sample's tokens must not depend on its batch; Whisper's own `generate` does not keep that
            for a left-padded batch). In bf16/fp16 the two round differently (headscope takes q.k in float32),
            so each sample that splits passes only when its split is a near tie (ties.py: the reference's logit
            gap, or a mixture-of-experts router's, within the dtype's tolerance, ties.ROUNDING);
  ablation  masking one head (uniform mode) changes that head's attention output and no other head's.

`detect` runs all but ablation, `ablate` all five, once per loaded model before a long run (`--no-check`
skips it). Cost: a few seconds on the organism; `benchmarks/check_cost.py` measures a 32 x 32-head model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..attention import masking
from .decode import StopRule, greedy_decode, num_layers_and_heads, replay
from ..errors import HeadscopeError, notify
from ..attention.layout import attention_layout, on_eager
from ..attention.recorder import Recorder
from ..attention.rowcheck import ROW_LIMIT, Differences, EagerRowsRecorder, Spying
from ..attention.runstate import calling_layer, module_state, state_of
from ..scorers import PromptBatch, Scorer
from ..attention.ties import experts_per_token, logging_routers, routing_tie, rounding, tolerance

SCORE_LIMIT = 1e-4  # scorer values: sums of rows over steps, each row within ROW_LIMIT
OUTPUT_LIMIT, OUTPUT_ROUNDING = 1e-4, 8  # attention outputs: float32, else 8 epsilons of the output's dtype
PAD = 16  # the second prompt's left padding
FIRST_ROWS = 16  # prefill rows compared right after the padding
PREFILL_TAIL = 32  # ... and at the end of the prompt


@dataclass
class Figure:
    name: str
    value: str
    limit: str
    ok: bool
    checked: bool = True  # False: nothing to compare (a scorer with no value on the check's prompts), says why


@dataclass
class CheckReport:
    figures: list[Figure] = field(default_factory=list)
    prompt_tokens: int = 0  # the check prompt's length (longer than the smallest window)

    @property
    def passed(self) -> bool:
        return all(figure.ok for figure in self.figures)

    def failing(self) -> list[Figure]:
        return [figure for figure in self.figures if not figure.ok]

    def table(self) -> str:
        lines = [f"{'figure':<9} {'value':<44} {'limit':<52} ok"]
        lines += [f"{f.name:<9} {f.value:<44} {f.limit:<52} {verdict(f)}" for f in self.figures]
        return "\n".join(lines)


def verdict(figure: Figure) -> str:
    return "NO" if not figure.ok else "yes" if figure.checked else "--"


@dataclass
class ScorerCase:
    """The scorers a run will use and the run's first prompts, to be fed headscope's rows and eager rows."""

    label: str  # e.g. "retrieval"
    make_scorers: object  # () -> fresh scorer instances
    batch: PromptBatch
    attention_mask: torch.Tensor | None


class RowsWanted(Scorer):
    """Asks for the prefill rows [start, end) (so the EagerRowsRecorder compares them); scores nothing."""

    def __init__(self, start: int, end: int):
        self.start, self.end = start, end

    def prefill_queries(self):
        return self.start, self.end

    def step(self, view):
        pass


def check_prompts(loaded, length: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, L) token ids of the model's default haystack and their padding mask: the first prompt L tokens long,
    the second PAD tokens shorter and left-padded (for a model that headscope decodes one prompt at a time, another
    L tokens, unpadded); L at least `length` and longer than the smallest window."""
    from ..tasks.retrieval import default_data, load_haystack

    window = attention_layout(loaded.model).smallest_window
    if window is not None:
        length = max(length, window + PREFILL_TAIL + 8)
    if loaded.max_context:
        length = min(length, loaded.max_context - steps)
    haystack_dir, _ = default_data(loaded.path)
    ids = loaded.tokenizer(load_haystack(haystack_dir)[: 20 * length]).input_ids
    while len(ids) < length:
        ids = ids + ids
    input_ids = torch.tensor([ids[:length], ids[:length]])
    mask = torch.ones_like(input_ids)
    if not attention_layout(loaded.model).left_padding:  # decoded one prompt at a time (engine.batch_size)
        input_ids[1] = torch.tensor((ids + ids)[PAD:PAD + length])  # another text of the same length: no padding
        return input_ids, mask
    input_ids[1, PAD:] = input_ids[1, :length - PAD].clone()  # the same text, shifted right: left padding
    input_ids[1, :PAD], mask[1, :PAD] = loaded.pad_id, 0
    return input_ids, mask


def run_check(loaded, prompt_tokens: int = 256, steps: int = 8, need_ablation: bool = True,
              cases: list[ScorerCase] = ()) -> CheckReport:
    """The figures on the loaded model (its dtype, device and attention backend)."""
    model, device = loaded.model, loaded.device
    input_ids, mask = (t.to(device) for t in check_prompts(loaded, prompt_tokens, steps))
    report = CheckReport(prompt_tokens=input_ids.shape[1])
    tokens, recorder, routers = decode_against_eager(loaded, input_ids, mask, steps)
    report.figures += row_figures(loaded, recorder, len(tokens[0]), input_ids.shape[1])
    for case in cases:
        report.figures += scorer_figures(loaded, case, steps)
    report.figures.append(token_figure(model, input_ids, mask, tokens, routers))
    if need_ablation and not loaded.eager_fallback:  # off the interface `ablate` refuses the model outright
        report.figures.append(ablation_figure(loaded, input_ids))
    return report


def decode_against_eager(loaded, input_ids, mask, steps):
    """headscope's greedy tokens on the batch, with every row it computed compared with eager (the recorder), and
    the routers' logits of the run (ties.py)."""
    model, pad = loaded.model, (mask == 0).sum(-1)
    length = input_ids.shape[1]
    wanted = [RowsWanted(int(pad.max()), int(pad.max()) + FIRST_ROWS), RowsWanted(length - 1 - PREFILL_TAIL,
                                                                                  length - 1)]
    spy = Spying(model, enabled=not loaded.eager_fallback, pad=pad, eager_rows=True)
    layers, heads = num_layers_and_heads(model)
    batch = PromptBatch(input_ids, length, pad, pad, pad)
    for scorer in wanted:
        scorer.begin(batch, layers, heads)
    with spy, logging_routers(model, len(input_ids)) as routers:
        tokens = greedy_decode(model, input_ids, mask, [] if loaded.eager_fallback else wanted, steps,
                               StopRule(set(), set()), loaded.eager_fallback)
    return tokens, spy.recorder, routers


def row_figures(loaded, recorder: EagerRowsRecorder, steps: int, length: int) -> list[Figure]:
    if loaded.eager_fallback:
        return [Figure("rows", "eager output_attentions (fallback)", "the model's own rows", True)]
    layout, found = attention_layout(loaded.model), recorder.differences
    decode, prefill = found.worst(found.decode), found.worst(found.prefill)
    expected = len(layout.layers) * steps
    complete = len(found.decode) == expected and not math.isnan(decode)
    value = f"mass moved {decode:.1e} ({2 * len(found.decode)} rows)" if complete else \
        f"{len(found.decode)} of {expected} layer-steps" + (" (no eager reference)" if math.isnan(decode) else "")
    rows = Figure("rows", value, f"<= {ROW_LIMIT:.0e} a row, every step, {layout.describe()}",
                  complete and decode <= ROW_LIMIT)
    compared = not math.isnan(prefill) and found.prefill_rows > 0
    value = f"mass moved {prefill:.1e} ({found.prefill_rows} rows)" if compared else "no eager reference"
    prefill_figure = Figure("prefill", value, f"<= {ROW_LIMIT:.0e} a row, {FIRST_ROWS} after the padding, the "
                                              f"last {PREFILL_TAIL}", compared and prefill <= ROW_LIMIT)
    outputs, limit = found.worst(found.outputs), output_limit(loaded.model.dtype)
    value = f"max diff {outputs:.1e} of the largest" if not math.isnan(outputs) else "no eager reference"
    return [rows, prefill_figure, Figure("outputs", value, f"<= {limit:.0e} x max(1, largest), the rows above",
                                         not math.isnan(outputs) and outputs <= limit)]


def output_limit(dtype: torch.dtype) -> float:
    """Attention outputs against eager's in float32: rounding of the output's dtype, at least 1e-4."""
    return max(OUTPUT_LIMIT, OUTPUT_ROUNDING * torch.finfo(dtype).eps)


def scorer_figures(loaded, case: ScorerCase, steps: int) -> list[Figure]:
    """One figure per scorer of the case: its values fed headscope's rows against fed the eager rows, on prompts
    where it has something to score, and the rows of the pass it reads against eager's (the eager pass's
    recorder). Decoding scorers read `steps` greedy steps of the case's prompts; scorers that read the finished
    sequence (replays: the think/answer segment scorers) read the case's prompts followed by a scripted think
    block with the run's markers (`scripted_think`), teacher-forced: an 8-step decode never closes a think block.
    A scorer that still has no value there is reported "not checked", with why."""
    scorers = case.make_scorers()
    decoding = [scorer.name for scorer in scorers if not scorer.replays]
    replaying = [scorer.name for scorer in scorers if scorer.replays]
    figures = {}
    for names, body in ((decoding, decoding_body(loaded, case, steps)), (replaying, replay_body(loaded, case))):
        if names:
            ours, eager = (scorer_pass(loaded, case, names, eager, body) for eager in (False, True))
            figures.update({name: scorer_verdict(case, name, ours, eager) for name in names})
    return [figures[scorer.name] for scorer in scorers]


@dataclass
class ScorerRun:
    """One pass of some scorers: their values, why a sample has none, and the eager recorder's differences (for the
    eager pass) or None."""

    values: dict  # name -> (batch, layers, heads) float32 on the CPU, NaN: no value
    unscored: dict  # name -> {sample: reason}
    rows: float | None = None  # the largest mass moved among the rows the pass computed (eager pass only)


def scorer_verdict(case: ScorerCase, name: str, ours: ScorerRun, eager: ScorerRun) -> Figure:
    """The scorer's figure: not checked when no sample has a value in either pass; else the largest difference of
    its values (null must be null on both sides), and the rows of the eager pass against eager's."""
    task = case.label.split()[0]
    label = task if name == task else f"{task} {name}"
    a, b = ours.values[name], eager.values[name]
    if bool(a.isnan().all()) and bool(b.isnan().all()):
        reasons = sorted(set(eager.unscored[name].values())) or ["every head's value is null"]
        return Figure("scorers", f"{label}: not checked: {'; '.join(reasons)}", "a value to compare", True,
                      checked=False)
    scale = max(1.0, float(b.nan_to_num(0.0).abs().max()))
    limit = f"<= {SCORE_LIMIT:.0e} x {scale:.3g}, its pass's rows <= {ROW_LIMIT:.0e}"
    if not bool((a.isnan() == b.isnan()).all()):
        return Figure("scorers", f"{label}: null on one side only", limit, False)
    worst = float((a - b).nan_to_num(0.0).abs().max())
    value, rows_ok = f"{label}: max diff {worst:.1e}", True
    if eager.rows is not None:  # headscope's rows of the pass (decoding, prefill, replay) against eager's
        value += f", rows {eager.rows:.1e}"
        rows_ok = not math.isnan(eager.rows) and eager.rows <= ROW_LIMIT
    return Figure("scorers", value, limit, worst <= SCORE_LIMIT * scale and rows_ok)


def scorer_pass(loaded, case: ScorerCase, names: list[str], eager: bool, body) -> ScorerRun:
    """Fresh scorers of the case (those named), begun on its batch, handed to `body(scorers, spy)` inside the spy
    (eager: fed the eager rows, the rows' differences noted) or with the spy off; their values afterwards."""
    model = loaded.model
    layers, heads = num_layers_and_heads(model)
    scorers = [scorer for scorer in case.make_scorers() if scorer.name in names]
    for scorer in scorers:
        scorer.begin(case.batch, layers, heads)
    spying = eager and not loaded.eager_fallback
    with Spying(model, enabled=spying, pad=case.batch.pad, eager_rows=True) as spy:
        body(scorers, spy)
    run = ScorerRun({scorer.name: scorer.result().float().cpu() for scorer in scorers},
                    {scorer.name: dict(scorer.unscored) for scorer in scorers})
    if spying:
        found = spy.recorder.differences if spy.recorder is not None else None
        values = (found.decode + found.prefill) if found is not None else []
        run.rows = Differences.worst(values) if values else math.nan
    return run


def decoding_body(loaded, case: ScorerCase, steps: int):
    """The decoding scorers' pass: `steps` greedy steps of the case's prompts."""
    def body(scorers, spy):
        greedy_decode(loaded.model, case.batch.input_ids, case.attention_mask, scorers, steps, StopRule(set(), set()),
                      loaded.eager_fallback)
    return body


def replay_body(loaded, case: ScorerCase):
    """The replaying scorers' pass: each of the case's prompts followed by a scripted think block (teacher-forced),
    replayed as `detect` replays a finished sequence (decode.replay)."""
    def body(scorers, spy):
        prompts = unpadded_prompts(case)
        # the run's think markers (the segment scorers share the task's options; a plug-in may have none)
        markers = next((scorer.markers for scorer in scorers if hasattr(scorer, "markers")), (None, "</think>"))
        scripts = [scripted_think(case.batch.tokenizer, prompt, *markers, loaded.max_context - len(prompt)
                                  if loaded.max_context else None) for prompt in prompts]
        layers = attention_layout(loaded.model).layers
        recorder = Recorder(layers, 1)
        if spy.enabled:  # the replay is one unpadded sequence at a time: every row is compared
            recorder = spy.recorder = EagerRowsRecorder(layers, 1)
        with torch.no_grad():
            replay(loaded.model, recorder, scorers, prompts, scripts, loaded.eager_fallback)
    return body


def unpadded_prompts(case: ScorerCase) -> list[list[int]]:
    ids, mask = case.batch.input_ids, case.attention_mask
    return [row[keep.bool()].tolist() if mask is not None else row.tolist()
            for row, keep in zip(ids, mask if mask is not None else ids)]


SCRIPT_SENTENCES, SCRIPT_WORDS = 8, 8  # the scripted think block: 8 sentences of 8 of the prompt's words


def scripted_think(tokenizer, prompt: list[int], think_start: str | None, think_end: str,
                   budget: int | None) -> list[int]:
    """Token ids of a think block in the run's markers, as a reasoning model would write it after the prompt:
    the start marker (if the run names one), SCRIPT_SENTENCES sentences ending in " ." made of the prompt's own
    words (tokens the model knows), the end marker and a three-word answer. Enough sentences for the receiver
    score (proximity 4 needs 6) and answer queries for reasoning focus; cut to `budget` tokens (the model's
    context left after the prompt)."""
    words = tokenizer.decode(prompt, skip_special_tokens=True).split() or ["the"]
    count = SCRIPT_SENTENCES * SCRIPT_WORDS + 3
    words = (words * (count // len(words) + 1))[-count:]
    sentences = [" ".join(words[i * SCRIPT_WORDS:(i + 1) * SCRIPT_WORDS]) + " ." for i in range(SCRIPT_SENTENCES)]
    text = " ".join(([think_start] if think_start else []) + sentences + [think_end] + words[-3:])
    ids = tokenizer(" " + text, add_special_tokens=False).input_ids
    return ids if budget is None else ids[:max(budget, 0)]


def token_figure(model, input_ids, mask, tokens: list[list[int]], routers: list) -> Figure:
    """headscope's tokens (the padded batch) against eager `generate` on each prompt alone: a sample's tokens must
    not depend on its batch (see the module docstring). Each sample is judged on its own: where its tokens split
    from eager's, the split must be a near tie (`split_verdict`)."""
    steps = len(tokens[0])
    pad = (mask == 0).sum(-1).tolist()
    with on_eager(model):
        runs = [generate_alone(model, input_ids[b:b + 1, pad[b]:], steps) for b in range(len(input_ids))]
    expected = [sequence for sequence, _, _ in runs]
    total = sum(len(t) for t in tokens)
    same = sum(a == b for ours, theirs in zip(tokens, expected) for a, b in zip(ours, theirs))
    limit = f"all equal, or each split a near tie ({rounding(model.dtype)} eps x top)"
    if expected == tokens:
        return Figure("tokens", f"{same}/{total} equal ({len(tokens)} samples)", limit, True)
    splits = [split_verdict(model, input_ids, pad, tokens, runs, routers, sample)
              for sample in range(len(tokens)) if tokens[sample] != expected[sample]]
    return Figure("tokens", "; ".join(text for text, _ in splits), limit, all(tie for _, tie in splits))


def split_verdict(model, input_ids, pad: list[int], tokens, runs, routers: list, sample: int) -> tuple[str, bool]:
    """("sample S from step N: why", whether it is a near tie) for a sample whose tokens split from eager's: the
    reference's logit gap between its token and headscope's, or a mixture-of-experts router's gap at the first
    (position, router) of this sample where the two runs pick different experts (ties.py)."""
    expected, logits_per_step = runs[sample][0], runs[sample][1]
    step = next(s for s, (a, b) in enumerate(zip(expected, tokens[sample])) if a != b)
    logits = logits_per_step[step][0].float()
    gap = float(logits[expected[step]] - logits[tokens[sample][step]])
    where = f"sample {sample} from step {step}: "
    if gap <= tolerance(logits, model.dtype):
        return where + f"logit gap {gap:.1e} (tie)", True
    length = input_ids.shape[1]
    real = torch.arange(length + len(expected))[None, :] >= torch.tensor(pad)[:, None]
    real[torch.arange(len(real)) != sample] = False  # this sample's own positions only
    eager_routers = [[torch.cat([nn.functional.pad(torch.cat(run[2][router], 1), (0, 0, pad[b], 0))
                                 for b, run in enumerate(runs)])] for router in range(len(routers))]
    routing = routing_tie(routers, eager_routers, experts_per_token(model.config), real, length + step, model.dtype)
    tie = routing is not None and routing.startswith("a routing near tie")
    return where + (routing or f"logit gap {gap:.1e}"), tie


def generate_alone(model, input_ids, steps: int):
    """(tokens, each step's logits, the routers' logits per call) of eager greedy `generate` on one unpadded prompt."""
    with torch.no_grad(), logging_routers(model, 1) as routers:
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=steps,
                             do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences[0, input_ids.shape[1]:].tolist(), out.logits, routers


def ablation_figure(loaded, input_ids) -> Figure:
    layout = attention_layout(loaded.model)
    layer, head = layout.layers[len(layout.layers) // 2], layout.heads - 1
    name = f"masking {layer}-{head}"
    outputs = {}

    def keep(module, output):
        if calling_layer(module, module_state(module)) == layer:
            outputs[state_of(loaded.model).ablation is not None] = output.float()  # (batch, q_len, heads, dim)

    with Spying(loaded.model, watch=keep), torch.no_grad():
        loaded.model(input_ids[:1])
        with masking.ablating(loaded.model, {layer: [head]}, "uniform"):
            loaded.model(input_ids[:1])
    if len(outputs) != 2:
        return Figure("ablation", f"layer {layer} not reached", f"{name} changes its output", False)
    change = (outputs[True] - outputs[False]).abs()
    other_heads = change[:, :, torch.arange(layout.heads) != head]
    masked_change = float(change[:, :, head].max())
    others = float(other_heads.max()) if layout.heads > 1 else 0.0
    return Figure("ablation", f"head {masked_change:.2e}, others {others:.1e}",
                  f"{name} changes it (> 0), the others 0", masked_change > 0 and others == 0)


def require(loaded, command: str, need_ablation: bool, cases: list[ScorerCase] = ()) -> None:
    """Before a long run: the check, once per loaded model and set of scorers; refuse with one line when it fails."""
    key = ("ablate" if need_ablation else "detect", tuple(case.label for case in cases))
    if key in loaded.checked:
        return
    report = run_check(loaded, need_ablation=need_ablation, cases=cases)
    if not report.passed:
        worst = report.failing()[0]
        raise HeadscopeError(f"{loaded.name} fails headscope's exactness check ({worst.name}: {worst.value}); "
                             f"run `headscope check --model {loaded.path}` for the table, or pass --no-check to "
                             f"{command} anyway")
    for figure in report.figures:
        if not figure.checked:  # passed, but said: a scorer the check could not compare
            notify(f"the exactness check could not compare {figure.value}")
    loaded.checked.add(key)
