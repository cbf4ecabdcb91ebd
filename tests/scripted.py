"""Scripted reasoning models: tiny random-attention models whose greedy decoding writes a long chain of thought.

A reasoning model's chain has tens of sentences, a `</think>` and an answer; the organism's have 2-4. Here the
embedding and the unembedding are set by hand so that greedy decoding follows a script -- each token's
successor is fixed -- while every layer keeps real (random) attention, only scaled down in what it adds to the
residual stream. Every script token is a distinct word except the shared ending (`</think> ans </s>`), so the
successor is a function of the current token:

    prompt:    <s> c0q1 c0q2 ... <think> c0go            (a template-opened think block, a prompt tail after it)
    generated: c0k0w0 ... c0k0. c0k1w0 ... c0k1. ... </think> ans </s>

Sentence k of chain c has words `c{c}k{k}w{i}` and ends with `c{c}k{k}.`; some sentences are short ("c0k6." alone:
Thought Anchors merges chunks under 10 characters) and some hold a word like `c0k3v3.5` (a period that does not
end a sentence). `planted=(layer, head)` makes that head attend, from everywhere, to the tokens of the
`anchors` sentences: a receiver head by construction.

`chain_task.json`-style data for the test task `chain` (registered below): one record per chain, its prompt.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import torch

from headscope.tasks import Sample, Task, register_task
from headscope.tasks.reasoning import ReasoningOptions
from headscope.families.toy import tiny_model

SPECIALS = ["<unk>", "<pad>", "<s>", "</s>"]
ENDING = ["</think>", "ans", "</s>"]


def chain_script(chain: int, sentences: int, prompt_words: int = 3) -> tuple[list[str], list[str]]:
    """(prompt words after BOS, generated words) of one chain."""
    prompt = [f"c{chain}q{i}" for i in range(prompt_words)] + ["<think>", f"c{chain}go"]
    generated = []
    for k in range(sentences):
        size = 0 if k % 7 == 6 else 2 + (3 * k + chain) % 5  # every 7th sentence is a lone short word
        words = [f"c{chain}k{k}w{i}" for i in range(size)]
        if k % 5 == 3 and words:
            words[0] = f"c{chain}k{k}v3.5"
        generated += words + [f"c{chain}k{k}."]
    return prompt, generated + ENDING


def scripted_tokenizer(scripts):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for prompt, generated in scripts:
        for word in prompt + generated:
            vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")


def scripted_model(scripts, family: str = "llama", num_layers: int = 4, num_heads: int = 4, seed: int = 0,
                   planted: tuple[int, int] | None = None, anchors: tuple[int, ...] = (), **config):
    """(model, tokenizer): greedy decoding of each script's prompt writes its generated words (see module)."""
    tokenizer = scripted_tokenizer(scripts)
    vocab = len(tokenizer)
    hidden = 64 * max(1, -(-vocab // 64))  # orthonormal embeddings need hidden >= vocab
    options = dict(vocab_size=vocab, num_layers=num_layers, num_heads=num_heads, hidden=hidden, seed=seed)
    if family != "gpt2":
        options.update(tie_word_embeddings=False, num_key_value_heads=num_heads, head_dim=hidden // num_heads)
    model = tiny_model(family, **options, **config)
    successor = {}
    for prompt, generated in scripts:
        words = prompt[-1:] + generated
        for word, following in zip(words, words[1:]):
            assert successor.setdefault(word, following) == following, f"{word} has two successors"
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(hidden, hidden, generator=generator))
    embedding = basis[:vocab].clone()  # (vocab, hidden) orthonormal rows
    ids = tokenizer.convert_tokens_to_ids
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(embedding)
        unembedding = torch.zeros(vocab, hidden)
        for word, following in successor.items():
            unembedding[ids(following)] += 30.0 * embedding[ids(word)]
        model.get_output_embeddings().weight.copy_(unembedding)
        quiet_residual_writes(model, family)
        if planted is not None:
            plant_receiver_head(model, embedding, [ids(w) for w in anchor_words(scripts, anchors)], *planted)
    return model.eval(), tokenizer


def anchor_words(scripts, anchors) -> list[str]:
    """The words of sentences `anchors` of every chain."""
    matches = (re.match(r"c\d+k(\d+)[wv.]", word) for _, generated in scripts for word in generated)
    return [match.string for match in matches if match and int(match[1]) in anchors]


def quiet_residual_writes(model, family: str) -> None:
    """Scale what attention and MLPs add to the residual stream down, so the current token's embedding
    dominates it (and the unembedding reads the successor) while the attention patterns stay as they were."""
    for name, param in model.named_parameters():
        if any(part in name for part in ("o_proj", "down_proj", "c_proj")):
            param.mul_(0.01)
        if family in ("gemma2", "gemma3") and ("post_attention_layernorm" in name or "post_feedforward" in name):
            param.fill_(-0.99)  # Gemma's norms scale by (1 + weight), after the attention and MLP


def plant_receiver_head(model, embedding, anchor_ids: list[int], layer: int, head: int, strength: float = 12.0):
    """Make (layer, head) attend to the anchor tokens from every position: its query is a constant direction u
    (every token's embedding has the same projection on the sum of all embeddings) and its key is u on anchor
    tokens only, in RoPE's slowest-turning dimension pair so that the distance hardly rotates them."""
    attention = model.model.layers[layer].self_attn
    head_dim = attention.head_dim
    vocab, hidden = embedding.shape
    scale = hidden ** 0.5  # the input norm scales a unit embedding to RMS 1
    slow = head_dim // 2 - 1  # the lowest RoPE frequency
    rows = slice(head * head_dim, (head + 1) * head_dim)
    attention.q_proj.weight[rows] = 0.0
    attention.k_proj.weight[rows] = 0.0
    attention.q_proj.weight[head * head_dim + slow] = strength * embedding.sum(0) / scale
    attention.k_proj.weight[head * head_dim + slow] = strength * embedding[anchor_ids].sum(0) / scale


# ------------------------------------------------------------------------------- the test task "chain"

@dataclass
class ChainOptions(ReasoningOptions):
    """The reasoning task's options; --data: a JSON list of {"id", "prompt"} (prompt words after BOS)."""


def _build(options: ChainOptions, tokenizer, max_context) -> list[Sample]:
    records = json.loads(open(options.data).read())
    return [Sample(id=record["id"], task="chain", prompt=record["prompt"], add_special_tokens=True, answer="ans",
                   span_text=None, span_char=None, meta={}) for record in records]


register_task(Task("chain", "scripted chains of thought (tests)", ChainOptions, _build, "reasoning_focus",
                   lambda chat: "<prompt words>", success_filter=False))


def chain_data(path, scripts) -> str:
    path.write_text(json.dumps([{"id": f"chain-{c}", "prompt": " ".join(prompt)}
                                for c, (prompt, _) in enumerate(scripts)]))
    return str(path)
