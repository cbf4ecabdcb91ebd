"""Success metrics: did the model's response contain the reference answer? Scores are on a 0-100 scale.

Lexical: rouge1 / rougeL recall (rouge-score), f1 / exact / contains (SQuAD normalisation), bleu / chrf
(sentence level, sacrebleu). Model-based (`metric_model`: a hub id or a local folder): bertscore (F1 of the
`bert-score` package, the optional extra `headscope[metrics]`) and embedding (cosine of mean-pooled
embeddings of a sentence encoder, through transformers)."""
from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache

from headscope.errors import HeadscopeError, loading_reason

LEXICAL = ("rouge1", "rougeL", "f1", "exact", "contains", "bleu", "chrf")
MODEL_BASED = ("bertscore", "embedding")
METRICS = LEXICAL + MODEL_BASED
DEFAULT_METRIC_MODELS = {"bertscore": "roberta-large", "embedding": "sentence-transformers/all-MiniLM-L6-v2"}

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


def score_response(metric: str, reference: str, response: str, metric_model: str | None = None,
                   trust_remote_code: bool = False) -> float:
    """How well `response` matches `reference`, 0-100.

    rouge1 / rougeL are the RECALL of the reference inside the response (the Retrieval_Head
    convention: a long response that contains the needle scores 100).
    """
    return score_responses(metric, [reference], [response], metric_model, trust_remote_code)[0]


def score_responses(metric: str, references: list[str], responses: list[str],
                    metric_model: str | None = None, trust_remote_code: bool = False) -> list[float]:
    """score_response over many pairs; a model-based metric loads its model once. A metric model that needs
    custom code loads only with trust_remote_code (the user's --trust-remote-code)."""
    if metric == "bertscore":
        return _bertscore(references, responses, metric_model or DEFAULT_METRIC_MODELS[metric], trust_remote_code)
    if metric == "embedding":
        return _embedding_cosine(references, responses, metric_model or DEFAULT_METRIC_MODELS[metric],
                                 trust_remote_code)
    return [_lexical(metric, reference, response) for reference, response in zip(references, responses)]


def _lexical(metric: str, reference: str, response: str) -> float:
    if metric in ("bleu", "chrf"):
        import sacrebleu

        sentence = sacrebleu.sentence_bleu if metric == "bleu" else sacrebleu.sentence_chrf
        return min(float(sentence(response, [reference]).score), 100.0)  # sacrebleu can give 100.00000000000004
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


def _bertscore(references, responses, model: str, trust_remote_code: bool) -> list[float]:
    try:
        import bert_score
    except ImportError:
        raise HeadscopeError("the bertscore metric needs the metrics extra: pip install 'headscope[metrics]'") from None
    config = _metric_config(model, trust_remote_code)
    if getattr(config, "auto_map", None):  # bert-score loads the model itself, with no way to pass the flag
        raise HeadscopeError(f"the metric model {model!r} needs custom code, which bert-score cannot be told to "
                             "trust: use another --metric-model")
    try:
        # a local folder is not in bert-score's table of layers
        _, _, f1 = bert_score.score(responses, references, model_type=model, num_layers=config.num_hidden_layers,
                                    verbose=False)
    except OSError as error:
        raise HeadscopeError(f"cannot load the metric model {model!r}: {loading_reason(error)}") from None
    return [100.0 * float(value) for value in f1]


def _metric_config(model: str, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise HeadscopeError(f"cannot load the metric model {model!r}: {loading_reason(error)}") from None


@lru_cache(maxsize=2)
def _encoder(model: str, trust_remote_code: bool):
    from transformers import AutoModel, AutoTokenizer

    _metric_config(model, trust_remote_code)  # a model needing custom code is refused here, in one line
    try:
        return (AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code),
                AutoModel.from_pretrained(model, trust_remote_code=trust_remote_code).eval())
    except (OSError, ValueError) as error:
        raise HeadscopeError(f"cannot load the metric model {model!r}: {loading_reason(error)}") from None


def _embedding_cosine(references, responses, model: str, trust_remote_code: bool) -> list[float]:
    """100 x cos(mean-pooled embedding of the reference, that of the response), as sentence-transformers'
    all-MiniLM-L6-v2 is meant to be used (mean pooling over the attention mask)."""
    import torch

    tokenizer, encoder = _encoder(model, trust_remote_code)

    def embed(texts):
        batch = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            hidden = encoder(**batch).last_hidden_state  # (n, tokens, dim)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    cosine = torch.nn.functional.cosine_similarity(embed(references), embed(responses), dim=-1)
    return [100.0 * float(value) for value in cosine]


def passes(score: float, threshold: float) -> bool:
    """A response counts as a success when its score is strictly above the threshold (the original: > 50)."""
    return score > threshold
