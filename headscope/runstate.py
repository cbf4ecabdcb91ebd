"""The run state: what headscope's attention function does for one model during a run.

`state_of(model)` attaches one `RunState` to the model and to each of its attention modules (every
module with a `layer_idx`, which is what transformers hands the attention function). The attention
function reads `module.headscope_state` -- the state of the model it is called for -- never a module
global, so two models in one process record and mask heads independently.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .kv import Policy
    from .masking import Ablation
    from .recorder import Recorder

ATTRIBUTE = "headscope_state"


@dataclass
class RunState:
    recorder: "Recorder | None" = None  # records the forward pass in flight (None: nothing is recorded)
    ablation: "Ablation | None" = None  # heads masked on every forward pass (None: none)
    kv_policy: "Policy | None" = None  # a KV cache policy replayed on every forward pass (kv.py; None: none)


def state_of(model) -> RunState:
    """The model's run state, attached on first use."""
    state = getattr(model, ATTRIBUTE, None)
    if state is None:
        state = RunState()
        for module in model.modules():
            if module is model or hasattr(module, "layer_idx"):
                setattr(module, ATTRIBUTE, state)
    return state


def module_state(module) -> RunState | None:
    """The run state of the model an attention module belongs to (None: headscope never touched it)."""
    return getattr(module, ATTRIBUTE, None)
