"""The samples file is the source of truth; heads and summary are derived from it.

Every finished sample is one line of NAME_TASK_samples.jsonl, flushed to disk before the next
sample starts, carrying what it contributes to every head (`head_scores`) and the id of the run
that made it (`run`: a hash of every setting that changes results). A run folder is a small database:

- one writer: every command that writes a run's files holds its lock (lock.py) while it reads and writes;
- checked reads: every row and manifest is checked where it is read (schema.py); a line cut short by a
  kill (no newline at its end) is left out by every reader alike, with a note; only the run's own
  writer cuts it off the file, after the file was checked and accepted, and says so;
- resume: a run finds its own finished samples by (run, id) and skips them; heads.json and summary.json
  are rebuilt from the lines, in file order, so a killed-and-resumed run writes them byte for byte as an
  uninterrupted one; a run is complete when its manifest says it finished;
- nothing written before the work: a run decides resume / refuse before the model loads and writes its
  first byte only once its prompts are built (a refused run leaves the folder as it was);
- refuse: lines of another run mean other settings: refused unless --append, which pools only runs that
  measure the same thing (they differ only in the options that choose the samples) on different samples;
- legacy: a heads.json with no samples file beside it (the Retrieval_Head scripts' output) is
  set aside once as NAME_TASK_base_heads.json and its lists come first in every derived file,
  so it is counted exactly once however often the run is resumed;
- shards: `--shard i/n` writes NAME_TASK_samples.shard-i-of-n.jsonl; `merge` checks that the shards are
  of one run and cover its sample grid exactly once, and sorts their lines by `index` into the file one
  process would have written; it never replaces a whole run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import stat
from pathlib import Path

from . import identity, outputs, schema
from ..errors import HeadscopeError, notify
from .lock import writer_lock
from .mergecheck import refuse_inconsistent_merge

# Options that do not change any score: left out of the run id.
NOT_IN_RUN_ID = {"scorer", "out", "overwrite", "append", "quiet", "batch_size", "save_prompts", "device", "shard",
                 "model", "trust_remote_code", "plots", "check", "threads"}


def run_id(task: str, options: dict, made_of: dict) -> str:
    """A hash of what makes a run's numbers: the task, every option that changes one, and `made_of`, the digests
    of the model, tokenizer and data (identity.digests). Two runs share an id only when all of these agree."""
    settings = {k: v for k, v in sorted(options.items()) if k not in NOT_IN_RUN_ID}
    text = json.dumps({"task": task, "made_of": made_of, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def lock_name(prefix: str, shard: tuple[int, int] | None = None) -> str:
    """The name a run's writer locks (lock.py): its prefix, and its shard."""
    return prefix + (f".shard-{shard[0]}-of-{shard[1]}" if shard else "")


# ------------------------------------------------------------------------------------------ reading rows

@dataclasses.dataclass
class RowsFile:
    """A JSON Lines file as read: its complete lines, checked, and the cut last line (no newline), if any."""

    path: Path
    rows: list[dict]
    cut: bytes = b""
    size: int = 0  # bytes of the complete lines


def load_rows(path: Path, fields: dict = schema.SAMPLE_ROW) -> RowsFile:
    """Every complete line, checked against `fields` (one line naming the file, line and field if one is bad).
    A link or a non-regular file is refused before anything is read."""
    path = Path(path)
    if not os.path.lexists(path):
        return RowsFile(path, [])
    outputs.refuse_unless_regular(path)
    data = path.read_bytes()
    size = data.rfind(b"\n") + 1
    rows = []
    for number, raw in enumerate(data[:size].split(b"\n")[:-1], 1):
        where = f"{path} line {number}"
        line = schema.decode(raw, where)
        if line.strip():
            rows.append(schema.check(schema.parse(line, where), fields, where))
    return RowsFile(path, rows, data[size:], size)


def read_rows(path: Path, fields: dict = schema.SAMPLE_ROW) -> list[dict]:
    """The rows of a file a command reads but does not write: a cut last line is left out, with a note."""
    found = load_rows(path, fields)
    if found.cut.strip():
        notify(f"{path} ends in a cut line (a run killed while writing it): it is left out; resuming the run "
               f"re-runs {cut_sample(found.cut)}")
    return found.rows


def cut_sample(cut: bytes) -> str:
    """Which sample a cut line was, when its id was written before the cut."""
    found = re.search(rb'"id": "((?:[^"\\]|\\.)*)"', cut)
    return f"sample {found.group(1).decode(errors='replace')}" if found else "its sample"


