"""Greedy decoding with a KV cache, recording every step's attention rows for the scorers.

The prompt minus its last token is prefilled on the fast attention path with nothing
recorded; the last prompt token is then fed as the first single-query step. So step 0's row
is the last prompt position's, step s >= 1's is that of generated token s - 1, and every
recorded step is a one-query forward pass (linear memory, one attention computation).

Prefill rows. A scorer whose `prefill_queries()` returns (start, end) gets the softmax rows of the
query positions [start, end) (padded coordinates) through `prefill_rows(layer, query_start, probs)`,
each exactly once: the rows [start, prompt_len - 1) come block by block from the prefill pass, and the
last prompt position's row -- which is decoding step 0's -- is handed over as one more one-row block
at step 0 (left-padded with zeros when a sliding-window cache dropped its first keys), besides going
to the top-k view as usual. So the prefill stays prompt[:-1] and nothing is computed twice.

Calibration prompts. A scorer whose `calibration_prompt()` returns (input_ids, attention_mask,
(start, end)) gets that prompt prefilled once more before the real one, in a throw-away cache, with
the rows [start, end) handed to `calibration_rows(layer, query_start, probs)` (QRHead's null query).

Full decoding rows. A scorer with `full_rows = True` gets every step's whole rows through
`step_rows(layer, probs (batch, heads, kv_len), offset)` (offset: position of key 0) before `step`.

Replay. A scorer with `replays = True` reads finished sequences: after the decode, each sample's prompt plus
the tokens it generated is prefilled alone (batch size 1, no padding, a throw-away cache) and the rows of the
query positions the scorer asks for (`replay_queries`) go to `replay_rows`, block by block. Its score so
depends on the sample's own tokens only, whatever the batch, and reads the same rows a full forward pass of
the text would give (what the reasoning-model papers' code reads).

Models whose attention is not on the interface (`eager_fallback`) give all these rows from the model's
eager `output_attentions` instead: the decoding steps' rows, and the passes above (quadratic in memory).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from ..attention.caches import carry_cache, fresh_cache, positions_of
from ..attention.layout import attention_layout, on_eager
from ..attention.recorder import Recorder, prefilling, recording
from ..attention.runstate import state_of
from ..scorers import Scorer, StepView


@dataclass
class StopRule:
    eos_ids: set[int]
    newline_ids: set[int]  # tokens whose text is a newline; empty with --no-stop-at-newline

    def stops(self, token: int) -> bool:
        return token in self.eos_ids or token in self.newline_ids


def newline_token_ids(tokenizer) -> set[int]:
    """Ids of tokens whose decoded text contains a newline ("\\n", "<0x0A>", byte-level "Ċ", "ĊĊĊ", "ĠĊ", ".\\n", ...)."""
    texts = tokenizer.batch_decode([[index] for index in range(len(tokenizer))])
    return {index for index, text in enumerate(texts) if "\n" in text}


def eos_token_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    return ids


def num_layers_and_heads(model) -> tuple[int, int]:
    """(attention layers, query heads per layer): the scorers' dense (layers, heads) grid. Slot i is the real layer
    attention_layout(model).layers[i]; in a model with attention in every layer, slot = layer."""
    layout = attention_layout(model)
    return len(layout.layers), layout.heads


@torch.no_grad()
def greedy_decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, scorers: list[Scorer],
                  max_new_tokens: int, stop: StopRule, eager_fallback: bool = False) -> list[list[int]]:
    """Decode the (left-padded) prompts, feeding every step to the scorers, then replay the finished sequences
    to the scorers that read them. Returns each sample's tokens.

    input_ids: (batch, prompt_len); attention_mask: (batch, prompt_len) or None when nothing is padded.
    The recorder is the run state's `make_recorder(layers, top_k)` when set (check.py: one that feeds the scorers
    the eager rows), else a Recorder of the model's attention layers.
    """
    prompt_len = input_ids.shape[1]
    make_recorder = state_of(model).make_recorder or Recorder
    recorder = make_recorder(attention_layout(model).layers, max((s.top_k for s in scorers), default=1))  # after begin(): k may depend on the batch
    cache_kw = fresh_cache(model)
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    positions = positions_of(mask)
    padded = attention_mask is not None and not bool(mask.all())

    for scorer in scorers:  # calibration prompts first, each in a throw-away cache
        calibration = scorer.calibration_prompt()
        if calibration is not None:
            ids, calibration_mask, (start, end) = calibration
            rows_pass(model, recorder, [(start, end, scorer.calibration_rows)], eager_fallback, input_ids=ids,
                      attention_mask=calibration_mask, position_ids=positions_of(
                          calibration_mask if calibration_mask is not None else torch.ones_like(ids)),
                      logits_to_keep=1, **fresh_cache(model))
    targets = prefill_targets(scorers, prompt_len)
    if prompt_len > 1:
        carry_cache(cache_kw, rows_pass(model, recorder, targets, eager_fallback, input_ids=input_ids[:, :-1],
                                        attention_mask=mask[:, :-1] if padded else None,
                                        position_ids=positions[:, :-1], logits_to_keep=1, **cache_kw))
    step_zero_hook = last_prompt_row_hook(targets, prompt_len)
    if step_zero_hook is not None:
        recorder.row_hooks.append(step_zero_hook)
    recorder.row_hooks.extend(s.step_rows for s in scorers if s.full_rows)
    state = DecodeState(model, recorder, scorers, cache_kw, mask if padded else None, positions[:, -1:],
                        step_zero_hook, eager_fallback, prompt_len)
    with on_eager(model) if eager_fallback else contextlib.nullcontext():  # decoding steps: eager rows
        generated = decode_steps(state, input_ids[:, -1:], max_new_tokens, stop)
    replaying = [scorer for scorer in scorers if scorer.replays]
    if replaying:
        prompts = [row[keep.bool()].tolist() for row, keep in zip(input_ids, mask)]  # unpadded
        replay(model, recorder, replaying, prompts, generated, eager_fallback)
    return generated


def rows_pass(model, recorder: Recorder, targets: list, eager: bool, **forward):
    """One forward pass, from an empty cache, that hands the rows of the query positions each target
    (start, end, hook) asks for to its hook: computed block by block inside headscope's attention function, or,
    for a model not on the interface (`eager`), cut from its eager output_attentions (memory quadratic there)."""
    if not targets:
        return model(**forward)
    if not eager:
        with prefilling(model, recorder, targets):
            return model(**forward)
    with on_eager(model):
        output = model(**forward, output_attentions=True)
    for layer, weights in enumerate(w for w in output.attentions if w is not None):  # (batch, heads, q, kv)
        first = weights.shape[-1] - weights.shape[-2]  # key index of the pass's first query
        for start, end, hook in targets:
            a, b = max(start, first), min(end, weights.shape[-1])
            if a < b:
                hook(layer, a, weights[:, :, a - first:b - first].float())
    return output


def replay(model, recorder: Recorder, scorers: list[Scorer], prompts: list[list[int]], generated: list[list[int]],
           eager: bool) -> None:
    """Prefill each finished sequence (its prompt + what it generated) alone, in a throw-away cache, handing the
    rows each scorer asks for (`replay_queries`) to its `replay_rows`: a sample's score sees its own tokens only."""
    device = model.get_input_embeddings().weight.device
    for sample, (prompt, tokens) in enumerate(zip(prompts, generated)):
        sequence = prompt + tokens
        targets = [target for scorer in scorers
                   if (target := clipped(scorer.replay_queries(sample, sequence, len(prompt)), len(sequence),
                                         functools.partial(scorer.replay_rows, sample)))]
        if targets:
            ids = torch.tensor([sequence], device=device)
            rows_pass(model, recorder, targets, eager, input_ids=ids, position_ids=positions_of(torch.ones_like(ids)),
                      logits_to_keep=1, **fresh_cache(model))


