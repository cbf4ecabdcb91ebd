"""The samples file is the source of truth; heads and summary are derived from it.

Every finished sample is one line of NAME_TASK_samples.jsonl, flushed to disk before the next
sample starts, carrying what it contributes to every head (`head_scores`) and the id of the run
that made it (`run`: a hash of every setting that changes results). So:

- resume: a run finds its own finished samples by (run, id) and skips them; a line cut short by
  a kill is dropped; heads.json and summary.json are rebuilt from the lines, in file order,
  so a killed-and-resumed run writes them byte for byte as an uninterrupted one;
- refuse: lines of another run mean other settings: refused unless --append; appending a run
  that is already complete is refused too;
- legacy: a heads.json with no samples file beside it (the Retrieval_Head scripts' output) is
  set aside once as NAME_TASK_base_heads.json and its lists come first in every derived file,
  so it is counted exactly once however often the run is resumed;
- shards: `--shard i/n` writes NAME_TASK_samples.shard-i-of-n.jsonl; `merge` sorts the shards'
  lines by their `index` in the full sample grid into the file one process would have written.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from . import outputs
from .errors import HeadscopeError, notify

# Options that do not change any score: left out of the run id.
NOT_IN_RUN_ID = {"scorer", "out", "overwrite", "append", "quiet", "batch_size", "save_prompts", "device", "shard", "model",
                 "trust_remote_code", "plots", "check"}


def run_id(task: str, options: dict, model_name: str) -> str:
    settings = {k: v for k, v in sorted(options.items()) if k not in NOT_IN_RUN_ID}
    text = json.dumps({"task": task, "model": model_name, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def read_rows(path: Path, repair: bool = False) -> list[dict]:
    """The complete lines of a samples file. A last line cut short by a kill is dropped (and cut off, if repair)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if repair and len(complete) < len(data):
        with open(path, "r+b") as file:
            file.truncate(len(complete))
    rows = []
    for number, line in enumerate(complete.decode().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise HeadscopeError(f"{path} line {number} is not valid JSON: move the file away or --overwrite")
    return rows


def joins_list(score: float | None, keep_zeros: bool) -> bool:
    """Whether a passing sample's value for a head joins that head's list: a value (null is none), and not a
    zero of a scorer whose zero means "did not fire" (keep_zeros False). Signed values are always kept."""
    return score is not None and (keep_zeros or score != 0)


def derive_heads(rows: list[dict], keys: list[str], base: dict[str, list[float]] | None = None) -> dict:
    """Each head's list: the legacy base's scores, then every passing sample's, in file order."""
    heads = {key: list((base or {}).get(key, [])) for key in keys}
    for row in rows:
        if not row["passed"] or row.get("head_scores") is None:
            continue
        flat = [score for layer in row["head_scores"] for score in layer]
        if len(flat) != len(keys):
            raise HeadscopeError(f"sample {row['id']} has {len(flat)} head scores, this model has {len(keys)} heads")
        for key, score in zip(keys, flat):
            if joins_list(score, row.get("keep_zeros", True)):
                heads[key].append(score)
    return heads


def derive_heads_and_summary(paths: dict, rows: list[dict], keys: list[str]) -> tuple[dict, dict]:
    """Heads (the legacy base's lists first) and summary from the samples rows, written nowhere."""
    base = outputs.read_heads(paths["base_heads"]) if paths["base_heads"].exists() else None
    heads = derive_heads(rows, keys, base)
    return heads, outputs.summarize(heads)


def write_derived(paths: dict, rows: list[dict], keys: list[str]) -> tuple[dict, dict]:
    heads, summary = derive_heads_and_summary(paths, rows, keys)
    outputs.atomic_write_json(paths["heads"], heads)
    outputs.atomic_write_json(paths["summary"], summary)
    return heads, summary


class RunStore:
    """Opens the samples file of a run: decides resume / refuse, and appends finished samples."""

    def __init__(self, paths: dict, run: str, keys: list[str], overwrite: bool, append: bool):
        self.paths, self.run, self.keys = paths, run, keys
        if overwrite:
            for kind in ("samples", "base_heads", "heads", "summary"):
                paths[kind].unlink(missing_ok=True)
        elif paths["heads"].exists() and not paths["samples"].exists() and not paths["base_heads"].exists():
            legacy = outputs.read_heads(paths["heads"])
            unknown = set(legacy) - set(keys)
            if unknown:
                raise HeadscopeError(f"{paths['heads']} holds head {sorted(unknown)[0]}, which this model does not "
                                     "have: use --overwrite or another --out")
            outputs.atomic_write_json(paths["base_heads"], legacy)  # counted once, from now on, as the base
            notify(f"{paths['heads']} is a heads file with no samples file (Retrieval_Head format): its lists are "
                   f"kept as {paths['base_heads'].name} and come first in every head's list")
        self.rows = read_rows(paths["samples"], repair=True)
        runs = {row.get("run") for row in self.rows}
        others = sorted(runs - {run})
        if others and run not in runs and not append:  # a run already in the folder resumes, appended or not
            raise HeadscopeError(f"{paths['samples']} holds a run with other settings (run {others[0]}): "
                                 "add --append to add this run to it, --overwrite to replace it, or use another --out")
        self.done = {row["id"] for row in self.rows if row.get("run") == run}
        paths["samples"].parent.mkdir(parents=True, exist_ok=True)
        self.file = open(paths["samples"], "a")

    def append(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.rows.append(row)

    def close(self) -> None:
        self.file.close()


SHARD_FILE = re.compile(r"^(?P<prefix>.+)_samples\.shard-(?P<index>\d+)-of-(?P<count>\d+)\.jsonl$")


def merge(dirs: list[str | Path], out: str | Path | None = None) -> list[Path]:
    """Merge the shard files found in `dirs` into whole-run files in `out` (default: the first dir)."""
    groups: dict[str, dict[int, Path]] = {}
    counts: dict[str, int] = {}
    for directory in map(Path, dirs):
        if not directory.is_dir():
            raise HeadscopeError(f"no such folder: {directory}")
        for path in sorted(directory.iterdir()):
            match = SHARD_FILE.match(path.name)
            if not match:
                continue
            prefix, index, count = match["prefix"], int(match["index"]), int(match["count"])
            if counts.setdefault(prefix, count) != count:
                raise HeadscopeError(f"{prefix}: shards of different splits ({counts[prefix]} and {count})")
            if index in groups.setdefault(prefix, {}):
                raise HeadscopeError(f"{prefix}: shard {index} of {count} found twice ({path})")
            groups[prefix][index] = path
    if not groups:
        raise HeadscopeError(f"no shard files (*_samples.shard-I-of-N.jsonl) in {', '.join(map(str, dirs))}")
    out = Path(out or dirs[0])
    written = []
    for prefix, shards in sorted(groups.items()):
        missing = sorted(set(range(counts[prefix])) - set(shards))
        if missing:
            raise HeadscopeError(f"{prefix}: shard {missing[0]} of {counts[prefix]} is missing")
        rows = [row for index in sorted(shards) for row in read_rows(shards[index])]
        manifests = [_shard_manifest(path) for _, path in sorted(shards.items())]
        incomplete = [m["shard"] for m in manifests if not m.get("finished")]
        if incomplete:
            raise HeadscopeError(f"{prefix}: shard {incomplete[0]} has not finished (resume it first)")
        rows.sort(key=lambda row: (row.get("run"), row["index"]))
        seen = set()
        for row in rows:
            if (row.get("run"), row["index"]) in seen:
                raise HeadscopeError(f"{prefix}: sample {row['id']} appears in two shards")
            seen.add((row.get("run"), row["index"]))
        paths = outputs.prefix_paths(out, prefix)
        keys = manifests[0]["heads"]
        outputs.atomic_write_text(paths["samples"], "".join(json.dumps(row) + "\n" for row in rows))
        write_derived(paths, rows, keys)
        manifest = dict(manifests[0], shard=None, merged_from=[str(p) for _, p in sorted(shards.items())])
        outputs.atomic_write_json(paths["manifest"], manifest)
        written.append(paths["heads"])
    return written


def _shard_manifest(samples_path: Path) -> dict:
    path = samples_path.with_name(samples_path.name.replace("_samples.", "_manifest.").replace(".jsonl", ".json"))
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        raise HeadscopeError(f"{path} is missing or unreadable: that shard has not finished") from None


def find_runs(run_dir: Path, task: str | None = None) -> list[tuple[str, dict]]:
    """(prefix, manifest) of every whole detect run in the folder: a NAME_TASK[_SCORER]_samples.jsonl with its
    manifest beside it (ablation and specificity logs have none); refused with one line when there is none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise HeadscopeError(f"no such folder: {run_dir}")
    runs = []
    for path in sorted(run_dir.glob("*_samples.jsonl")):
        prefix = path.name.removesuffix("_samples.jsonl")
        try:
            manifest = json.loads(outputs.prefix_paths(run_dir, prefix)["manifest"].read_text())
        except (OSError, ValueError):
            continue
        if isinstance(manifest, dict) and "heads" in manifest and task in (None, manifest.get("task")):
            runs.append((prefix, manifest))
    if not runs:
        shards = "; it holds unmerged shards: run `headscope merge` first" if any(run_dir.glob("*.shard-*")) else ""
        raise HeadscopeError(f"no detect run in {run_dir}: no samples file NAME_TASK_samples.jsonl with its manifest"
                             + (f" for task {task}" if task else "") + shards)
    return runs
