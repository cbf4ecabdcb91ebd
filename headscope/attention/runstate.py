"""The run state: what headscope's attention function does for one model during a run.

`state_of(model)` attaches one `RunState` to the model and to each of its modules. The attention function
reads `module.headscope_state` -- the state of the model it is called for -- never a module global, so two
models in one process record and mask heads independently.

Which layer is calling. A layer is a place in the model's stack of decoder layers (the ModuleList with one
entry per `num_hidden_layers`): a pre-hook on each entry sets `RunState.layer` while it runs. That is the
layer a head belongs to even where a module's `layer_idx` is missing (Zamba's shared attention blocks) or
names something else; models without such a stack fall back to `module.layer_idx`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .kv import Policy
    from .layout import Probe
    from .masking import Ablation
    from .recorder import Recorder

ATTRIBUTE = "headscope_state"


@dataclass
class RunState:
    recorder: "Recorder | None" = None  # records the forward pass in flight (None: nothing is recorded)
    ablation: "Ablation | None" = None  # heads masked on every forward pass (None: none)
    kv_policy: "Policy | None" = None  # a KV cache policy replayed on every forward pass (kv.py; None: none)
    probe: "Probe | None" = None  # notes every attention call of the pass in flight (layout.py)
    layer: int | None = None  # the decoder layer running now (None: outside the stack, or no stack found)
    layout: object = None  # the model's AttentionLayout, once probed (layout.py)
    make_recorder: object = None  # (layers, top_k) -> the next decode's recorder (check.py); None: a Recorder


def state_of(model) -> RunState:
    """The model's run state, attached on first use (with the decoder layers' hooks)."""
    state = getattr(model, ATTRIBUTE, None)
    if state is None:
        state = RunState()
        for module in model.modules():
            setattr(module, ATTRIBUTE, state)
        for index, layer in enumerate(decoder_layers(model)):
            layer.register_forward_pre_hook(_entering(state, index))
            layer.register_forward_hook(_leaving(state))
    return state


def module_state(module) -> RunState | None:
    """The run state of the model an attention module belongs to (None: headscope never touched it)."""
    return getattr(module, ATTRIBUTE, None)


def calling_layer(module, state: RunState | None) -> int | None:
    """The decoder layer an attention call belongs to."""
    if state is not None and state.layer is not None:
        return state.layer
    return getattr(module, "layer_idx", None)


LAYER_COUNT = ("num_hidden_layers", "n_layer", "num_layers")  # what configs call their number of decoder layers
HEAD_COUNT = ("num_attention_heads", "n_head", "n_heads")  # ... and of attention heads


def config_count(config, names: tuple[str, ...]) -> int | None:
    """The first of `names` that the (text) config sets to a whole number; None when it sets none."""
    return next((getattr(config, name) for name in names if isinstance(getattr(config, name, None), int)), None)


def decoder_layers(model) -> list:
    """The model's stack of decoder layers: the ModuleList with one entry per layer of the text config (the
    shortest-named one when several have that length); [] when there is none."""
    config = model.config.get_text_config(decoder=True)
    count = config_count(config, LAYER_COUNT)
    stacks = [(name, module) for name, module in model.named_modules()
              if isinstance(module, torch.nn.ModuleList) and len(module) == count]
    if not stacks:
        return []
    return list(min(stacks, key=lambda item: (item[0].count("."), len(item[0])))[1])


def _entering(state: RunState, index: int):
    def hook(module, args):
        state.layer = index

    return hook


def _leaving(state: RunState):
    def hook(module, args, output):
        state.layer = None

    return hook