def refuse_repeated_samples(rows: list[dict], path: Path) -> None:
    """A run folder holds one row per sample; two would count it twice in every mean."""
    seen = {}
    for row in rows:
        if row["id"] in seen:
            runs = sorted({str(seen[row["id"]]), str(row.get("run"))})
            raise HeadscopeError(f"{path} holds sample {row['id']} twice (run {' and '.join(runs)}): detect it again "
                                 "into a fresh --out")
        seen[row["id"]] = row.get("run")


# ------------------------------------------------------------------------------------------ pooling runs

def measure(task: str, options: dict) -> dict:
    """The settings that say what a run's scores mean: every result-changing option except those that only
    choose the samples (data, grid, seed). `--append` pools runs whose measures are equal."""
    from ..options import sample_fields
    from ..tasks import TASKS

    choosing = sample_fields(TASKS[task].options) if task in TASKS else set()
    return {key: json.loads(json.dumps(value, default=str)) for key, value in options.items()
            if key not in NOT_IN_RUN_ID and key not in choosing}


def measure_difference(task: str, mine: dict, theirs: dict) -> str | None:
    """'NAME is A here and B there' for the first setting whose value differs, None when the measures agree."""
    a, b = measure(task, mine), measure(task, theirs)
    name = next((key for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)), None)
    return None if name is None else f"--{name.replace('_', '-')} is {a.get(name)!r} in one and {b.get(name)!r} in " \
                                     "the other"


def refuse_unpoolable_runs(manifest: dict, path: Path) -> None:
    """A folder's runs are pooled into one heads file: they must measure the same thing."""
    records = list(manifest.get("runs", {}).items())
    for other, record in records[1:]:
        difference = measure_difference(manifest["task"], records[0][1].get("options", {}), record.get("options", {}))
        if difference:
            raise HeadscopeError(f"{path} pools runs {records[0][0]} and {other}, which measure different things "
                                 f"({difference}): their scores cannot be averaged; detect them into separate --out "
                                 "folders")


def run_rows(paths: dict, manifest: dict | None) -> list[dict]:
    """A whole run's rows for reading (rescore, report, show --bootstrap): checked, one per sample, and the
    runs pooled in the file comparable (when there is a manifest to say what they measure)."""
    rows = read_rows(paths["samples"])
    if manifest is not None:
        refuse_unpoolable_runs(manifest, paths["manifest"])
    refuse_repeated_samples(rows, paths["samples"])
    return rows


# ------------------------------------------------------------------------------------------ heads

def joins_list(score: float | None, keep_zeros: bool) -> bool:
    """Whether a passing sample's value for a head joins that head's list: a value (null is none), and not a
    zero of a scorer whose zero means "did not fire" (keep_zeros False). Signed values are always kept."""
    return score is not None and (keep_zeros or score != 0)


def derive_heads(rows: list[dict], keys: list[str], base: dict[str, list[float]] | None = None) -> dict:
    """Each head's list: the legacy base's scores, then every passing sample's, in file order (a null entry:
    the head has no value in that sample)."""
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


def read_manifest(path: Path) -> dict | None:
    """The checked manifest, or None when there is none."""
    return schema.read_manifest(path) if os.path.lexists(path) else None


# ------------------------------------------------------------------------------------------ writing rows

def open_for_append(path: Path):
    """A run's own rows file, opened to append: a regular file inside its folder with no other link (appending
    to a link or a hard-linked file would write into a file that is not the run's)."""
    outputs.refuse_unless_regular(path)  # before open(): opening a FIFO to write would block
    try:
        handle = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:  # it became a link since the check
            raise outputs.link_refused(path) from None
        raise
    info = os.fstat(handle)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(handle)
        raise HeadscopeError(f"{path} has another hard link: headscope appends only to files of its own")
    return os.fdopen(handle, "a", encoding="utf-8")


def drop_cut_line(file, found: RowsFile) -> None:
    """Cut off the cut last line of the run's own file (opened to append), as read: nothing else changed since."""
    if os.fstat(file.fileno()).st_size != found.size + len(found.cut):
        raise HeadscopeError(f"{found.path} changed while it was being read: run again")
    os.ftruncate(file.fileno(), found.size)
    notify(f"dropped a cut last line of {found.path}: {cut_sample(found.cut)} will be re-run")


def append_row(file, row: dict, path: Path) -> None:
    """One row appended to a run's rows file and on disk before the next sample starts (a kill loses nothing)."""
    file.write(row_line(row, path))
    file.flush()
    os.fsync(file.fileno())


