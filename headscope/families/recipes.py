"""A tiny random-weight model of any causal-LM type transformers ships, built from its config class alone.

One generic recipe: the type's default config with every size it has set small (4 layers, 4 heads of 16,
a hidden size of 64, 4 experts of which 2 are active, small latent and state sizes, sliding windows of
WINDOW tokens so that a prompt of a few hundred tokens crosses them), and, where the type's config lists
its layers' kinds (`layer_types`, `layers_block_type`, ...), every kind it uses placed among the 4 layers.
`OVERRIDES` holds what one type needs beyond that (a hybrid's attention period, a dimension that must
divide another), each with its reason. The family sweep (`headscope.families.sweep`) builds every type this way;
the weights are random, so the heads mean nothing -- they are there to be compared with eager attention.
"""
from __future__ import annotations

import torch
import transformers
from transformers import CONFIG_MAPPING

LAYERS = 4
WINDOW = 16  # sliding windows: far shorter than the sweep's prompts

# Config fields set, when the type's config has them, to a tiny value (aliases such as n_layer follow
# each config's attribute_map).
TINY = {
    "num_hidden_layers": LAYERS, "num_layers": LAYERS, "n_layers": LAYERS, "decoder_layers": LAYERS,
    "num_blocks": LAYERS,
    "hidden_size": 64, "d_model": 64, "embedding_dim": 64, "n_embd": 64,
    "intermediate_size": 128, "ffn_dim": 128, "decoder_ffn_dim": 128, "n_inner": 128, "ffn_hidden_size": 128,
    "num_attention_heads": 4, "num_heads": 4, "n_heads": 4, "decoder_attention_heads": 4, "n_head": 4,
    "num_key_value_heads": 2, "num_kv_heads": 2, "num_query_groups": 2, "head_dim": 16, "attention_head_dim": 16,
    "max_position_embeddings": 2048, "n_positions": 2048, "max_seq_len": 2048, "context_length": 2048,
    "model_max_length": 2048, "max_target_positions": 2048,
    # mixture of experts: 4 experts, 2 active, small experts; DeepSeek-style groups collapse to one
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "num_experts_per_token": 2, "moe_topk": 2, "moe_k": 2, "top_k_experts": 2,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "moe_shared_expert_intermediate_size": 32,
    "shared_intermediate_size": 32, "expert_ffn_hidden_size": 32, "shared_experts_intermediate_size": 32,
    "n_group": 1, "topk_group": 1, "num_expert_group": 1, "first_k_dense_replace": 1, "num_dense_layers": 1,
    "n_shared_experts": 1, "num_shared_experts": 1, "moe_num_shared_experts": 1,
    # latent attention (MLA): key and value head sizes differ on purpose
    "kv_lora_rank": 16, "q_lora_rank": 24, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 24,
    "index_n_heads": 2, "index_head_dim": 16, "index_topk": 8,
    # state-space and linear-attention layers
    "state_size": 8, "ssm_state_size": 8, "mamba_d_state": 8, "mamba_n_heads": 4, "mamba_num_heads": 4,
    "mamba_d_head": 32, "mamba_head_dim": 32, "mamba_headdim": 32, "mamba_chunk_size": 16, "chunk_size": 16,
    "mamba_dt_rank": 8, "time_step_rank": 8, "n_groups": 1, "mamba_n_groups": 1, "mamba_ngroups": 1,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "linear_num_heads": 4, "linear_head_dim": 16, "attention_hidden_size": 64, "lru_width": 64,
    "block_size": 16,
    # no multi-token-prediction layers: they are not part of the causal LM's forward pass
    "num_nextn_predict_layers": 0, "num_mtp_layers": 0,
}

# What one type needs beyond the generic recipe, and why.
HYBRID = ["linear_attention", "full_attention", "linear_attention", "full_attention"]
OVERRIDES = {
    # hybrids whose default layout has no attention layer within 4 layers: put attention at layers 1 and 3
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "zamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "attention_hidden_size": 128},  # [hidden, embedding]
    "zamba2": {"layers_block_type": ["mamba", "hybrid", "mamba", "hybrid"], "n_mamba_heads": 4,
               "attention_hidden_size": 128},
    "falcon_h1": {"mamba_d_ssm": 128},  # mamba heads x head size
    "bamba": {"attn_layer_indices": [1, 3]},
    "granitemoehybrid": {"layer_types": HYBRID},
    "lfm2": {"layer_types": ["conv", "full_attention", "conv", "full_attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv", "full_attention"]},
    # configs that validate one size against another
    "gpt_neo": {"attention_types": [[["global", "local"], 2]], "window_size": WINDOW},
    "dots3_note": {"num_key_value_heads": 4},
    "dots3_note_text": {"num_key_value_heads": 4},
    "mamba2": {"num_heads": 8},  # num_heads x head_dim = expand x hidden_size
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    # a field the default config leaves out and the model reads
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "kv_n_heads": 2, "clip_qkv": 8.0}, "ffn_config": {"ffn_hidden_size": 128,
                                                                                      "moe_num_experts": 4,
                                                                                      "moe_top_k": 2}},
    "xmod": {"default_language": "en_XX"},
    "xlstm": {"chunk_size": 64, "num_heads": 4, "qk_dim_factor": 1.0},
    "reformer": {"axial_pos_embds": False, "is_decoder": True},
    "zaya": {"num_experts_per_tok": 1},  # ZAYA routes each token to one expert
    # Qwen4-Exp's sparse-attention indexer (QSA): all its sizes or none
    "qwen4_exp": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 16,
                  "indexer_compress_ratio": 4},
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 16,
                       "indexer_compress_ratio": 4},
}


