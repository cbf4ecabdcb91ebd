"""headscope: find the retrieval heads and reasoning heads of any Hugging Face causal LM.

    import headscope
    result = headscope.detect("retrieval", model="path/or/hub-id", context_lengths=[4000], depths=[0, 50, 100])
    result.summary["13-4"]["mean"]
"""
from .engine import DetectOptions, DetectResult, detect
from .errors import HeadscopeError
from .loading import load, prepare

__all__ = ["detect", "DetectOptions", "DetectResult", "HeadscopeError", "load", "prepare"]
__version__ = "0.1.0"