def row_line(row: dict, path: Path) -> str:
    try:
        return json.dumps(row, allow_nan=False) + "\n"
    except ValueError:
        raise HeadscopeError(f"{path}: sample {row.get('id')} holds NaN or infinity, which is not written") from None


class RunStore:
    """A run's files in its folder (its writer holds the run's lock). Opening reads and checks them and decides
    resume or refuse, writing nothing; `begin` makes the first change, once the run's prompts are built."""

    def __init__(self, paths: dict, run: str, overwrite: bool, append: bool, settings: tuple[str, dict],
                 made_of: dict | None = None):
        self.paths, self.run, self.overwrite, self.settings, self.made_of = paths, run, overwrite, settings, made_of
        self.file, self.pending = None, None
        if overwrite:  # the old files are replaced at `begin`, not before: a refused run loses nothing
            self.found, self.manifest, self.legacy = RowsFile(paths["samples"], []), None, None
        else:
            self.found = load_rows(paths["samples"])
            self.manifest = read_manifest(paths["manifest"])
            self.legacy = self._legacy_heads()
        self.rows = self.found.rows
        self._refuse_other_runs(append)
        self.done = {row["id"] for row in self.rows if row.get("run") == run}

    def _legacy_heads(self) -> dict | None:
        paths = self.paths
        if paths["heads"].exists() and not paths["samples"].exists() and not paths["base_heads"].exists():
            return outputs.read_heads(paths["heads"])
        return None

    def _refuse_other_runs(self, append: bool) -> None:
        runs = {row.get("run") for row in self.rows}
        others = sorted(map(str, runs - {self.run}))
        if not others or self.run in runs:  # a run already in the folder resumes, appended or not
            return
        records = (self.manifest or {}).get("runs", {})
        for other in others:  # another model or tokenizer is never joined; other data only as --append's new samples
            record = records.get(other, {})
            changed = identity.difference(self.made_of, record.get("identity"), ("model", "tokenizer"))
            if changed:
                raise HeadscopeError(f"{self.paths['samples']} holds run {other}, made with other {changed} than "
                                     "this run: its samples cannot be resumed or joined; use another --out, or "
                                     "--overwrite to replace it")
            if record and "identity" not in record and not measure_difference(self.settings[0], self.settings[1],
                                                                              record.get("options", {})):
                raise HeadscopeError(f"{self.paths['samples']} holds run {other}, written by an earlier headscope "
                                     "whose run ids did not cover the model, tokenizer and data: it cannot be "
                                     "resumed; --overwrite to replace it, or use another --out")
        unpoolable = self._unpoolable(others)
        if append and unpoolable:
            raise HeadscopeError(f"--append cannot add this run to {self.paths['samples']}: {unpoolable}; use "
                                 "another --out")
        if not append and unpoolable:  # --append is offered only where it would be accepted
            raise HeadscopeError(f"{self.paths['samples']} holds a run with other settings: {unpoolable}; "
                                 "--overwrite to replace it, or use another --out")
        data = identity.difference(self.made_of, records.get(others[0], {}).get("identity"), ("data",))
        if not append and data:
            raise HeadscopeError(f"{self.paths['samples']} holds run {others[0]}, made with other {data} than this "
                                 "run: --append adds this run beside it when its samples are new ones, --overwrite "
                                 "replaces it, or use another --out")
        if not append:
            raise HeadscopeError(f"{self.paths['samples']} holds a run with other settings (run {others[0]}): add "
                                 "--append to add this run to it, --overwrite to replace it, or use another --out")

    def _unpoolable(self, others: list[str]) -> str | None:
        """Why this run cannot be pooled with the folder's other runs (--append), or None when it can: a run the
        manifest has no record of, or one that measures something else."""
        records = (self.manifest or {}).get("runs", {})
        task, mine = self.settings
        for other in others:
            if other not in records:
                return f"{self.paths['manifest']} has no record of run {other}, so whether the runs measure the " \
                       "same thing cannot be told"
            difference = measure_difference(task, mine, records[other].get("options", {}))
            if difference:
                return f"run {other} measures something else ({difference})"
        return None

    def refuse_repeated_samples(self, ids) -> None:
        """--append adds samples: one the file already holds from another run would be counted twice."""
        theirs = {row["id"]: row.get("run") for row in self.rows if row.get("run") != self.run}
        repeated = next((sample for sample in ids if sample in theirs), None)
        if repeated is not None:
            raise HeadscopeError(f"sample {repeated} is already in {self.paths['samples']} (run {theirs[repeated]}): "
                                 "--append adds only samples the folder does not hold; use another --out")

    @property
    def finished(self) -> bool:
        """This run finished before: its manifest says so and its summary is there."""
        record = (self.manifest or {}).get("runs", {}).get(self.run, {})
        return bool(record.get("finished")) and self.paths["summary"].exists()

    def begin(self, keys: list[str], info: dict) -> None:
        """Ready to write: the first change comes with the first row (or the run's end), so a run that fails
        before its first sample is finished (a prompt too long, a pattern that never ends) leaves no file."""
        self.pending = (keys, info)

    def _start(self) -> None:
        """The first change: replace the old run (--overwrite), set a legacy heads file aside, cut off a cut last
        line, and record this run in the manifest."""
        if self.file is not None:
            return
        keys, info = self.pending
        if self.overwrite:
            for kind in ("samples", "base_heads", "heads", "summary", "manifest"):
                outputs.refuse_unless_regular(self.paths[kind])
                self.paths[kind].unlink(missing_ok=True)
        elif self.legacy is not None:
            self._set_legacy_aside(keys)
        self.file = open_for_append(self.paths["samples"])
        if self.found.cut:
            drop_cut_line(self.file, self.found)
        self.write_manifest(info)

    def finish(self, keys: list[str], info: dict) -> tuple[dict, dict]:
        """Heads and summary derived from every row, and the run marked finished in the manifest."""
        self._start()
        derived = write_derived(self.paths, self.rows, keys)
        self.write_manifest(info)
        return derived

    def _set_legacy_aside(self, keys: list[str]) -> None:
        heads = self.paths["heads"]
        unknown = set(self.legacy) - set(keys)
        if unknown:
            raise HeadscopeError(f"{heads} holds head {sorted(unknown)[0]}, which this model does not have: use "
                                 "--overwrite or another --out")
        outputs.atomic_write_json(self.paths["base_heads"], self.legacy)  # counted once, from now on, as the base
        notify(f"{heads} is a heads file with no samples file (Retrieval_Head format): its lists are kept as "
               f"{self.paths['base_heads'].name} and come first in every head's list")

    def write_manifest(self, info: dict) -> None:
        """This run's information, plus `runs`: every run the file holds, by run id (a run added with --append
        does not erase the record of the ones before it)."""
        this_run = {key: value for key, value in info.items() if key != "runs"}
        previous = (self.manifest or {}).get("runs", {})
        seen = versions_seen(previous.get(self.run), this_run.get("versions"), self.run)
        if len(seen) > 1:
            this_run["versions_seen"] = seen
        self.manifest = this_run | {"runs": previous | {self.run: this_run}}
        outputs.atomic_write_json(self.paths["manifest"], self.manifest)

    def append(self, row: dict) -> None:
        self._start()
        append_row(self.file, row, self.paths["samples"])
        self.rows.append(row)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def versions_seen(record: dict | None, versions: dict | None, run: str) -> list[dict]:
    """The library versions a resumed run's samples were made with, oldest first; a new one is said once."""
    if not record or versions is None:
        return [versions]
    seen = record.get("versions_seen") or [record.get("versions")]
    if versions not in seen:
        last = seen[-1] or {}
        changed = ", ".join(f"{name} {last.get(name)} -> {version}" for name, version in versions.items()
                            if last.get(name) != version)
        notify(f"run {run} resumes with other library versions ({changed}): its samples now come from both "
               "(the manifest's versions_seen lists them)")
        seen = seen + [versions]
    return seen


