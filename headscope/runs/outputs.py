"""The files a run writes, and how: atomically, so a crash never leaves half a file.

In `--out`, with NAME the model's last path component and TASK the task (TASK_SCORER when the
scorer is not the task's namesake: pattern_induction, retrieval_r2):
  NAME_TASK_heads.json     {"L-H": [score, ...]} for every head (Retrieval_Head format)
  NAME_TASK_summary.json   {"L-H": {"mean", "std", "count", "max"}}
  NAME_TASK_samples.jsonl  one object per finished sample, appended and flushed as it finishes
  NAME_TASK_manifest.json  what is needed to reproduce the run
(see store.py for how the samples file makes runs resumable and shards mergeable).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import stat
import tempfile
from pathlib import Path

from . import schema
from ..errors import HeadscopeError


def output_paths(out_dir: str | Path, name: str, label: str, shard: tuple[int, int] | None = None) -> dict[str, Path]:
    """The run's files, named NAME_LABEL_KIND (LABEL: the task, or TASK_SCORER for a scorer other than the
    task's own); a shard's carry `.shard-I-of-N` before the extension. `base` holds legacy lists."""
    return prefix_paths(out_dir, f"{name}_{label}", shard)


def file_label(task: str, scorer: str) -> str:
    """Files are named after their scorer: NAME_TASK_* when the scorer is the task's namesake (retrieval,
    reasoning, query), NAME_TASK_SCORER_* otherwise (pattern_induction, retrieval_r2, ...)."""
    return task if scorer == task else f"{task}_{scorer}"


def prefix_paths(out_dir: str | Path, prefix: str, shard: tuple[int, int] | None = None) -> dict[str, Path]:
    suffix = f".shard-{shard[0]}-of-{shard[1]}" if shard else ""
    return {kind: Path(out_dir) / f"{prefix}_{kind}{suffix}.{'jsonl' if kind == 'samples' else 'json'}"
            for kind in ("heads", "summary", "samples", "manifest", "base_heads")}


def head_key(layer: int, head: int) -> str:
    return f"{layer}-{head}"


def head_keys(layers, heads: int) -> list[str]:
    """Every head's id, layer by layer: `layers` their indices (a hybrid's attention layers) or their number."""
    layers = range(layers) if isinstance(layers, int) else layers
    return [head_key(layer, head) for layer in layers for head in range(heads)]


def heads_by_layer(keys) -> dict[int, list[int]]:
    """{layer: [head, ...]} of LAYER-HEAD ids, heads ascending."""
    by_layer: dict[int, list[int]] = {}
    for key in keys:
        layer, head = parse_head_key(key)
        by_layer.setdefault(layer, []).append(head)
    return {layer: sorted(heads) for layer, heads in by_layer.items()}


def parse_head_key(key: str) -> tuple[int, int]:
    try:
        layer, head = key.split("-")
        return int(layer), int(head)
    except ValueError:
        raise HeadscopeError(f"{key!r} is not a head id of the form LAYER-HEAD (e.g. 13-4)") from None


@contextlib.contextmanager
def atomic_path(path: Path, follow: bool = False):
    """Yield a temporary path beside `path` to write; on success it replaces `path`, on failure it is removed.

    Readers never see half a file, and a crash leaves at worst a hidden .tmp file. Links (docs/runs.md, *Run
    folders*): a path headscope chose itself (`follow=False`: everything in a run folder, and files named after
    an input) must be a regular file or nothing; a symlink or a device there is refused, never written through
    or over. A path the user named (`follow=True`: `--out FILE`, `--plot FILE`) is written through: a link's
    target gets the content and the link stays; a device or pipe (`/dev/stdout`) is written in place."""
    target = write_target(path, follow)
    if target is None:
        yield from _written_in_place(Path(path))
        return
    path = target
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield temporary
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes files private; results are ordinary files
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def write_target(path, follow: bool = False) -> Path | None:
    """The file a write to `path` replaces (a link the user named resolved: see atomic_path), refused unless a
    regular file or nothing is there; None for what is written in place: a stream, or a path under /dev or /proc
    (/dev/stdout names the open standard output, whatever file it leads to). Callers may check early with it."""
    path = Path(path)
    if follow:
        if is_stream(path) or any(str(name).startswith(("/dev/", "/proc/"))
                                  for name in (path.absolute(), os.path.realpath(path))):
            return None
        path = Path(os.path.realpath(path))
    refuse_unless_regular(path)
    return path


def _written_in_place(path: Path):
    """Yield a private temporary file; then append its bytes to `path` (a pipe, a device, standard output
    redirected to a file: appended, so that `>>` keeps what was there) and remove it."""
    handle, temporary = tempfile.mkstemp(prefix=".headscope.", suffix=".tmp")
    os.close(handle)
    try:
        yield temporary
        with open(temporary, "rb") as written, open(path, "ab") as out:
            shutil.copyfileobj(written, out)
    finally:
        os.unlink(temporary)


def is_stream(path: Path) -> bool:
    """A device or pipe (what /dev/stdout leads to): there is no file to rename over it."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def refuse_unless_regular(path: Path) -> None:
    """One line unless `path` is a regular file or nothing (not a link, folder or device)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise link_refused(path)
    if stat.S_ISDIR(mode):
        raise HeadscopeError(f"{path} is a folder, not a file")
    if not stat.S_ISREG(mode):
        raise HeadscopeError(f"{path} is not a regular file")


def link_refused(path) -> HeadscopeError:
    return HeadscopeError(f"{path} is a symbolic link, not a file headscope wrote: it is left alone (remove it, "
                          "or choose another folder)")


def own_folder(path: Path) -> Path:
    """A folder headscope makes inside a run folder (rescore/): refused when a link or a file holds its name."""
    if os.path.islink(path):
        raise link_refused(path)
    if path.exists() and not path.is_dir():
        raise HeadscopeError(f"{path} is a file, not a folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_text(path: Path, text: str, follow: bool = False) -> None:
    with atomic_path(path, follow) as temporary, open(temporary, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def json_text(obj, where) -> str:
    """Strict JSON: a NaN or infinity is refused, never written (no reader could parse it back)."""
    try:
        return json.dumps(obj, indent=1, allow_nan=False) + "\n"
    except ValueError:
        raise HeadscopeError(f"{where}: refusing to write NaN or infinity into a JSON file") from None


def atomic_write_json(path: Path, obj, follow: bool = False) -> None:
    atomic_write_text(path, json_text(obj, path), follow)


def read_heads(path: str | Path) -> dict[str, list[float]]:
    """Read a heads file ({"L-H": [score, ...]}), refusing anything else with one clear line."""
    heads = schema.read_json(path, "score file")
    if not isinstance(heads, dict) or not heads:
        raise HeadscopeError(f"{path} is not a heads file: expected an object {{\"LAYER-HEAD\": [scores]}}")
    for key, scores in heads.items():
        parse_head_key(key)
        if not schema.list_of(schema.is_number)(scores):
            raise HeadscopeError(f"{path}: head {key} must map to a list of numbers")
    return heads


def summarize(heads: dict[str, list[float]]) -> dict[str, dict]:
    """Mean, population std, count and max of each head's list; a head with no value has null statistics
    (not 0.0: nothing was measured)."""
    summary = {}
    for key, scores in heads.items():
        count = len(scores)
        if not count:
            summary[key] = {"mean": None, "std": None, "count": 0, "max": None}
            continue
        mean = sum(scores) / count
        std = math.sqrt(sum((s - mean) ** 2 for s in scores) / count)
        summary[key] = {"mean": mean, "std": std, "count": count, "max": max(scores)}
    return summary


def mean_or_zero(stats: dict) -> float:
    """A head's mean for ranking, comparing and exporting: a head with no value counts as 0."""
    return 0.0 if stats["mean"] is None else stats["mean"]


def plain(summary: dict[str, dict]) -> dict[str, dict]:
    """Summary with null means (heads with no value) as 0, for ranking and comparing."""
    return {key: {"mean": mean_or_zero(stats)} for key, stats in summary.items()}


def ranked(summary: dict[str, dict]) -> list[tuple[str, dict]]:
    """Heads by mean score, highest first, heads with no value last; ties by layer then head, so the order is
    stable."""
    return sorted(summary.items(), key=lambda item: (item[1]["mean"] is None, -mean_or_zero(item[1]),
                                                     parse_head_key(item[0])))


def format_table(summary: dict[str, dict], top: int = 30) -> str:
    lines = [f"{'layer':>5} {'head':>4} {'mean':>8} {'std':>8} {'count':>5}"]
    for key, stats in ranked(summary)[:top]:
        layer, head = parse_head_key(key)
        if stats["mean"] is None:
            lines.append(f"{layer:>5} {head:>4} {'null':>8} {'null':>8} {0:>5}")
        else:
            lines.append(f"{layer:>5} {head:>4} {stats['mean']:>8.4f} {stats['std']:>8.4f} {stats['count']:>5}")
    return "\n".join(lines)