def default_config(model_type: str):
    return CONFIG_MAPPING[model_type]()


def kinds_in_four(kinds: list) -> list:
    """A per-layer list of kinds for LAYERS layers in which every kind of the default list appears (in order)."""
    distinct = list(dict.fromkeys(kinds))
    return [distinct[i % len(distinct)] for i in range(LAYERS)]


def tiny_fields(config) -> dict:
    """The generic recipe's fields for one (text) config: the tiny sizes it has, its layer-kind lists in 4."""
    present = set(config.to_dict()) | set(type(config).attribute_map)
    fields = {name: value for name, value in TINY.items() if name in present}
    if getattr(config, "sliding_window", None) is not None:
        fields["sliding_window"] = WINDOW
    if "kv_lora_rank" in present:  # latent attention: one key per query head, rotary over the rope part
        fields["num_key_value_heads"] = TINY["num_attention_heads"]
        if "head_dim" in present:
            fields["head_dim"] = TINY["qk_rope_head_dim"]
    if "is_decoder" in present:  # the decoder half of an encoder-decoder model, alone
        fields.update(is_decoder=True, add_cross_attention=False)
    if "is_encoder_decoder" in present and config.is_encoder_decoder:
        fields["is_encoder_decoder"] = False
    if getattr(config, "rotary_dim", None):  # GPT-J, CodeGen: rotary dims within the head
        fields["rotary_dim"] = 8
    for name in ("layer_types", "layers_block_type", "mlp_layer_types", "block_types"):
        if isinstance(getattr(type(config), type(config).attribute_map.get(name, name), None), property):
            continue  # derived from other fields
        kinds = getattr(config, name, None)
        if isinstance(kinds, (list, tuple)) and kinds and all(isinstance(k, str) for k in kinds):
            fields[name] = kinds_in_four(list(kinds))
    return fields


def tiny_config(model_type: str, vocab_size: int, **overrides):
    """The type's config with the generic recipe, the type's OVERRIDES and `overrides` applied; the config's other
    parts (a vision tower, a byte patcher) get the recipe's sizes too, so that building stays quick."""
    config_class = CONFIG_MAPPING[model_type]
    default = config_class()
    text = default.get_text_config(decoder=True)
    source = default if type(text) is type(default) else text  # the config the causal LM's sizes live in
    special = dict(vocab_size=vocab_size, bos_token_id=2, eos_token_id=3, pad_token_id=1)
    aliases = type(source).attribute_map  # one name per field; the type's own overrides win over the recipe
    fields = {}
    for layer in (tiny_fields(source), {k: v for k, v in special.items() if k in source.to_dict()},
                  OVERRIDES.get(model_type, {}), overrides):
        fields |= {aliases.get(name, name): value for name, value in layer.items()}
    parts = {key: tiny_fields(part) for key, part in vars(default).items()
             if hasattr(part, "to_dict") and type(part) is not type(text)}
    if source is default:
        return config_class(**(parts | fields))
    text_key = next(key for key, value in vars(default).items() if type(value) is type(text))  # e.g. text_config
    return config_class(**parts, **{text_key: fields})


def tiny_model(model_type: str, vocab_size: int, seed: int = 0, attn: str = "eager", **overrides):
    """A random-weight model of the type, float32, eval mode, on `attn` attention."""
    config = tiny_config(model_type, vocab_size, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    sharpen(model)
    return model.eval()


def sharpen(model) -> None:
    """Random init is small: scale the query and key projections so attention rows have clear argmaxes (a flat
    row's argmax is a tie that rounding decides), and give zero embedding rows (padding) random values."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and any(part in name for part in ("q_proj", "k_proj", "c_attn", "qkv", "q_b_proj",
                                                                   "kv_b_proj", "query", "key")):
                param.mul_(8.0)
        embedding = model.get_input_embeddings().weight
        zero_rows = embedding.abs().sum(-1) == 0
        embedding[zero_rows] = torch.randn(int(zero_rows.sum()), embedding.shape[1]) * embedding.std()
