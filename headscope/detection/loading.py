"""Load any Hugging Face causal LM and its tokenizer, and route its attention through headscope."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..attention import recorder
from .. import bundled
from ..errors import HeadscopeError, loading_reason, notify
from ..attention.layout import attention_layout

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerBase
    name: str  # the model's last path component: output files are named after it
    path: str
    eager_fallback: bool  # attention not on the interface: eager rows on decoding steps
    attention: str  # what computes attention: "headscope+sdpa", "headscope+flash_attention_2" or "eager"
    checked: set = field(default_factory=set)  # what `check.require` has proven on this model: "detect", "ablate"

    @property
    def max_context(self) -> int | None:
        return max_context_of(self.model.config)

    @property
    def pad_id(self) -> int:
        """The id that fills masked (left-padding) positions: the tokenizer's pad token when the embedding has a row
        for it, else 0. A masked position's id changes no number, but one past the embedding is an IndexError (a
        tokenizer that adds a pad token without the embeddings being resized: Qwen2's class on transformers 5.25)."""
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None and 0 <= pad < self.model.get_input_embeddings().weight.shape[0] else 0

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device


def max_context_of(config) -> int | None:
    """The longest sequence a model's config says it takes (None: it does not say)."""
    config = config.get_text_config()
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def default_model_path() -> str:
    return bundled.path_of(None)


def model_path(model: str | None) -> str:
    """Where a --model value loads from (a bundled name such as "thinker" is its checkpoint)."""
    return bundled.path_of(model)


def model_name(path: str) -> str:
    """Output files are named after the model's last path component; a bundled model by its name ("organism",
    "thinker")."""
    return bundled.name_of(path) or os.path.basename(os.path.normpath(path)) or "model"


def prepare(model, tokenizer, path: str, attn: str = "sdpa") -> LoadedModel:
    """Install the recorder on an already loaded model (the Python API's entry point for your own model)."""
    if attn not in ("sdpa", "flash_attention_2"):
        raise HeadscopeError(f"--attn must be sdpa or flash_attention_2, not {attn!r}")
    model.eval()
    recorder.install(model, attn)
    # Probed now: a model with no attention layer (Mamba, RWKV, ...) is refused here, and a model whose attention
    # modules do not call the function it was switched to is recorded from eager attentions.
    on_interface = attention_layout(model).via_interface
    if not on_interface:  # its attention modules ignore the function it was switched to: eager, as its rows are
        if model.config._attn_implementation != "eager":
            model.set_attn_implementation("eager")
        print(f"headscope: {type(model).__name__} does not use transformers' attention interface; "
              "falling back to eager attention with output_attentions on decoding steps.", file=sys.stderr)
    return LoadedModel(model, tokenizer, model_name(path), path, not on_interface,
                       f"headscope+{attn}" if on_interface else "eager")


def load(path: str | None = None, dtype: str = "auto", device: str = "auto", attn: str = "sdpa",
         trust_remote_code: bool = False) -> LoadedModel:
    path = model_path(path)
    if (os.path.isabs(path) or path.startswith((".", "~"))) and not os.path.isdir(os.path.expanduser(path)):
        raise HeadscopeError(f"no such model folder: {path}")
    if dtype not in DTYPES:
        raise HeadscopeError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise HeadscopeError(f"cannot load model {path!r}: {loading_reason(error)}") from None
    if not _is_causal_lm(config):
        raise HeadscopeError(f"{path!r} is a {type(config).__name__.removesuffix('Config')} model, "
                             "not a causal language model (AutoModelForCausalLM cannot load it)")
    note_if_not_swept(config.model_type)
    options = dict(dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    # Off the interface, a model cannot switch to eager for the fallback's rows later: eager from the start.
    load_attn = attn if switchable(config) else "eager"
    if device == "auto" and torch.cuda.is_available():
        options["device_map"] = "auto"  # spread over every visible GPU
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=load_attn, **options)
        except ValueError:  # the architecture refuses this backend (Gemma 2 and SDPA): load it plainly
            model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", **options)
    except (OSError, ValueError, ImportError) as error:
        raise HeadscopeError(f"cannot load model {path!r}: {loading_reason(error)}") from None
    if "device_map" not in options:
        target = "cpu" if device == "auto" else device
        try:
            model.to(target)
        except (RuntimeError, AssertionError) as error:
            raise HeadscopeError(f"cannot move the model to {target!r}: {loading_reason(error)}") from None
    return prepare(model, tokenizer, path, attn)


def note_if_not_swept(model_type: str) -> None:
    """A model type the family sweep never ran (added by a later transformers, or remote code) is said so: nothing
    but `headscope check` (run by detect) has measured headscope on it."""
    from . import sweep_table

    sweep = sweep_table.load()
    if model_type not in sweep.rows:
        notify(f"model type {model_type!r} was not swept on transformers {transformers.__version__} (the family "
               f"table, docs/families.md, is of transformers {sweep.transformers}): only the check vouches for it")


def switchable(config) -> bool:
    """Whether the model class can switch its attention function after loading (its attention modules call
    transformers' interface); unknown classes (remote code) are assumed to."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]._can_set_attn_implementation()
    except (KeyError, AttributeError):
        return True


def _is_causal_lm(config) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or bool(getattr(config, "auto_map", {}).get(
        "AutoModelForCausalLM"))
