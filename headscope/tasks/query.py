"""Questions over a list of documents with the gold ones marked: the prompts of QRHead's query score.

A record is {"id", "documents": [str, ...], "gold": int | [int, ...], "question", "answer"}. The
documents, joined by spaces, are the reasoning task's context ("Context: ... Question: ... Answer:").
The builder tokenises the prompt once to find each document's token span, and the same prompt with
the question replaced by the null question "N/A" to find the null question's tokens (the query
scorer swaps them in for its calibration prompt). Every sample counts: no success filter.
"""
from __future__ import annotations


from headscope.errors import HeadscopeError
from headscope.tasks.spans import _span_from_offsets
from headscope.tasks import reasoning
from dataclasses import dataclass

from headscope.options import DetectOptions, option
from headscope.validate import data_file
from headscope.tasks.base import DATA_DIR, Sample, Task, register_task

NULL_QUESTION = "N/A"


def load_query_data(path, num_samples: int | None = None, seed: int = 0) -> list[dict]:
    path = data_file(path, "query data file")
    records = []
    for where, record in reasoning._read_records(path):
        if not isinstance(record, dict):
            raise HeadscopeError(f"{where}: expected a JSON object")
        documents, gold = record.get("documents"), record.get("gold")
        if not isinstance(documents, list) or not documents or not all(isinstance(d, str) and d for d in documents):
            raise HeadscopeError(f"{where}: 'documents' must be a non-empty list of non-empty strings")
        gold = [gold] if isinstance(gold, int) else gold
        if not isinstance(gold, list) or not gold or not all(isinstance(g, int) and 0 <= g < len(documents)
                                                              for g in gold):
            raise HeadscopeError(f"{where}: 'gold' must be an index (or list of indices) into 'documents'")
        for name in ("id", "question", "answer"):
            if not isinstance(record.get(name), str) or not record[name].strip():
                raise HeadscopeError(f"{where}: field {name!r} must be a non-empty string")
        records.append({"id": record["id"], "documents": documents, "gold": gold, "question": record["question"],
                        "answer": record["answer"]})
    return reasoning.pick_records(records, num_samples, seed, path)


def _offsets(tokenizer, prompt: str, chat: bool):
    encoded = tokenizer(prompt, add_special_tokens=not chat, return_offsets_mapping=True)
    return list(encoded["input_ids"]), encoded["offset_mapping"]


def build_query_samples(tokenizer, records: list[dict], chat: bool = False) -> list[Sample]:
    if not getattr(tokenizer, "is_fast", False):
        raise HeadscopeError("the query task needs a fast tokenizer (offset mapping)")
    samples = []
    for record in records:
        context = " ".join(record["documents"])
        prompt, question_at = reasoning._prompt(tokenizer, context, record["question"], chat)
        null_prompt, null_at = reasoning._prompt(tokenizer, context, NULL_QUESTION, chat)
        context_at = question_at - len(reasoning.PROMPT_MIDDLE) - len(context)
        ids, offsets = _offsets(tokenizer, prompt, chat)
        null_ids, null_offsets = _offsets(tokenizer, null_prompt, chat)
        documents, at = [], context_at
        for text in record["documents"]:
            span = _span_from_offsets(prompt, offsets, (at, at + len(text)))
            if span is None:
                raise HeadscopeError(f"query record {record['id']}: a document has no tokens")
            documents.append(list(span))
            at += len(text) + 1
        question = _span_from_offsets(prompt, offsets, (question_at, question_at + len(record["question"])))
        null = _span_from_offsets(null_prompt, null_offsets, (null_at, null_at + len(NULL_QUESTION)))
        instruction = _qrhead_span(prompt, offsets, question_at, len(ids))
        null_instruction = _qrhead_span(null_prompt, null_offsets, null_at, len(null_ids))
        if (question is None or null is None or ids[:question[0]] != null_ids[:null[0]]
                or ids[question[1]:] != null_ids[null[1]:]):
            raise HeadscopeError(f"query record {record['id']}: the question does not tokenize apart from its "
                                 "surroundings, so the null question cannot replace it")
        samples.append(Sample(id=record["id"], task="query", prompt=prompt, add_special_tokens=not chat,
                              answer=record["answer"], span_text=record["question"],
                              span_char=(question_at, question_at + len(record["question"])),
                              meta={"documents": documents, "gold": record["gold"],
                                    "null_question_ids": null_ids[null[0]:null[1]],
                                    "qrhead_span": instruction, "null_qrhead_span": null_instruction}))
    return samples


def _qrhead_span(prompt: str, offsets, question_at: int, length: int) -> list[int]:
    """QRHead's query span: from the words that introduce the question (its "Query:", our "Question:") to the
    prompt's last token (QRHead's `compose_scoring_prompt`: the instruction, "Query:", the query and the chat
    suffix that follow the documents)."""
    label = reasoning.PROMPT_MIDDLE.strip()  # "Question:"
    at = prompt.rfind(label, 0, question_at)
    span = _span_from_offsets(prompt, offsets, (at, at + len(label)))
    return [span[0], length]


@dataclass
class QueryOptions(DetectOptions):
    max_new_tokens: int = option(1, "decoding budget (the score reads the prefill)", minimum=1)
    data: str | None = option(None, "JSON list or JSON Lines with id, documents, gold, question, answer "
                                    "(default: the bundled documents)", group="data")
    num_samples: int | None = option(None, "sample this many records (with --seed)", group="data", minimum=1)
    query_span: str = option("qrhead", "the query rows: qrhead (QRHead's span: from 'Question:' to the prompt's "
                                       "end) or question (the question's tokens only)", group="query score",
                             choices=("qrhead", "question"), ablate=False)
    query_outlier_mask: bool = option(True, "drop each gold document's calibrated token scores below mean - 2 std "
                                            "before summing (QRHead's detection code)", group="query score",
                                      flag="--no-query-outlier-mask", ablate=False)


def build(options: QueryOptions, tokenizer, max_context: int | None) -> list[Sample]:
    records = load_query_data(options.data or DATA_DIR / "query.jsonl", options.num_samples, options.seed)
    return build_query_samples(tokenizer, records, chat=options.chat)


register_task(Task("query", "query-focused retrieval heads (QRHead): question -> gold document attention",
                   QueryOptions, build, "query", reasoning.prompt_template, span_required=True,
                   success_filter=False, data_files=lambda options: [options.data or DATA_DIR / "query.jsonl"]))
