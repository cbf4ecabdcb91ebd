"""The smaller promises of the trust issue: refused attention arguments, the newline stop rule on byte-level
tokens, uniform ablation by prefix sums, and prompts tokenised per shard."""
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import headscope
from headscope.attention import masking, recorder
from headscope.detection.decode import newline_token_ids


class Attention(torch.nn.Module):
    layer_idx = 0


def test_an_attention_argument_that_changes_the_maths_is_refused_by_name():
    attention = ALL_ATTENTION_FUNCTIONS[recorder.ATTN_SDPA]
    query = key = value = torch.randn(1, 2, 1, 8)
    with pytest.raises(headscope.HeadscopeError, match="`position_bias`"):
        attention(Attention(), query, key, value, None, scaling=0.3, position_bias=torch.zeros(1, 2, 1, 1))
    with pytest.raises(headscope.HeadscopeError, match="dropout"):
        attention(Attention(), query, key, value, None, scaling=0.3, dropout=0.1)
    output, _ = attention(Attention(), query, key, value, None, scaling=0.3, position_ids=None, use_cache=True)
    assert output.shape == (1, 1, 2, 8)  # arguments that do not change the maths pass


def test_newline_stop_covers_every_token_whose_text_holds_a_newline():
    # A byte-level BPE (GPT-2 / Llama-3 style) whose merges make multi-newline and space-newline tokens.
    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    merged = ["ĊĊ", "ĊĊĊ", "ĠĊ", ".Ċ", "on", "one", "Ġl", "Ġli", "Ġlin", "Ġline"]
    vocab = {token: i for i, token in enumerate(sorted(byte_chars) + merged)}
    merges = [("Ċ", "Ċ"), ("ĊĊ", "Ċ"), ("Ġ", "Ċ"), (".", "Ċ"), ("o", "n"), ("on", "e"), ("Ġ", "l"), ("Ġl", "i"),
              ("Ġli", "n"), ("Ġlin", "e")]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert tokenizer.convert_ids_to_tokens(tokenizer("one line\n\n\n").input_ids) == ["one", "Ġline", "ĊĊĊ"]
    stops = newline_token_ids(tokenizer)
    vocab = tokenizer.get_vocab()
    for token in ("Ċ", "ĊĊĊ", "ĠĊ", ".Ċ"):  # byte-level spellings of "\n", "\n\n\n", " \n", ".\n"
        assert token in vocab and vocab[token] in stops, token
    assert vocab["one"] not in stops and vocab["Ġline"] not in stops
    assert stops == {i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i])}


@pytest.mark.parametrize("window", [None, 5])
def test_uniform_ablation_by_prefix_sums_equals_the_mean_of_visible_values(window):
    torch.manual_seed(0)
    batch, kv_heads, kv_len, dim, q_len = 2, 2, 20, 4, 7
    value = torch.randn(batch, kv_heads, kv_len, dim)
    padding = torch.ones(batch, kv_len, dtype=torch.long)
    padding[1, :6] = 0  # the second sample is left-padded by 6
    heads = [1, 3]  # query heads; 4 query heads over 2 KV heads: heads 1 -> KV 0, 3 -> KV 1
    got = masking.uniform_output(value, heads, 4, q_len, padding, window)  # (batch, q_len, heads, dim)
    for b in range(batch):
        for t in range(q_len):
            i = kv_len - q_len + t
            visible = [j for j in range(kv_len) if j <= i and padding[b, j] and (window is None or i - j < window)]
            for n, head in enumerate(heads):
                expected = value[b, head // 2, visible].double().mean(0)
                assert torch.allclose(got[b, t, n], expected, atol=1e-6)


def test_prompts_are_tokenised_for_this_shard_only(toy_dir, data_dir, tmp_path, monkeypatch):
    encoded = []
    original = headscope.detection.engine.encode_with_span
    monkeypatch.setattr(headscope.detection.engine, "encode_with_span", lambda *a: encoded.append(a[1].id) or original(*a))
    options = dict(model=str(toy_dir), quiet=True, max_new_tokens=2, haystack=str(data_dir / "haystack"),
                   needles=str(data_dir / "needles.jsonl"), context_lengths=[260, 330], depths=[0, 50, 100],
                   check=False)  # the check tokenises the task's first prompts, whatever the shard
    result = headscope.detect("retrieval", out=str(tmp_path), shard="1/2", **options)
    assert sorted(encoded) == sorted(row["id"] for row in result.samples) and len(encoded) == 3
    encoded.clear()
    headscope.detect("retrieval", out=str(tmp_path), shard="1/2", **options)  # finished: nothing to tokenise
    assert encoded == []
