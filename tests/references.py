"""Reference implementations written from the papers' released code, line by line, for the fidelity tests.

Each function says which function of which repository it follows; they run on eager attention of a whole
sequence (what those scripts read: `output_attentions` of one forward pass over the text), in numpy where the
original is numpy, with loops where the original loops. They are slow and only for tests.

- Thought Anchors (Bogdan et al. 2025), `interp-reasoning/thought-anchors` at 2a15f77: `utils.py`
  (`split_solution_into_chunks`, `get_chunk_ranges`, `split_solution_keep_spacing`),
  `whitebox-analyses/attention_analysis/attn_funcs.py` (`get_sentence_token_boundaries`,
  `_compute_averaged_matrix`, `get_vertical_scores`) and `receiver_head_funcs.py` (`get_all_heads_vert_scores`,
  `get_3d_ar_kurtosis`, the mean over responses of `get_top_k_receiver_heads`).
- Zhang et al. 2025, `microsoft/ACV` at 1e43ea6: `misc/R2A/attention_analysis.py` (`tokenize_parse_text`,
  the a2r of `get_attention_pattern_by_layer_head`).
- Retrieval_Head (Wu et al. 2024), `nightdessert/Retrieval_Head`: `retrieval_head_detection.py`
  (`retrieval_calculate`: top-1 on the needle, copying the token written); HeadKV (Fu et al. 2024),
  `FYYFU/HeadKV` at 0862a09: `Important_Head/retrieval_head_detection_r2.py` (`retrieval_calculate` with
  topk = the needle's length, `decode`: |answer| steps).
- QRHead (Wuwei Zhang et al. 2025), `princeton-pli/QRHead` at 7a668e7: `src/qrretriever/attn_retriever.py`
  (`score_docs_per_head_for_detection`, `score_per_token_attention_to_query`) and
  `exp_scripts/detection/detect_qrhead_lme.py` (`lme_eval`).
- kvpress (NVIDIA), `NVIDIA/kvpress` 0.5.4 at 8bb29b9: `kvpress/presses/scorer_press.py` (`ScorerPress.compress`:
  the kept indices), `snapkv_press.py` (`SnapKVPress.compute_window_attention`, `SnapKVPress.score`),
  `streaming_llm_press.py` (`StreamingLLMPress.score`), `duo_attention_press.py`
  (`DuoAttentionPress.post_init_from_model`: the streaming mask, `DuoAttentionPress.compress`: the masked keys).

Where an original takes a top-k (`torch.topk`, an argmax) the references apply headscope's documented tie rule
instead (`rule_top_k`, written here on its own in numpy): the same picks wherever the row has no tie at the rule's
resolution, and the one documented pick where it has (the original's is up to its backend).
"""
from __future__ import annotations

import copy
import re

import numpy as np
import torch
from scipy import stats


