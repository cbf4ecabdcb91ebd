"""Which layers of a model have attention heads, found by watching one short forward pass (the probe).

A hybrid model (Qwen3-Next, Jamba, MiniMax, ...) has attention in some layers and state-space or
linear-attention blocks in the others; only attention layers have heads to score. headscope's attention
function notes every call of the probe pass -- its layer (runstate.calling_layer), its query and key, its
sliding window -- and `AttentionLayout` is what that shows:

  layers   the real indices of the attention layers, ascending. Scorers, the recorder's step view and the
           samples' `head_scores` hold them densely, in this order (slot i is layer layers[i]); heads files,
           summaries, pictures, the report and `show` name heads by real index ("LAYER-HEAD").
  heads    query heads per attention layer (the same in every one, or the model is refused).

A layer may call attention twice on the very same query and key (DiffLlama's two maps per head, computed
once for each half of the values): its rows are recorded once. A layer that calls it again on other queries
(a looped or shared block run twice per token) has no single row per head: refused by name. So is a model
with no attention layer at all (Mamba, RWKV, ...). Models off the interface (eager fallback) are probed by
eager `output_attentions`: they must have attention in every layer, since their layers cannot be told apart.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .caches import carry_cache, fresh_cache, positions_of
from ..errors import HeadscopeError
from .recorder import install, on_interface
from .runstate import HEAD_COUNT, LAYER_COUNT, config_count, state_of

PROBE_TOKENS = 8
INCREMENTAL_WINDOW = 1024  # windows up to this are crossed by the incremental-decoding probe at load


@dataclass(frozen=True)
class AttentionLayout:
    layers: tuple[int, ...]  # real indices of the attention layers, ascending; slot i holds layers[i]
    heads: int  # query heads per attention layer
    total_layers: int  # decoder layers, attention or not
    windows: tuple = ()  # each attention layer's sliding window as the model passes it (None: none)
    via_interface: bool = True  # False: attention off the interface, recorded from eager attentions (recorder.py)
    left_padding: bool = True  # False: a left-padded prompt gives other logits than alone (pads_like_alone)

    @property
    def slots(self) -> dict[int, int]:
        """Real layer index -> its dense slot."""
        return {layer: slot for slot, layer in enumerate(self.layers)}

    @property
    def hybrid(self) -> bool:
        return len(self.layers) < self.total_layers

    @property
    def smallest_window(self) -> int | None:
        bound = [window for window in self.windows if window]
        return min(bound) if bound else None

    def describe(self) -> str:
        """"attention layers 1, 3 of 4" for a hybrid, "4 attention layers" otherwise."""
        if not self.hybrid:
            return f"{len(self.layers)} attention layers"
        return f"attention layers {', '.join(map(str, self.layers))} of {self.total_layers}"


@dataclass
class Probe:
    """Notes each attention call of one forward pass: layer -> (query, key) of its first call, windows, heads."""

    first_call: dict = field(default_factory=dict)  # layer -> (query, key)
    windows: dict = field(default_factory=dict)  # layer -> sliding window (None: none)
    heads: dict = field(default_factory=dict)  # layer -> query heads
    names: dict = field(default_factory=dict)  # layer -> the attention module's class name
    repeated: set = field(default_factory=set)  # layers that called again on other queries
    extra_keys: dict = field(default_factory=dict)  # layer -> (tokens, keys) where keys are not the pass's tokens

    def saw(self, layer, module, query, key, sliding_window) -> None:
        if layer is None:
            raise HeadscopeError(f"{type(module).__name__} calls its attention function outside any decoder layer "
                                 "and has no layer_idx: headscope cannot tell which layer its heads belong to")
        if layer in self.first_call:
            same_query, same_key = self.first_call[layer]
            if not (same_query is query and same_key is key):
                self.repeated.add(layer)
            return
        self.first_call[layer] = (query, key)
        if key.shape[2] != query.shape[2]:  # a pass with no cache: one key per token, or keys are something else
            self.extra_keys[layer] = (query.shape[2], key.shape[2])
        self.windows[layer], self.heads[layer] = sliding_window, query.shape[1]
        self.names[layer] = type(module).__name__


def attention_layout(model) -> AttentionLayout:
    """The model's layout, probed once and kept in its run state."""
    state = state_of(model)
    if state.layout is None:
        state.layout = probe_layout(model)
    return state.layout


def has_heads(model) -> bool:
    """The config names attention heads (a model with no attention layer, Mamba or RWKV, names none)."""
    config = model.config.get_text_config(decoder=True)
    return any(isinstance(getattr(config, name, None), int) and getattr(config, name) > 0 for name in HEAD_COUNT)