# ------------------------------------------------------------------------------------------ shards

SHARD_FILE = re.compile(r"^(?P<prefix>.+)_samples\.shard-(?P<index>\d+)-of-(?P<count>\d+)\.jsonl$")


@dataclasses.dataclass
class Shards:
    """One run prefix's shard files: shard index -> samples path, out of `count`."""

    prefix: str
    count: int
    paths: dict[int, Path]

    def manifest_path(self, index: int) -> Path:
        path = self.paths[index]
        return path.with_name(path.name.replace("_samples.", "_manifest.").replace(".jsonl", ".json"))


def find_shards(dirs: list[str | Path]) -> list[Shards]:
    groups: dict[str, Shards] = {}
    for directory in map(Path, dirs):
        if not directory.is_dir():
            raise HeadscopeError(f"no such folder: {directory}")
        for path in sorted(directory.iterdir()):
            match = SHARD_FILE.match(path.name)
            if not match:
                continue
            prefix, index, count = match["prefix"], int(match["index"]), int(match["count"])
            shards = groups.setdefault(prefix, Shards(prefix, count, {}))
            if shards.count != count:
                raise HeadscopeError(f"{prefix}: shards of different splits ({shards.count} and {count})")
            if index in shards.paths:
                raise HeadscopeError(f"{prefix}: shard {index} of {count} found twice ({path})")
            shards.paths[index] = path
    if not groups:
        raise HeadscopeError(f"no shard files (*_samples.shard-I-of-N.jsonl) in {', '.join(map(str, dirs))}")
    for shards in groups.values():
        missing = sorted(set(range(shards.count)) - set(shards.paths))
        if missing:
            raise HeadscopeError(f"{shards.prefix}: shard {missing[0]} of {shards.count} is missing")
    return [groups[prefix] for prefix in sorted(groups)]


