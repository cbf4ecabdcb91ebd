"""Small random-weight models and word-level tokenizers, built from configs with no download.

Tests and benchmarks use them; their heads mean nothing. `tiny_model("llama")` gives a
2-layer Llama with grouped-query attention (`num_layers=4` for the conformance tests), and so on
for every family of the conformance matrix (`FAMILIES`).
"""
from __future__ import annotations

import torch
import transformers
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>"]

# (config class, family-specific options). All share a tiny shape, set in `tiny_config`.
FAMILIES = {
    "llama": ("LlamaConfig", {"num_key_value_heads": 2}),
    "qwen2": ("Qwen2Config", {"num_key_value_heads": 2}),
    "qwen3": ("Qwen3Config", {"num_key_value_heads": 2, "head_dim": 16}),
    "mistral": ("MistralConfig", {"num_key_value_heads": 2, "sliding_window": 24}),
    "starcoder2": ("Starcoder2Config", {"num_key_value_heads": 2, "sliding_window": 24}),
    "gemma2": (
        "Gemma2Config",
        {"num_key_value_heads": 2, "head_dim": 16, "sliding_window": 24, "attn_logit_softcapping": 5.0,
         "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 16},
    ),
    "gemma3": ("Gemma3TextConfig", {"num_key_value_heads": 2, "head_dim": 16, "sliding_window": 24,
                                    "query_pre_attn_scalar": 16, "sliding_window_pattern": 2}),
    "phi3": ("Phi3Config", {"num_key_value_heads": 2, "pad_token_id": 1}),
    "olmo2": ("Olmo2Config", {"num_key_value_heads": 2}),
    "cohere": ("CohereConfig", {"num_key_value_heads": 2, "logit_scale": 1.0}),
    "granite": ("GraniteConfig", {"num_key_value_heads": 2, "attention_multiplier": 0.2, "logits_scaling": 2.0}),
    "gpt_oss": ("GptOssConfig", {"num_key_value_heads": 2, "head_dim": 16, "sliding_window": 24,
                                 "num_local_experts": 4, "num_experts_per_tok": 2}),
    "gpt2": ("GPT2Config", {}),
}


def tiny_config(family: str, vocab_size: int = 256, num_layers: int = 2, num_heads: int = 4, hidden: int = 64,
                max_positions: int = 4096, **overrides):
    class_name, extra = FAMILIES[family]
    config_class = getattr(transformers, class_name)
    if family == "gpt2":
        return config_class(vocab_size=vocab_size, n_layer=num_layers, n_head=num_heads, n_embd=hidden,
                            n_positions=max_positions, bos_token_id=2, eos_token_id=3)
    options = dict(vocab_size=vocab_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                   hidden_size=hidden, intermediate_size=2 * hidden, max_position_embeddings=max_positions,
                   bos_token_id=2, eos_token_id=3, pad_token_id=1)
    options.update(extra)
    if "num_key_value_heads" in extra:
        options["num_key_value_heads"] = min(extra["num_key_value_heads"], num_heads)
    options.update(overrides)
    return config_class(**options)


def tiny_model(family: str = "llama", seed: int = 0, attn: str = "sdpa", **shape) -> transformers.PreTrainedModel:
    """A random-weight causal LM of the family, in float32 and eval mode."""
    config = tiny_config(family, **shape)
    torch.manual_seed(seed)
    try:
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    except ValueError:  # e.g. Gemma 2 refuses SDPA (soft-capping)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # Random init is small; scale up so attention is peaked enough to have clear argmaxes.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and any(k in name for k in ("q_proj", "k_proj", "c_attn")):
                param.mul_(8.0)
            if name.endswith("sinks"):  # GPT-OSS: sinks large enough that dropping them shows
                param.normal_(0.0, 2.0)
        # The padding token's embedding starts at zero: its layer-0 rows would be exactly uniform, a tie
        # whose top-k order is arbitrary. Give it a random embedding like every other token.
        embedding = model.get_input_embeddings().weight
        zero_rows = embedding.abs().sum(-1) == 0
        embedding[zero_rows] = torch.randn(int(zero_rows.sum()), embedding.shape[1]) * embedding.std()
    return model.eval()


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer: words, punctuation and newlines are tokens; BOS is prepended."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in list(words) + ["\n", ".", ",", "?", ":", "<", ">", "/"]:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),  # spaces separate, newlines stay
        pre_tokenizers.Split(Regex(r"\n|\w+|[^\w\s]"), behavior="isolated"),
    ])
    tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")
    return fast