def total_layers(model) -> int:
    return config_count(model.config.get_text_config(decoder=True), LAYER_COUNT) or 0


def probe_input(model, length: int = PROBE_TOKENS) -> torch.Tensor:
    """(1, length) token ids cycling through the vocabulary (its first 4 ids, often special, left out)."""
    embeddings = model.get_input_embeddings()
    vocab = embeddings.num_embeddings
    return (torch.arange(length) % max(vocab - 4, 1) + min(4, vocab - 1))[None].to(embeddings.weight.device)


def config_window(model) -> int | None:
    """The text config's sliding window (a model may keep it out of the attention function's arguments)."""
    config = model.config.get_text_config(decoder=True)
    windows = [getattr(config, name, None) for name in ("sliding_window", "attention_window_size", "window_size")]
    return min((w for w in windows if isinstance(w, int) and w > 0), default=None)


def probe_layout(model) -> AttentionLayout:
    """Probe the model on headscope's attention (switching to it for the probe if it is elsewhere) and count its
    eager attentions; refuse what headscope cannot score."""
    name, previous = type(model).__name__, model.config._attn_implementation
    switched = not on_interface(model) and install(model)  # e.g. a reference model on eager: probe it on ours
    try:
        probe = probe_interface(model) if on_interface(model) else None
    finally:
        if switched:
            model.set_attn_implementation(previous)
    eager = eager_attentions(model)
    if probe is not None and probe.first_call:
        layers = sorted(probe.first_call)
        if probe.repeated:
            layer = min(probe.repeated)
            raise HeadscopeError(f"{name} runs the attention of layer {layer} ({probe.names[layer]}) more than once "
                                 "per token on different queries (a looped or shared block): its heads have no "
                                 "single row, so headscope refuses this model")
        if probe.extra_keys:
            layer, (tokens, keys) = min(probe.extra_keys.items())
            raise HeadscopeError(f"{name} attends over {keys} keys for {tokens} tokens in layer {layer} "
                                 f"({probe.names[layer]}: keys that are not one per token, e.g. compressed entries): "
                                 "headscope's key positions would be wrong, so it refuses this model")
        if eager is not None and len(eager) > len(layers):
            raise HeadscopeError(f"{name} has {len(eager)} attention layers but only {len(layers)} use transformers' "
                                 "attention interface: headscope would miss the others, so it refuses this model")
        heads, windows = [probe.heads[layer] for layer in layers], tuple(probe.windows[layer] for layer in layers)
        via_interface = True
    else:  # nothing called headscope's function: eager attentions, decoding steps only (recorder.py)
        if not eager and not has_heads(model):
            raise HeadscopeError(f"{name} has no attention layers: nothing to score")
        if not eager:
            raise HeadscopeError(f"{name} neither uses transformers' attention interface nor returns its attention "
                                 "weights (output_attentions): headscope cannot record its heads")
        if len(eager) != total_layers(model):
            raise HeadscopeError(f"{name} does not use transformers' attention interface and has attention in only "
                                 f"{len(eager)} of its {total_layers(model)} layers: headscope cannot tell which")
        layers, heads, windows, via_interface = list(range(len(eager))), eager, (), False
    if len(set(heads)) > 1:
        raise HeadscopeError(f"{name} has {heads[0]} query heads in layer {layers[0]} and "
                             f"{next(h for h in heads if h != heads[0])} in another: headscope needs the same number "
                             "of heads in every attention layer")
    # Past the window, where a sliding cache and a whole pass part ways (Moshi); larger windows: the check's tokens.
    window = min([w for w in windows if w] + [config_window(model) or INCREMENTAL_WINDOW + 1])
    require_incremental_decoding(model, name, max(PROBE_TOKENS, window + 4) if window <= INCREMENTAL_WINDOW else
                                 PROBE_TOKENS)
    return AttentionLayout(tuple(layers), heads[0], max(total_layers(model), layers[-1] + 1), windows, via_interface,
                           pads_like_alone(model))


@contextlib.contextmanager
def on_eager(model):
    """The model on its own eager attention inside this block (the reference of the probes below and of the
    check's tokens; a model off the interface: its rows from output_attentions), switched back after it."""
    previous = model.config._attn_implementation
    try:
        model.set_attn_implementation("eager")
        yield
    finally:
        if model.config._attn_implementation != previous:
            model.set_attn_implementation(previous)