def eager_attentions(model, ids: list[int]) -> list[np.ndarray]:
    """Each layer's (heads, T, T) float32 attention of one eager forward pass over `ids`."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        output = eager(torch.tensor([ids]), output_attentions=True, use_cache=False)
    return [layer[0].float().numpy() for layer in output.attentions]


# ----------------------------------------------------------------------------------- Thought Anchors

def split_solution_into_chunks(solution_text: str) -> list[str]:  # utils.py
    if "<think>" in solution_text:
        solution_text = solution_text.split("<think>")[1].strip()
    if "</think>" in solution_text:
        solution_text = solution_text.split("</think>")[0].strip()
    sentence_ending_tokens = [".", "?", "!"]
    paragraph_ending_patterns = ["\n\n", "\r\n\r\n"]
    chunks = []
    current_chunk = ""
    i = 0
    while i < len(solution_text):
        current_chunk += solution_text[i]
        is_paragraph_end = False
        for pattern in paragraph_ending_patterns:
            if i + len(pattern) <= len(solution_text) and solution_text[i: i + len(pattern)] == pattern:
                is_paragraph_end = True
                break
        is_sentence_end = False
        if i < len(solution_text) - 1 and solution_text[i] in sentence_ending_tokens:
            next_char = solution_text[i + 1]
            if next_char == " " or next_char == "\n":
                is_sentence_end = True
        if is_paragraph_end or is_sentence_end:
            if current_chunk.strip():
                chunks.append(current_chunk.strip())
                current_chunk = ""
        i += 1
    i = 0
    while i < len(chunks):
        if len(chunks[i]) < 10:
            if i == len(chunks) - 1:
                if i > 0:
                    chunks[i - 1] = chunks[i - 1] + " " + chunks[i]
                    chunks.pop(i)
            else:
                chunks[i + 1] = chunks[i] + " " + chunks[i + 1]
                chunks.pop(i)
            if i == 0 and len(chunks) == 1:
                break
        else:
            i += 1
    return chunks


def get_chunk_ranges(full_text: str, chunks: list[str]) -> list[tuple[int, int]]:  # utils.py
    chunk_ranges = []
    current_pos = 0
    for chunk in chunks:
        normalized_chunk = re.sub(r"\s+", " ", chunk).strip()
        chunk_start = -1
        exact_match_pos = full_text.find(chunk, current_pos)
        if exact_match_pos != -1:
            chunk_start = exact_match_pos
        else:
            chunk_words = normalized_chunk.split()
            for i in range(current_pos, len(full_text) - len(normalized_chunk)):
                text_window = full_text[i: i + len(normalized_chunk) + 20]
                normalized_window = re.sub(r"\s+", " ", text_window).strip()
                if normalized_window.startswith(normalized_chunk):
                    chunk_start = i
                    break
                if i == current_pos + 100:
                    for j in range(current_pos, len(full_text) - 10):
                        if re.match(r"\b" + re.escape(chunk_words[0]) + r"\b",
                                    full_text[j: j + len(chunk_words[0]) + 5]):
                            match_text = full_text[j: j + len(normalized_chunk) + 30]
                            normalized_match = re.sub(r"\s+", " ", match_text).strip()
                            if normalized_match.startswith(normalized_chunk):
                                chunk_start = j
                                break
                    break
        if chunk_start == -1:
            continue
        chunk_content = re.sub(r"\s+", "", chunk)
        full_text_from_start = full_text[chunk_start:]
        full_text_content = re.sub(r"\s+", "", full_text_from_start[: len(chunk) + 50])
        content_match_len = 0
        for i in range(min(len(chunk_content), len(full_text_content))):
            if chunk_content[i] == full_text_content[i]:
                content_match_len += 1
            else:
                break
        chunk_end = chunk_start
        content_chars_matched = 0
        for i in range(len(full_text_from_start)):
            if chunk_end + i >= len(full_text):
                break
            if not full_text[chunk_start + i].isspace():
                content_chars_matched += 1
            if content_chars_matched > content_match_len:
                break
            chunk_end = chunk_start + i
        chunk_end += 1
        current_pos = chunk_end
        chunk_ranges.append((chunk_start, chunk_end))
    return chunk_ranges


def split_solution_keep_spacing(solution_text: str) -> list[str]:  # utils.py
    sentences = split_solution_into_chunks(solution_text)
    chunk_ranges = get_chunk_ranges(solution_text, sentences)
    return [solution_text[start:end] for start, end in chunk_ranges]


def get_sentence_token_boundaries(text: str, sentences: list[str], tokenizer) -> list[tuple[int, int]]:  # attn_funcs
    def normalize_spaces(s):
        return re.sub(r"[\u00A0\u1680\u2000-\u200B\u202F\u205F\u3000\uFEFF]", " ", s)

    char_positions = []
    search_start = 0
    text_normalized = normalize_spaces(text)
    for sentence in sentences:
        sentence_normalized = normalize_spaces(sentence)
        norm_pos = text_normalized.find(sentence_normalized, search_start)
        if norm_pos == -1:
            sentence_stripped = sentence_normalized.strip()
            norm_pos = text_normalized.find(sentence_stripped, search_start)
            norm_end = norm_pos + len(sentence_stripped)
        else:
            norm_end = norm_pos + len(sentence_normalized)
        normalized_count = 0
        actual_start = actual_end = -1
        for i, char in enumerate(text):
            if normalized_count == norm_pos and actual_start == -1:
                actual_start = i
            if normalized_count == norm_end:
                actual_end = i
                break
            if normalize_spaces(char) == " " or char == text_normalized[normalized_count]:
                normalized_count += 1
        if actual_end == -1 and normalized_count == norm_end:
            actual_end = len(text)
        char_positions.append((actual_start, actual_end))
        search_start = norm_end
    boundaries = []
    for char_start, char_end in char_positions:  # get_raw_tokens: tokenizer.encode (special tokens added)
        tokens_to_start = len(tokenizer.encode(text[:char_start])) if char_start > 0 else 0
        boundaries.append((tokens_to_start, len(tokenizer.encode(text[:char_end]))))
    return boundaries


def compute_averaged_matrix(matrix: np.ndarray, sentence_boundaries) -> np.ndarray:  # attn_funcs
    n = len(sentence_boundaries)
    result = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        row_start, row_end = sentence_boundaries[i]
        row_start = min(row_start, matrix.shape[0] - 1)
        row_end = min(row_end, matrix.shape[0] - 1)
        if row_start >= row_end:
            continue
        for j in range(n):
            col_start, col_end = sentence_boundaries[j]
            col_start = min(col_start, matrix.shape[1] - 1)
            col_end = min(col_end, matrix.shape[1] - 1)
            if col_start >= col_end:
                continue
            region = matrix[row_start:row_end, col_start:col_end]
            if region.size > 0:
                result[i, j] = np.mean(region)
    return result


def get_vertical_scores(avg_mat: np.ndarray, proximity_ignore: int = 4) -> np.ndarray:  # attn_funcs, mean, no depth
    trius = np.triu_indices_from(avg_mat, k=1)
    avg_mat = avg_mat.copy()
    avg_mat[trius] = np.nan
    trils = np.triu_indices_from(avg_mat, k=-proximity_ignore + 1)
    avg_mat[trils] = np.nan
    n = avg_mat.shape[-1]
    vert_scores = []
    with np.errstate(all="ignore"), _quiet():
        for i in range(n):
            vert_scores.append(np.nanmean(avg_mat[i + proximity_ignore:, i]))
    return np.array(vert_scores)


def thought_anchors_kurtosis(model, tokenizer, text: str, proximity: int = 4) -> np.ndarray:
    """(layers, heads) receiver kurtosis of one response (`get_all_heads_vert_scores` + `get_3d_ar_kurtosis`)."""
    ids = tokenizer.encode(text)
    attentions = eager_attentions(model, ids)
    sentences = split_solution_keep_spacing(text)
    boundaries = get_sentence_token_boundaries(text, sentences, tokenizer)
    verts = np.array([[get_vertical_scores(compute_averaged_matrix(layer[head], boundaries), proximity)
                       for head in range(layer.shape[0])] for layer in attentions])
    with _quiet():
        return stats.kurtosis(verts, axis=2, fisher=True, bias=True, nan_policy="omit")


def thought_anchors_boundaries(tokenizer, text: str) -> list[tuple[int, int]]:
    return get_sentence_token_boundaries(text, split_solution_keep_spacing(text), tokenizer)


# ----------------------------------------------------------------------------------- Zhang et al. (a2r)

def zhang_a2r(model, tokenizer, ids: list[int]) -> np.ndarray:
    """(layers, heads) a2r of one trace: `tokenize_parse_text` finds the first <think> and </think> tokens;
    answer region [r_end + 1, r_end + 1 + T - r_end - 2); reasoning keys [r_start + 1, r_end)."""
    str_tokens = tokenizer.convert_ids_to_tokens(ids)
    r_start_idx, r_end_idx = str_tokens.index("<think>"), str_tokens.index("</think>")
    tot_answer_tokens = len(ids) - r_end_idx - 2
    answer = (r_end_idx + 1, r_end_idx + 1 + tot_answer_tokens)
    attentions = eager_attentions(model, ids)
    return np.array([pattern[:, answer[0]:answer[1], r_start_idx + 1:r_end_idx].sum(axis=2).mean(axis=1)
                     for pattern in attentions])


# ----------------------------------------------------------------------------------- Retrieval_Head, HeadKV

def rule_top_k(row, k: int) -> np.ndarray:
    """The tie rule of headscope (docs/method.md, ties.py), as the family sweep's reference writes it out on its own
    in numpy (sweep.rule_top_k): the k positions of the row's largest entries, ties earliest first."""
    from headscope.families.sweep import rule_top_k as written_out

    return np.array([position for position, _ in written_out(torch.as_tensor(np.asarray(row, dtype=np.float32)), k)[0]],
                    dtype=np.int64)


