"""headscope: find the retrieval heads and reasoning heads of any Hugging Face causal LM.

    import headscope
    result = headscope.detect("retrieval", model="path/or/hub-id", context_lengths=[4000], depths=[0, 50, 100])
    result.summary["13-4"]["mean"]
"""
from .errors import HeadscopeError

__all__ = ["detect", "DetectOptions", "DetectResult", "HeadscopeError", "load", "prepare"]
__version__ = "0.1.0"

# Where each name of the API lives: imported when first used, so that `headscope --help` does not import torch.
_LAZY = {"detect": "detection.engine", "DetectOptions": "detection.engine", "DetectResult": "detection.engine",
         "load": "detection.loading", "prepare": "detection.loading"}


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    try:  # headscope.heads and the other packages, as attributes of the package
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError:
        raise AttributeError(f"module 'headscope' has no attribute {name!r}") from None