def merge(dirs: list[str | Path], out: str | Path | None = None) -> list[Path]:
    """Merge the shard files found in `dirs` into whole-run files in `out` (default: the first dir). Every shard
    is read and checked before anything is written; an existing whole run is never replaced."""
    found = find_shards(dirs)
    out = Path(out or dirs[0])
    with contextlib.ExitStack() as locks:
        for shards in found:
            locks.enter_context(writer_lock(out, lock_name(shards.prefix)))
            for index, path in shards.paths.items():
                locks.enter_context(writer_lock(path.parent, lock_name(shards.prefix, (index, shards.count))))
        plans = [(shards, *merged_run(shards)) for shards in found]
        for shards, rows, manifest in plans:
            refuse_inconsistent_merge(shards, rows, manifest)
        targets = [refuse_replacing_a_run(out, shards.prefix, rows) for shards, rows, _ in plans]
        writes = [(paths, merged_texts(paths, rows, manifest)) for (_, rows, manifest), paths in zip(plans, targets)
                  if paths is not None]  # None: already merged, nothing to write
        for _, files in writes:  # every file's text was built (and could be) before the first is written
            for path, text in files.items():
                outputs.atomic_write_text(path, text)
    return [paths["heads"] for paths, _ in writes]


def merged_texts(paths: dict, rows: list[dict], manifest: dict) -> dict[Path, str]:
    """The merged run's files and their text, in the order they are written (the manifest last)."""
    heads, summary = derive_heads_and_summary(paths, rows, manifest["heads"])
    return {paths["samples"]: "".join(row_line(row, paths["samples"]) for row in rows),
            paths["heads"]: outputs.json_text(heads, paths["heads"]),
            paths["summary"]: outputs.json_text(summary, paths["summary"]),
            paths["manifest"]: outputs.json_text(manifest, paths["manifest"])}


def merged_run(shards: Shards) -> tuple[list[dict], dict]:
    """The merged rows, in grid order, and the manifest of the whole run; refused unless the shards are finished
    shards of the same runs that cover each run's sample grid exactly once."""
    manifests = {index: shard_manifest(shards, index) for index in sorted(shards.paths)}
    records = {index: manifest.get("runs") or {manifest.get("run"): manifest} for index, manifest in manifests.items()}
    first = records[0]
    for index, runs in records.items():
        changed = identity.difference(manifests[0].get("identity"), manifests[index].get("identity"))
        if changed:
            raise HeadscopeError(f"{shards.prefix}: shards 0 and {index} of {shards.count} were made with other "
                                 f"{changed}: shards of different runs are not merged")
        if set(runs) != set(first):
            raise HeadscopeError(f"{shards.prefix}: shard {index} of {shards.count} holds run "
                                 f"{', '.join(map(str, sorted(runs, key=str)))} and shard 0 run "
                                 f"{', '.join(map(str, sorted(first, key=str)))}: shards of different runs (other "
                                 "settings) are not merged")
        if manifests[index]["heads"] != manifests[0]["heads"]:
            raise HeadscopeError(f"{shards.prefix}: shards 0 and {index} score different heads: not one model")
        unfinished = next((run for run, record in runs.items() if not record.get("finished")), None)
        if unfinished is not None or not manifests[index].get("finished"):
            raise HeadscopeError(f"{shards.prefix}: shard {index} has not finished (resume it first)")
    rows_of = {index: read_rows(path, schema.SHARD_ROW) for index, path in shards.paths.items()}
    for run, record in first.items():
        check_coverage(shards, run, record.get("grid_size"), rows_of)
    rows = sorted((row for index in sorted(rows_of) for row in rows_of[index]),
                  key=lambda row: (row["run"], row["index"]))
    whole = {run: dict(record, shard=None) for run, record in first.items()}
    merged_from = [str(path) for _, path in sorted(shards.paths.items())]
    merged = dict(manifests[0], shard=None, runs=whole, merged_from=merged_from)
    seen = []
    for manifest in manifests.values():
        for versions in manifest.get("versions_seen") or [manifest.get("versions")]:
            if versions not in seen:
                seen.append(versions)
    if len(seen) > 1:  # shards made on other library versions: merged, said, recorded (as a resumed run's are)
        notify(f"{shards.prefix}: the shards were made with {len(seen)} sets of library versions (the merged "
               "manifest's versions_seen lists them)")
        merged["versions_seen"] = seen
        for record in whole.values():
            record["versions_seen"] = seen
    return rows, merged


