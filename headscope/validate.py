"""The one check every number headscope takes goes through: a flag's value (as argparse parses it, and again
when an options object is built in Python) and a number read from a file (schema.parse).

A number is refused when it is NaN or an infinity, when it lies outside the range its flag states, and when it is
larger than headscope can compute with exactly: an integer flag above LARGEST_INTEGER (budgets times heads would
overflow int64 and come out negative), a number above LARGEST_MAGNITUDE (sums and squares of millions of them
would overflow to infinity).

It also keeps a command's outputs off its inputs: a path a user names for an output is never an input of the
command, nor one of a run folder's own files (refuse_overwriting); and a data file is sized before it is read
(data_file)."""
from __future__ import annotations

import argparse
import math
import os
import re
import stat
from pathlib import Path

from .errors import HeadscopeError

LARGEST_INTEGER = 2**31 - 1  # times a head count below 2**32, still exact in int64
LARGEST_MAGNITUDE = 1e15  # squared and summed over millions of samples, still finite in float64
LARGEST_SEED = 2**32 - 1  # numpy's seeds


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def number_problem(value, minimum=None, maximum=None) -> str | None:
    """Why `value` cannot be taken (a phrase that follows the flag's name), None when it can."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} is not a finite number"
    if minimum is not None and value < minimum:
        return f"must be at least {shown(minimum)}, not {shown(value)}"
    if maximum is not None and value > maximum:
        return f"must be at most {shown(maximum)}, not {shown(value)}"
    if isinstance(value, int) and abs(value) > max(LARGEST_INTEGER, maximum or 0):
        return f"{shown(value)} is too large (at most {LARGEST_INTEGER}: a larger integer overflows)"
    if abs(value) > LARGEST_MAGNITUDE:
        return f"{shown(value)} is too large (at most 1e15 in magnitude)"
    return None


def shown(value) -> str:
    """A number as a message shows it: an integer of many digits by its length (never converted to a float)."""
    if isinstance(value, int):
        return f"an integer of {len(str(abs(value)))} digits" if abs(value) >= 10**15 else str(value)
    return f"{value:g}"


def numbers_in(value) -> list:
    """The numbers of a parsed value: itself, or the entries of a list (a comma-separated flag)."""
    if is_number(value):
        return [value]
    if isinstance(value, (list, tuple)):
        return [entry for entry in value if is_number(entry)]
    return []


def value_problem(value, minimum=None, maximum=None) -> str | None:
    """The first problem of any number in `value` (a number or a list of them)."""
    return next(filter(None, (number_problem(number, minimum, maximum) for number in numbers_in(value))), None)


def check_value(flag: str, value, minimum=None, maximum=None) -> None:
    """One line naming the flag for the first number of `value` that cannot be taken."""
    problem = value_problem(value, minimum, maximum)
    if problem:
        raise HeadscopeError(f"{flag} {problem}")


def checked(parse, minimum=None, maximum=None):
    """An argparse `type=` function: `parse`, then every number of its result checked; a problem is argparse's
    one error line naming the flag."""
    def typed(text: str):
        value = parse(text)
        problem = value_problem(value, minimum, maximum)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    typed.__name__ = getattr(parse, "__name__", "value")  # argparse names it in "invalid int value"
    return typed


def integer(minimum=None, maximum=None):
    return checked(int, minimum, maximum)


def real(minimum=None, maximum=None):
    return checked(float, minimum, maximum)


# ------------------------------------------------------------------------------------------ output paths

# The files that make a run folder a record (samples, manifests, derived heads, logs): an output named by the user
# never lands on one of them, whatever the links on the way.
RUN_FILE = re.compile(r".+_(samples|manifest|heads|summary|base_heads|ablation|kv|specificity)"
                      r"(_[a-z]+)?(\.shard-\d+-of-\d+)?\.jsonl?$|^rescore\.json$")


def refuse_overwriting(out, flag: str, inputs=(), run_folders=()) -> None:
    """One line when the path a user named for an output (`flag`) is empty, is (through links, or as another hard
    link) one of the command's input files, or is one of a run folder's own files; checked before any work."""
    if out is None:
        return
    if not str(out).strip():
        raise HeadscopeError(f"{flag} is empty: name a file")
    target = Path(os.path.realpath(out))
    for source in map(Path, inputs):
        if target == Path(os.path.realpath(source)) or _same_file(target, source):
            raise HeadscopeError(f"{flag} {out} is {source}, an input of this command: it would be overwritten; "
                                 "write elsewhere")
    folders = {Path(os.path.realpath(folder)) for folder in run_folders}
    if target.parent in folders and RUN_FILE.match(target.name):
        raise HeadscopeError(f"{flag} {out} is {target.name}, one of the run's own files in {target.parent}: it "
                             "would be overwritten; write elsewhere")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


# ------------------------------------------------------------------------------------------ input files

LARGEST_DATA_FILE = 64 * 2**20  # --data and --needles are read whole: a larger file is refused before it is read


def data_file(path, what: str) -> Path:
    """A data file the user named (`what`: "needles file", ...), checked before a byte is read: there, a regular
    file (not a folder, a device such as /dev/zero, or a pipe), and at most LARGEST_DATA_FILE bytes."""
    path = Path(path)
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise HeadscopeError(f"{what} not found: {path}") from None
    if stat.S_ISDIR(info.st_mode):
        raise HeadscopeError(f"{what} {path} is a folder, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise HeadscopeError(f"{what} {path} is not a regular file (a device or a pipe): give a file")
    if info.st_size > LARGEST_DATA_FILE:
        raise HeadscopeError(f"{what} {path} is {info.st_size / 2**20:,.0f} MB: a data file is read whole, and "
                             f"headscope takes at most {LARGEST_DATA_FILE // 2**20} MB (cut or sample it first)")
    return path