def _decoding_rows(model, ids: list[int], steps: int, eos: int | None):
    """Greedy decoding with eager attention over the whole sequence at every step: yields (each layer's
    (heads, kv_len) row of the current query, the token written)."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    ids = list(ids)
    for _ in range(steps):
        with torch.no_grad():
            output = eager(torch.tensor([ids]), output_attentions=True, use_cache=False)
        token = int(output.logits[0, -1].argmax())
        yield [layer[0, :, -1].float() for layer in output.attentions], token
        ids.append(token)
        if token == eos:
            break


def retrieval_head_score(model, ids, needle, steps, eos) -> np.ndarray:
    """Retrieval_Head's retrieval_calculate: per step, the head's argmax in the needle and the token there
    the one written adds 1 / |needle|."""
    start, end = needle
    total = None
    for rows, token in _decoding_rows(model, ids, steps, eos):
        top = torch.tensor([[int(rule_top_k(head, 1)[0]) for head in row.numpy()] for row in rows])  # argmax
        hit = (top >= start) & (top < end) & (torch.tensor(ids)[top.clamp(max=len(ids) - 1)] == token)
        total = hit.float() / (end - start) + (0 if total is None else total)
    return total.numpy()


def headkv_r2_score(model, ids, needle, answer_steps, eos) -> np.ndarray:
    """HeadKV's r2 retrieval_calculate: per step, the head's top-|needle| positions that fall in the needle
    add their attention / |needle|; its decode stops after |answer tokens| steps."""
    start, end = needle
    total = None
    for rows, _ in _decoding_rows(model, ids, answer_steps, eos):
        step = torch.zeros(len(rows), rows[0].shape[0])
        for layer, row in enumerate(rows):
            for head in range(row.shape[0]):
                idx = rule_top_k(row[head].numpy(), end - start)  # the original's topk(end - start)
                for v, i in zip(row[head][idx].tolist(), idx.tolist()):
                    if start <= i < end:
                        step[layer, head] += v * 1 / (end - start)
        total = step if total is None else total + step
    return total.numpy()


# ----------------------------------------------------------------------------------- QRHead

def qrhead_detection_score(model, prompt_ids, query_span, null_ids, null_span, doc_spans, gold,
                           outlier_mask: bool = True) -> np.ndarray:
    """(layers, heads) one instance's QR score: `score_docs_per_head_for_detection` per document, summed over
    the gold documents (`lme_eval`). Spans are inclusive [start, end], as `get_content_span` returns them."""
    def per_token(ids, span):  # score_per_token_attention_to_query: mean over the query rows
        attentions = eager_attentions(model, ids)
        return torch.stack([torch.from_numpy(layer[:, span[0]:span[1] + 1]).mean(1) for layer in attentions])

    scores, null_scores = per_token(prompt_ids, query_span), per_token(null_ids, null_span)
    min_length = min(scores.shape[-1], null_scores.shape[-1])
    calibrated = scores[:, :, :min_length] - null_scores[:, :, :min_length]
    total = torch.zeros(calibrated.shape[:2])
    for g in gold:
        doc = calibrated[:, :, doc_spans[g][0]:doc_spans[g][1] + 1]
        if outlier_mask:
            threshold = doc.mean(dim=-1) - 2 * doc.std(dim=-1)
            doc = doc.masked_fill(~(doc > threshold.unsqueeze(-1)), 0.0)
        total += doc.sum(dim=-1)
    return total.numpy()


# ----------------------------------------------------------------------------------- kvpress

def kvpress_window_attention(query, keys, window_size, head_dim):  # SnapKVPress.compute_window_attention
    """query (bsz, heads, window, d): the last window queries, RoPE applied; keys (bsz, kv_heads, k_len, d)."""
    import math
    from transformers.models.llama.modeling_llama import repeat_kv

    k_len = keys.shape[2]
    key_states = repeat_kv(keys, query.shape[1] // keys.shape[1])
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) / math.sqrt(head_dim)
    attention_mask = torch.ones_like(attn_weights) * float("-inf")
    attention_mask = torch.triu(attention_mask, diagonal=k_len - window_size + 1)
    attn_weights += attention_mask
    attn_weights = torch.nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    return attn_weights[..., :-window_size]


def kvpress_snapkv_scores(attn_weights, num_key_value_heads, window_size, kernel_size):  # SnapKVPress.score
    bsz, num_heads, _, prefix = attn_weights.shape
    scores = attn_weights.mean(dim=-2)
    scores = torch.nn.functional.avg_pool1d(scores, kernel_size=kernel_size, padding=kernel_size // 2, stride=1)
    scores = scores.view(bsz, num_key_value_heads, num_heads // num_key_value_heads, prefix)
    scores = scores.mean(2)
    return torch.nn.functional.pad(scores, (0, window_size), value=scores.max().item() + 1)


def kvpress_streaming_scores(keys, n_sink, compression_ratio):  # StreamingLLMPress.score
    k_len = keys.shape[2]
    n_pruned = k_len - int(k_len * (1 - compression_ratio))
    scores = torch.ones_like(keys[..., 0])
    scores[:, :, n_sink:n_sink + n_pruned] = 0
    return scores


def kvpress_kept_indices(scores, compression_ratio):  # ScorerPress.compress: the indices gathered
    """(bsz, kv_heads, n_kept) the context positions each KV head keeps (all of them at ratio 0)."""
    k_len = scores.shape[-1]
    if compression_ratio == 0:
        return torch.arange(k_len).expand(*scores.shape[:2], k_len)
    n_kept = int(k_len * (1 - compression_ratio))
    return scores.topk(n_kept, dim=-1).indices


def kvpress_duo_streaming_mask(head_scores: np.ndarray, head_compression_ratio):  # post_init_from_model
    n_pruned = round(head_scores.size * head_compression_ratio)
    streaming_mask = torch.zeros(head_scores.shape, dtype=bool)
    if n_pruned > 0:
        indices = np.argsort(head_scores, axis=None)[:n_pruned]
        streaming_mask[np.unravel_index(indices, head_scores.shape)] = True
    return streaming_mask


def kvpress_duo_masked_keys(keys, layer_streaming_mask, sink_size, recent_size, head_compression_ratio):
    """DuoAttentionPress.compress: (bsz, kv_heads, k_len) True where a streaming head's context key is masked."""
    k_len = keys.shape[2]
    masked_keys = torch.zeros_like(keys[..., 0], dtype=torch.bool)
    if (head_compression_ratio > 0) or (k_len > (sink_size + recent_size)):
        masked_keys[:, layer_streaming_mask, sink_size:-recent_size] = True
    return masked_keys


class _quiet:
    """numpy and scipy warnings of empty slices and tiny samples, which the originals also raise."""

    def __enter__(self):
        import warnings
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