def logits_tolerance(model, logits: torch.Tensor) -> float:
    """float32 agrees to rounding; bf16/fp16 round cached or shifted keys differently from a whole pass."""
    return (1e-3 if model.dtype == torch.float32 else 0.05) * max(1.0, float(logits.float().abs().max()))


def pads_like_alone(model, pad: int = 3) -> bool:
    """Whether a prompt left-padded by `pad` tokens (masked out, positions counted from the mask, as headscope
    passes them) gives the logits the prompt gives alone, on the model's own eager attention. A model that ignores
    position_ids (learned positions counted from the cache, as BigBird-Pegasus' decoder) reads a padded prompt at
    shifted positions: headscope then decodes it one prompt at a time (engine.batch_size)."""
    ids = probe_input(model, 16)
    padded = torch.cat([torch.zeros_like(ids[:, :pad]), ids], 1)
    mask = torch.ones_like(padded)
    mask[:, :pad] = 0
    try:
        with on_eager(model), torch.no_grad():
            alone = model(ids, position_ids=torch.arange(ids.shape[1], device=ids.device)[None]).logits[0, -1]
            shifted = model(padded, attention_mask=mask, position_ids=positions_of(mask)).logits[0, -1]
    except (RuntimeError, ValueError, TypeError, IndexError):  # no padded batch at all: one prompt at a time
        return False
    return float((alone.float() - shifted.float()).abs().max()) <= logits_tolerance(model, alone)


def require_incremental_decoding(model, name: str, length: int = PROBE_TOKENS) -> None:
    """headscope decodes one token at a time with a KV cache: refuse, in one line, a model whose own code (on eager
    attention) fails that way or gives other logits than a pass over the whole sequence -- a prefill of the probe
    tokens but the last, then one step (CpmAnt builds its masks from the whole input on every pass; GPT-1 keeps
    no cache)."""
    ids = probe_input(model, length)
    try:
        with on_eager(model), torch.no_grad():
            cache = fresh_cache(model)
            whole = model(ids, position_ids=torch.arange(ids.shape[1], device=ids.device)[None]).logits[0, -1]
            carry_cache(cache, model(ids[:, :-1], position_ids=torch.arange(ids.shape[1] - 1, device=ids.device)[None],
                                     **cache))
            step = model(ids[:, -1:], position_ids=torch.tensor([[ids.shape[1] - 1]], device=ids.device),
                         **cache).logits[0, -1]
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError) as error:
        text = str(error).strip().splitlines()
        raise HeadscopeError(f"{name} fails when decoded one token at a time with its KV cache, as headscope decodes "
                             f"({type(error).__name__}: {text[0][:120] if text else ''})") from None
    gap = float((step.float() - whole.float()).abs().max())
    if gap > logits_tolerance(model, whole):
        raise HeadscopeError(f"{name} gives other logits when decoded one token at a time with its KV cache than on "
                             f"the whole sequence (max diff {gap:.2g}: its cache and a whole pass disagree): headscope decodes that "
                             "way, so it refuses this model")


def probe_interface(model) -> Probe:
    """Every call of one short pass on headscope's attention function."""
    probe = Probe()
    state = state_of(model)
    state.probe = probe
    try:
        with torch.no_grad():
            model(probe_input(model), use_cache=False)
    finally:
        state.probe = None
    return probe


def eager_attentions(model) -> list[int] | None:
    """The query heads of each softmax attention map a short eager pass returns (output_attentions), one per
    attention layer; None when the model cannot return them. Only (batch, heads, T, T) maps of non-negative rows
    summing to at most 1 count: a linear-attention block's state (MiniMax's lightning attention) is not one."""
    previous, length = model.config._attn_implementation, PROBE_TOKENS
    try:
        model.set_attn_implementation("eager")
        with torch.no_grad():
            output = model(probe_input(model), use_cache=False, output_attentions=True)
    except (ValueError, TypeError, NotImplementedError, RuntimeError):
        return None
    finally:
        if model.config._attn_implementation != previous:
            model.set_attn_implementation(previous)
    returned = [weights for weights in getattr(output, "attentions", None) or () if weights is not None]
    if not returned and model.config._attn_implementation != "eager":  # it could not switch to eager: unknown
        return None
    maps = [weights for weights in returned if isinstance(weights, torch.Tensor)
            and weights.dim() == 4 and weights.shape[-2:] == (length, length)]
    return [weights.shape[1] for weights in maps
            if bool((weights >= 0).all()) and bool((weights.float().sum(-1) <= 1 + 1e-3).all())]