def shard_manifest(shards: Shards, index: int) -> dict:
    path = shards.manifest_path(index)
    if not os.path.lexists(path):
        raise HeadscopeError(f"{path} is missing: that shard has not finished")
    return schema.read_manifest(path)


def check_coverage(shards: Shards, run: str, grid_size: int | None, rows_of: dict[int, list[dict]]) -> None:
    """Shard i holds run `run`'s samples i, i + N, i + 2N, ... of its grid, each once, and together all of them."""
    seen: dict[int, int] = {}
    for index, rows in rows_of.items():
        for row in (row for row in rows if row["run"] == run):
            place = row["index"]
            if place in seen:
                where = f"twice in shard {index}" if seen[place] == index else f"in shards {seen[place]} and {index}"
                raise HeadscopeError(f"{shards.prefix}: sample {row['id']} (index {place}) is {where}")
            if place % shards.count != index:
                raise HeadscopeError(f"{shards.prefix}: shard {index} of {shards.count} holds sample {row['id']} "
                                     f"(index {place}), which belongs to shard {place % shards.count}")
            seen[place] = index
    size = grid_size if grid_size is not None else max(seen, default=-1) + 1
    missing = next((place for place in range(size) if place not in seen), None)
    if missing is not None:
        raise HeadscopeError(f"{shards.prefix}: sample index {missing} of run {run} is in no shard (shard "
                             f"{missing % shards.count} of {shards.count} is incomplete: resume it)")
    beyond = next((place for place in seen if place >= size), None)
    if beyond is not None:
        raise HeadscopeError(f"{shards.prefix}: index {beyond} lies outside run {run}'s grid of {size} samples")


def refuse_replacing_a_run(out: Path, prefix: str, rows: list[dict]) -> dict | None:
    """The whole-run paths to write; None when they already hold exactly this merge (merging again changes
    nothing). Any other whole run there is refused: merge never replaces a run."""
    paths = outputs.prefix_paths(out, prefix)
    existing = [paths[kind] for kind in ("samples", "heads", "summary", "manifest") if os.path.lexists(paths[kind])]
    if not existing:
        return paths
    merged = "".join(row_line(row, paths["samples"]) for row in rows).encode()
    if os.path.lexists(paths["samples"]) and not os.path.islink(paths["samples"]) \
            and paths["samples"].read_bytes() == merged:
        notify(f"{paths['samples']} already holds this merge: nothing to write")
        return None
    raise HeadscopeError(f"{existing[0]} already holds a whole run, which merge never replaces: merge into "
                         "another --out, or move that run away")


# ------------------------------------------------------------------------------------------ finding runs

def find_runs(run_dir: Path, task: str | None = None) -> list[tuple[str, dict]]:
    """(prefix, manifest) of every whole detect run in the folder: a NAME_TASK[_SCORER]_samples.jsonl with its
    manifest beside it (ablation and specificity logs have none); refused with one line when there is none, or
    when a manifest is malformed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise HeadscopeError(f"no such folder: {run_dir}")
    runs = []
    for path in sorted(run_dir.glob("*_samples.jsonl")):
        prefix = path.name.removesuffix("_samples.jsonl")
        manifest = read_manifest(outputs.prefix_paths(run_dir, prefix)["manifest"])
        if manifest is not None and task in (None, manifest["task"]):
            runs.append((prefix, manifest))
    if not runs:
        shards = "; it holds unmerged shards: run `headscope merge` first" if any(run_dir.glob("*.shard-*")) else ""
        raise HeadscopeError(f"no detect run in {run_dir}: no samples file NAME_TASK_samples.jsonl with its manifest"
                             + (f" for task {task}" if task else "") + shards)
    return runs