@dataclass
class DecodeState:
    """What the single-query steps carry from one step to the next."""

    model: object
    recorder: Recorder
    scorers: list[Scorer]
    cache_kw: dict  # the KV cache, as forward keyword arguments
    mask: torch.Tensor | None  # (batch, length) padding mask, grown by one per step; None when nothing is padded
    position: torch.Tensor  # (batch, 1) position of the token fed next
    step_zero_hook: object  # the row hook of the last prompt position, removed after step 0 (or None)
    eager_fallback: bool
    prompt_len: int  # padded prompt length: the sequence is this long at step 0, one longer each step


def decode_steps(state: DecodeState, next_input: torch.Tensor, max_new_tokens: int, stop: StopRule) -> list[list[int]]:
    """The single-query steps: feed, record, score, stop. next_input: (batch, 1) the last prompt token."""
    model, recorder = state.model, state.recorder
    batch, device = next_input.shape[0], next_input.device
    generated: list[list[int]] = [[] for _ in range(batch)]
    active = [True] * batch  # on the host: the stopping rule reads it without a device sync
    for step in range(max_new_tokens):
        with recording(model, recorder, seq_len=state.prompt_len + step):
            output = model(next_input, attention_mask=state.mask, position_ids=state.position,
                           output_attentions=state.eager_fallback, **state.cache_kw)
        carry_cache(state.cache_kw, output)
        if state.eager_fallback:
            recorder.add_eager_attentions(output.attentions)
        tokens = output.logits[:, -1].argmax(-1)  # (batch,)
        values, top_positions = recorder.take(device)
        tied = recorder.take_ties(device)
        if step == 0 and state.step_zero_hook is not None:  # the last prompt row is handed over once
            recorder.row_hooks.remove(state.step_zero_hook)
        view = StepView(values=values, positions=top_positions, tokens=tokens,
                        active=torch.tensor(active, device=device), tied=tied)  # a copy to the device, not a sync
        for scorer in state.scorers:
            scorer.step(view)
        for i, token in enumerate(tokens.tolist()):  # the step's one host sync, for the stopping rule
            if active[i]:
                generated[i].append(token)
                active[i] = not stop.stops(token)
        if not any(active):
            break
        next_input = tokens[:, None]
        state.position = state.position + 1
        if state.mask is not None:
            state.mask = torch.cat([state.mask, torch.ones_like(state.mask[:, :1])], dim=1)
    return generated


def prefill_targets(scorers: list[Scorer], prompt_len: int) -> list[tuple[int, int, object]]:
    """(start, end, hook) of every scorer that wants prefill rows, clipped to the prompt."""
    return [target for scorer in scorers if (target := clipped(scorer.prefill_queries(), prompt_len,
                                                                scorer.prefill_rows))]


def clipped(wanted, length: int, hook) -> tuple[int, int, object] | None:
    """(start, end, hook) for the query positions [start, end) a scorer wants, clipped to [0, length); None when
    it wants none there."""
    if wanted is None:
        return None
    start, end = max(int(wanted[0]), 0), min(int(wanted[1]), length)
    return (start, end, hook) if start < end else None


def last_prompt_row_hook(targets, prompt_len: int):
    """A row hook for step 0 that hands the last prompt position's row to the targets that want it; None if none does."""
    wanting = [hook for start, end, hook in targets if start <= prompt_len - 1 < end]
    if not wanting:
        return None

    def hook(layer, probs, offset):
        row = probs.new_zeros(*probs.shape[:2], 1, offset + probs.shape[-1])  # keys from position 0
        row[:, :, 0, offset:] = probs
        for deliver in wanting:
            deliver(layer, prompt_len - 1, row)

    return hook
