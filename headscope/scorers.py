"""Head scores: each scorer turns the recorded rows of every decoding step into one score per head.

A scorer sees, at each step s, the top-k (attention, position) pairs of every layer and head's
row for the current query position -- `StepView` -- and adds to a (batch, layers, heads) total
with tensor operations on the model's device: no loop over heads, no host sync.

Positions are absolute indices into the (left-padded) sequence: prompt tokens occupy
[0, prompt_len), the token fed at step s >= 1 sits at prompt_len + s - 1.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch

from .errors import HeadscopeError


@dataclass
class PromptBatch:
    """The prompts being decoded together, as the scorers need them."""

    input_ids: torch.Tensor  # (batch, prompt_len) left-padded prompt tokens
    prompt_len: int  # padded prompt length: the first generated token is fed at this position
    span_start: torch.Tensor  # (batch,) start of the needle answer / question span (padded coordinates)
    span_end: torch.Tensor  # (batch,) its end, exclusive; start == end for "no span"
    pad: torch.Tensor | None = None  # (batch,) left padding of each prompt: unpadded index = position - pad
    samples: list = field(default_factory=list)  # the task's Sample objects, for scorers that need more spans


@dataclass
class StepView:
    """What one decoding step recorded, for every layer, sample and head."""

    values: torch.Tensor  # (layers, batch, heads, k) top-k attention probabilities, descending
    positions: torch.Tensor  # (layers, batch, heads, k) their positions; -1 where the row was shorter than k
    tokens: torch.Tensor  # (batch,) the token produced at this step
    active: torch.Tensor  # (batch,) bool: False for samples that had already stopped


class Scorer:
    """Base class. A scorer states `top_k` (how many positions of each row it reads; it may set it
    in `begin` from the batch, the recorder takes the largest of all scorers) and `keep_zeros`
    (whether a passing sample appends a head's zero score to its list).

    Beyond the top-k view of each decoding step, a scorer may ask for (see decode.py):
      prefill rows      `prefill_queries()` -> (start, end): the rows of those query positions, in
                        blocks, through `prefill_rows(layer, query_start, probs)`;
      a calibration     `calibration_prompt()` -> (input_ids, attention_mask, (start, end)): one more
      prompt            prompt, only prefilled, its rows going to `calibration_rows(...)`;
      full step rows    `full_rows = True`: every step's whole rows through `step_rows(layer, probs, offset)`.
    All probs are float32 softmax rows; prefill blocks are (batch, heads, block, kv_len) over keys
    0..kv_len-1 (kv_len > the block's last query position; later keys are masked, so zero).
    """

    name = "scorer"
    top_k = 1
    keep_zeros = True
    full_rows = False

    @classmethod
    def from_options(cls, options) -> "Scorer":
        """Build the scorer from the run's DetectOptions (a plug-in may read any option it needs)."""
        return cls()

    def begin(self, batch: PromptBatch, num_layers: int, num_heads: int) -> None:
        self.batch = batch
        self.total = torch.zeros(batch.input_ids.shape[0], num_layers, num_heads, device=batch.input_ids.device)

    def step(self, view: StepView) -> None:
        self.total += self.step_scores(view).transpose(0, 1) * view.active[:, None, None]

    def step_scores(self, view: StepView) -> torch.Tensor:
        """(layers, batch, heads) score contributed by this step."""
        raise NotImplementedError

    def result(self) -> torch.Tensor:
        """(batch, layers, heads) score of each sample."""
        return self.total

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


def _in_span(positions: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """positions: (layers, batch, heads, ...); start/end: (batch,). Elementwise start <= p < end."""
    shape = (1, -1) + (1,) * (positions.dim() - 2)
    return (positions >= start.view(shape)) & (positions < end.view(shape))


class RetrievalScorer(Scorer):
    """Retrieval score (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context Factuality").

    With the needle answer at prompt positions [ns, ne), at each step s:
        i* = argmax_j A[l, h, j]
        score[l, h] += 1 / (ne - ns)   if ns <= i* < ne and prompt_ids[i*] == y_s
    i.e. the head is copying, from the needle, exactly the token the model is writing.
    """

    name = "retrieval"
    top_k = 1
    keep_zeros = True

    def step_scores(self, view: StepView) -> torch.Tensor:
        top = view.positions[..., 0]  # (layers, batch, heads)
        layers, batch, heads = top.shape
        prompt_ids = self.batch.input_ids
        in_needle = _in_span(top, self.batch.span_start, self.batch.span_end)
        # Token at each head's argmax (clamped: positions outside the prompt are already out of the span).
        looked_at = top.clamp(0, prompt_ids.shape[1] - 1).permute(1, 0, 2).reshape(batch, layers * heads)
        looked_at_token = prompt_ids.gather(1, looked_at).view(batch, layers, heads).permute(1, 0, 2)
        copied = in_needle & (looked_at_token == view.tokens.view(1, batch, 1))
        needle_len = (self.batch.span_end - self.batch.span_start).clamp(min=1).float()
        return copied.float() / needle_len.view(1, batch, 1)


class ReasoningScorer(Scorer):
    """Reasoning score: top-k attention mass on the model's own generated tokens plus the question.

    With the question at [qs, qe) and the prompt ending at prompt_len, at each step s:
        T = the top-k positions of A[l, h, :]
        score[l, h] += generated_weight * sum(A[i] for i in T if i >= prompt_len)
                     + query_weight     * sum(A[i] for i in T if qs <= i < qe)
    (positions >= prompt_len are the generated tokens fed so far, the current one included).
    Only heads with a score > 0 join a head's list, unless `keep_zeros`.
    """

    name = "reasoning"
    keep_zeros = False

    @classmethod
    def from_options(cls, options) -> "ReasoningScorer":
        return cls(options.top_k, options.generated_weight, options.query_weight, options.keep_zeros)

    def __init__(self, top_k: int = 5, generated_weight: float = 1.0, query_weight: float = 0.5,
                 keep_zeros: bool = False):
        self.top_k = top_k
        self.generated_weight = generated_weight
        self.query_weight = query_weight
        self.keep_zeros = keep_zeros

    def step_scores(self, view: StepView) -> torch.Tensor:
        values = view.values[..., : self.top_k]  # (layers, batch, heads, k)
        positions = view.positions[..., : self.top_k]
        on_generated = positions >= self.batch.prompt_len
        on_question = _in_span(positions, self.batch.span_start, self.batch.span_end)
        weights = self.generated_weight * on_generated + self.query_weight * on_question
        return (values * weights).sum(-1)


SCORERS: dict[str, type[Scorer]] = {}


def register_scorer(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator: make a scorer usable by name (`--scorer NAME`)."""
    SCORERS[cls.name] = cls
    return cls


register_scorer(RetrievalScorer)
register_scorer(ReasoningScorer)
from . import field_scorers  # noqa: E402,F401  registers r2, query and the pattern scorers


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
