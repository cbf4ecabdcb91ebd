"""Success metrics: did the model's response contain the reference answer? Scores are on a 0-100 scale."""
from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache

from headscope.errors import HeadscopeError

METRICS = ("rouge1", "rougeL", "f1", "exact", "contains")

_DROP_PUNCTUATION = str.maketrans("", "", string.punctuation)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer  # imported lazily: it pulls in nltk

    # Same scorer as the Retrieval_Head script.
    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = text.lower().translate(_DROP_PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _token_f1(reference: str, response: str) -> float:
    ref_tokens = normalize_answer(reference).split()
    resp_tokens = normalize_answer(response).split()
    if not ref_tokens or not resp_tokens:  # SQuAD v2: empty only matches empty
        return 100.0 if ref_tokens == resp_tokens else 0.0
    num_same = sum((Counter(ref_tokens) & Counter(resp_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(resp_tokens)
    recall = num_same / len(ref_tokens)
    return 100.0 * 2 * precision * recall / (precision + recall)


def score_response(metric: str, reference: str, response: str) -> float:
    """How well `response` matches `reference`, 0-100.

    rouge1 / rougeL are the RECALL of the reference inside the response (the Retrieval_Head
    convention: a long response that contains the needle scores 100).
    """
    if metric in ("rouge1", "rougeL"):
        return 100.0 * _rouge_scorer().score(reference, response)[metric].recall
    if metric == "f1":
        return _token_f1(reference, response)
    if metric == "exact":
        return 100.0 if normalize_answer(reference) == normalize_answer(response) else 0.0
    if metric == "contains":
        # Whole words only: "blue" is not found in "blueberry".
        ref, resp = normalize_answer(reference), normalize_answer(response)
        return 100.0 if ref and f" {ref} " in f" {resp} " else 0.0
    raise HeadscopeError(f"unknown metric {metric!r}: choose one of {', '.join(METRICS)}")


def passes(score: float, threshold: float) -> bool:
    """A response counts as a success when its score is strictly above the threshold (the original: > 50)."""
    return score > threshold
