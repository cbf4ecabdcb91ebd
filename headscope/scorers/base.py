"""The scorer protocol: what the engine hands a scorer, what a scorer hands back, and the registry.

A scorer sees, at each step s, the top-k (attention, position) pairs of every layer and head's
row for the current query position -- `StepView` -- and adds to a (batch, layers, heads) total
with tensor operations on the model's device: no loop over heads, no host sync.

Positions are absolute indices into the (left-padded) sequence: prompt tokens occupy
[0, prompt_len), the token fed at step s >= 1 sits at prompt_len + s - 1.

Accumulation rule (`store.joins_list`): a passing sample's value joins a head's list unless it is no value
(null) or a zero of a scorer whose zero means "did not fire" (`keep_zeros = False`); signed values are
always kept. `keep_zeros` is declared once, on the scorer, written into every samples row, and read back
by every consumer (the engine's heads file, `show --bootstrap`, the report) through `keeps_zeros`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch

from ..errors import HeadscopeError


@dataclass
class PromptBatch:
    """The prompts being decoded together, as the scorers need them."""

    input_ids: torch.Tensor  # (batch, prompt_len) left-padded prompt tokens
    prompt_len: int  # padded prompt length: the first generated token is fed at this position
    span_start: torch.Tensor  # (batch,) start of the needle answer / question span (padded coordinates)
    span_end: torch.Tensor  # (batch,) its end, exclusive; start == end for "no span"
    pad: torch.Tensor | None = None  # (batch,) left padding of each prompt: unpadded index = position - pad
    samples: list = field(default_factory=list)  # the task's Sample objects, for scorers that need more spans
    tokenizer: object = None  # the model's tokenizer, for scorers that read the generated text (segments)


@dataclass
class StepView:
    """What one decoding step recorded, for every layer, sample and head."""

    values: torch.Tensor  # (layers, batch, heads, k) top-k attention probabilities, descending
    positions: torch.Tensor  # (layers, batch, heads, k) their positions; -1 where the row was shorter than k
    tokens: torch.Tensor  # (batch,) the token produced at this step
    active: torch.Tensor  # (batch,) bool: False for samples that had already stopped
    tied: torch.Tensor | None = None  # (layers, batch, heads) bool: a tie in the row's top k + 1 (ties.top_k)


class Scorer:
    """Base class. A scorer states `top_k` (how many positions of each row it reads; it may set it
    in `begin` from the batch, the recorder takes the largest of all scorers) and `keep_zeros`
    (whether a passing sample appends a head's zero score to its list).

    Beyond the top-k view of each decoding step, a scorer may ask for (see decode.py):
      prefill rows      `prefill_queries()` -> (start, end): the rows of those query positions, in
                        blocks, through `prefill_rows(layer, query_start, probs)`;
      a calibration     `calibration_prompt()` -> (input_ids, attention_mask, (start, end)): one more
      prompt            prompt, only prefilled, its rows going to `calibration_rows(...)`;
      full step rows    `full_rows = True`: every step's whole rows through `step_rows(layer, probs, offset)`;
      replay rows       `replays = True`: once a sample has stopped, its finished sequence (prompt + generated,
                        unpadded) is prefilled alone and the rows of `replay_queries(...)` go to `replay_rows`.
    All probs are float32 softmax rows; prefill blocks are (batch, heads, block, kv_len) over keys
    0..kv_len-1 (kv_len > the block's last query position; later keys are masked, so zero).

    No value: a scorer marks a head of a sample that has no value (a constant vector has no kurtosis) with NaN
    in `result()`, and a sample that has no value at all by a reason in `unscored` (sample -> one line): the
    engine writes null and the reason, and the sample adds nothing to any head's list.
    """

    name = "scorer"
    top_k = 1
    keep_zeros = True
    full_rows = False
    replays = False
    reads_top_k = True  # its score reads the step's top-k view: the engine counts that view's ties (ties.py)

    @classmethod
    def from_options(cls, options) -> "Scorer":
        """Build the scorer from the run's DetectOptions (a plug-in may read any option it needs)."""
        return cls()

    def begin(self, batch: PromptBatch, num_layers: int, num_heads: int) -> None:
        self.batch = batch
        self.total = torch.zeros(batch.input_ids.shape[0], num_layers, num_heads, device=batch.input_ids.device)
        self.unscored: dict[int, str] = {}

    def step(self, view: StepView) -> None:
        self.total += self.step_scores(view).transpose(0, 1) * view.active[:, None, None]

    def step_scores(self, view: StepView) -> torch.Tensor:
        """(layers, batch, heads) score contributed by this step."""
        raise NotImplementedError

    def result(self) -> torch.Tensor:
        """(batch, layers, heads) score of each sample; NaN: no value (see the class)."""
        return self.with_unscored(self.total)

    def with_unscored(self, scores: torch.Tensor) -> torch.Tensor:
        """`scores` with the unscored samples' values NaN."""
        for sample in self.unscored:
            scores[sample] = float("nan")
        return scores

    def sample_fields(self) -> dict[int, dict]:
        """After `result()`: fields this scorer adds to a sample's row (sample -> {name: JSON value}); none here."""
        return {}

    def prefill_queries(self) -> tuple[int, int] | None:
        """Query positions [start, end) (padded coordinates) whose prefill rows this scorer wants; None: none."""
        return None

    def prefill_rows(self, layer: int, query_start: int, probs: torch.Tensor) -> None:
        """probs (batch, heads, block, kv_len): rows of query positions query_start, query_start + 1, ..."""

    def calibration_prompt(self):
        """(input_ids, attention_mask or None, (start, end)): a prompt prefilled before the real one; None: none."""
        return None

    def calibration_rows(self, layer: int, query_start: int, probs: torch.Tensor) -> None:
        """Like prefill_rows, for the calibration prompt."""

    def step_rows(self, layer: int, probs: torch.Tensor, offset: int) -> None:
        """With full_rows: probs (batch, heads, kv_len), the step's whole rows; key j sits at position offset + j."""

    def replay_queries(self, sample: int, sequence: list[int], prompt_len: int) -> tuple[int, int] | None:
        """With replays: the query positions [start, end) of this sample's finished sequence whose rows the scorer
        wants (None: none); prompt_len: its unpadded prompt length."""
        return None

    def replay_rows(self, sample: int, layer: int, query_start: int, probs: torch.Tensor) -> None:
        """probs (1, heads, block, kv_len): rows of the sample's finished sequence from query_start on."""


def in_span(positions: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """positions: (layers, batch, heads, ...); start/end: (batch,). Elementwise start <= p < end."""
    shape = (1, -1) + (1,) * (positions.dim() - 2)
    return (positions >= start.view(shape)) & (positions < end.view(shape))



SCORERS: dict[str, type[Scorer]] = {}


def register_scorer(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator: make a scorer usable by name (`--scorer NAME`)."""
    SCORERS[cls.name] = cls
    return cls


def load_scorer(spec: str, options) -> Scorer:
    """A registered name ("retrieval") or a class in any importable module ("mypkg.module:MyScorer")."""
    if ":" in spec:
        module_name, _, class_name = spec.partition(":")
        try:
            scorer_class = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as error:
            raise HeadscopeError(f"cannot load scorer {spec!r}: {error}") from None
        if not (isinstance(scorer_class, type) and issubclass(scorer_class, Scorer)):
            raise HeadscopeError(f"{spec!r} is not a headscope.scorers.Scorer subclass")
    elif spec in SCORERS:
        scorer_class = SCORERS[spec]
    else:
        raise HeadscopeError(f"unknown scorer {spec!r}: choose from {', '.join(sorted(SCORERS))} or give module:Class")
    return scorer_class.from_options(options)


def keeps_zeros(rows: list[dict]) -> bool:
    """The accumulation rule of the scorer that wrote these samples rows (they must agree)."""
    rules = {row.get("keep_zeros") for row in rows if row.get("head_scores") is not None}
    if None in rules:
        raise HeadscopeError("a samples row has no keep_zeros field (written before headscope recorded the "
                             "accumulation rule in each row): re-run or add the field")
    if len(rules) > 1:
        raise HeadscopeError("the samples rows mix accumulation rules (keep_zeros true and false)")
    return rules.pop() if rules else True
