"""What a run's files must hold, checked where they are read: one line naming the file, the line and the field.

Everything headscope reads back (samples rows, ablation logs, manifests, heads and summary files, companion
results) goes through `parse`: strict JSON, where NaN, Infinity, a number too large to compute with (above 1e15
in magnitude: validate.py) and an integer of thousands of digits are refused instead of being carried into a
mean. Rows and manifests are then checked against the fields below; a field not listed is kept as it is (a newer headscope may add fields).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import HeadscopeError
from ..validate import LARGEST_MAGNITUDE


class _NotANumber(ValueError):
    """A NaN, an infinity or a number too large to compute with in a JSON text (its message says which)."""


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf
        raise _NotANumber(f"{text} is not a finite number (NaN and infinities are refused)")
    return _not_too_large(value, text)


def _checked_int(text: str) -> int:
    return _not_too_large(int(text), text)  # int() refuses thousands of digits: "too many digits" below


def _not_too_large(value, text: str):
    if abs(value) > LARGEST_MAGNITUDE:  # summed and squared over many samples it would overflow to infinity
        raise _NotANumber(f"{text if len(text) < 30 else text[:12] + '...'} is too large (at most "
                          "1e15 in magnitude)")
    return value


def _no_constant(name: str):
    raise _NotANumber(f"{name} is not a finite number (NaN and infinities are refused)")


def parse(text: str, where: str):
    """A JSON value from `text`; `where` ("FILE" or "FILE line N") starts the one-line error."""
    try:
        return json.loads(text, parse_float=_finite_float, parse_int=_checked_int, parse_constant=_no_constant)
    except _NotANumber as error:
        raise HeadscopeError(f"{where}: {error}") from None
    except json.JSONDecodeError as error:
        raise HeadscopeError(f"{where} is not valid JSON ({error.msg} at line {error.lineno} column "
                             f"{error.colno})") from None
    except ValueError:  # Python's limit on the digits of an integer
        raise HeadscopeError(f"{where} holds an integer with too many digits") from None
    except RecursionError:
        raise HeadscopeError(f"{where} is nested too deeply to be a headscope file") from None


def decode(data: bytes, where: str) -> str:
    """UTF-8 text, or one line saying where it is not."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise HeadscopeError(f"{where} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset "
                             f"{error.start})") from None


def read_json(path: str | Path, what: str = "file"):
    """A whole JSON file, strictly parsed; a missing file, a folder or bad bytes are one line each."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise HeadscopeError(f"no such {what}: {path}") from None
    except IsADirectoryError:
        raise HeadscopeError(f"{path} is a folder, not a file") from None
    return parse(decode(data, str(path)), str(path))


# --------------------------------------------------------------------------------------------- fields

def is_text(value) -> bool:
    return isinstance(value, str)


def is_flag(value) -> bool:
    return isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_object(value) -> bool:
    return isinstance(value, dict)


def optional(check):
    def check_or_null(value) -> bool:
        return value is None or check(value)

    return check_or_null


def list_of(check, length: int | None = None):
    def check_list(value) -> bool:
        return isinstance(value, list) and (length is None or len(value) == length) and all(map(check, value))

    return check_list


def is_score_grid(value) -> bool:
    """layers x heads: every layer the same length; an entry is a number, or null (no value in this sample).
    Written out (not with list_of) because it runs over every head of every row."""
    if not isinstance(value, list) or not value or not all(isinstance(layer, list) for layer in value):
        return False
    width = len(value[0])
    return all(len(layer) == width and all(v is None or type(v) in (float, int) for v in layer) for layer in value)


def is_head_id(value) -> bool:
    layer, dash, head = value.partition("-") if isinstance(value, str) else ("", "", "")
    return bool(dash) and layer.isdigit() and head.isdigit()


def is_run_records(value) -> bool:
    return isinstance(value, dict) and all(isinstance(record, dict) and is_object(record.get("options", {}))
                                           for record in value.values())


# name: (required, check, what it must be)
SAMPLE_ROW = {
    "id": (True, is_text, "a string"),
    "passed": (True, is_flag, "true or false"),
    "error": (True, optional(is_text), "a string or null"),
    "response": (False, is_text, "a string"),
    "score": (True, optional(is_number), "a number or null"),
    "run": (False, is_text, "a string"),
    "index": (False, is_count, "a whole number >= 0"),
    "head_scores": (False, optional(is_score_grid), "null or a layers x heads list of numbers (or nulls)"),
    "keep_zeros": (False, is_flag, "true or false"),
    "reference": (False, is_text, "a string"),
    "answer_text": (False, optional(is_text), "a string or null"),
    "excerpt": (False, optional(list_of(is_text, 3)), "null or a list of 3 strings"),
    "span": (False, optional(list_of(is_count, 2)), "null or [start, end]"),
    "context_length": (False, optional(is_number), "a number or null"),
    "depth_percent": (False, optional(is_number), "a number or null"),
    "scorer": (False, is_text, "a string"),
    "unscored": (False, optional(is_text), "a string or null"),  # why a scorer gave this sample no value
    "tied_head_steps": (False, is_count, "a whole number >= 0"),  # head-steps whose top k + 1 held a tie (ties.py)
    # receiver: per head, the think sentence its later sentences read most (argmax of v[k]; -1: no value)
    "most_received": (False, is_score_grid, "a layers x heads list of sentence indices"),
}
# A shard's rows must say which run they belong to and where they sit in the sample grid (merge sorts on it).
SHARD_ROW = SAMPLE_ROW | {"run": (True, is_text, "a string"), "index": (True, is_count, "a whole number >= 0")}
# ablate's and specificity's logs: one row per sample, arm and repeat.
ARM_ROW = {key: SAMPLE_ROW[key] for key in ("id", "passed", "error", "score", "context_length", "depth_percent")} | {
    "ablation": (True, is_text, "a string"),
    "arm": (True, is_text, "a string"),
    "repeat": (True, is_count, "a whole number >= 0"),
}
# `headscope kv`'s log: an arm row and the share of the KV cache the sample kept (null: an error).
KV_ROW = ARM_ROW | {"kv_kept": (True, optional(is_number), "a number or null")}
MANIFEST = {
    "task": (True, is_text, "a string"),
    "heads": (True, lambda value: bool(value) and list_of(is_head_id)(value), "a non-empty list of LAYER-HEAD ids"),
    "run": (False, is_text, "a string"),
    "options": (False, is_object, "an object"),
    "scorer": (False, optional(is_text), "a string or null"),
    "shard": (False, optional(is_text), "a string or null"),
    "finished": (False, optional(is_text), "a string or null"),
    "model_path": (False, optional(is_text), "a string or null"),
    "grid_size": (False, is_count, "a whole number >= 0"),
    "tied_head_steps": (False, is_count, "a whole number >= 0"),
    "runs": (False, is_run_records, "an object of run records (each with an \"options\" object)"),
}


def json_type(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(value), "a number")


def check(value, fields: dict, where: str) -> dict:
    """`value` when it is an object whose listed fields hold what they must; else one line naming the field."""
    if not isinstance(value, dict):
        raise HeadscopeError(f"{where}: expected a JSON object, found {json_type(value)}")
    for name, (required, valid, what) in fields.items():
        if name not in value:
            if required:
                raise HeadscopeError(f"{where}: field {name!r} is missing")
        elif not valid(value[name]):
            raise HeadscopeError(f"{where}: field {name!r} must be {what}")
    return value


def read_manifest(path: str | Path) -> dict:
    """A run's manifest, checked."""
    return check(read_json(path), MANIFEST, str(path))
