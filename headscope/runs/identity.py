"""What made a run's numbers: fingerprints of the model, its tokenizer and the data files a task read.

A run's id (store.run_id) covers these and every option that changes a number, so that resume, `--append`,
`merge` and the ablation and kv logs never join rows of another model, tokenizer or data file; when two ids
differ, `difference` names what differs in one line. Each fingerprint is known before the model loads (a run
decides resume or refuse first), from the files:

- model: config.json, generation_config.json, weight indexes and remote code, byte for byte; each weight file's
  size, and for safetensors its header (every tensor's name, dtype, shape and offsets) and the first and last 64
  bytes of every tensor's data (training moves every tensor, so two checkpoints of one architecture differ
  there; a full hash of an 8B model's 16 GB would cost a minute per command); other weight formats: size and 16
  chunks spread over the file. A model that is no folder here (a hub id resolved from transformers' cache; a
  model handed to the Python API) is fingerprinted from the cache folder, else from its loaded tensors.
- tokenizer: its files (tokenizer.json, the vocabularies, special tokens, chat template), byte for byte.
- data: every file the task reads (a folder: each regular file in it, by relative path), byte for byte.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                   "chat_template.jinja", "chat_template.json")
MODEL_FILES = ("config.json", "generation_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
HUB_FILES = ["*.json", "*.safetensors", "*.py", "*.model", "*.txt", "*.jinja"]  # what from_pretrained reads
SAMPLE_BYTES = 64
CHUNKS, CHUNK_BYTES = 16, 65536
READ_BLOCK = 1 << 20


def digest(parts) -> str:
    """A short hex digest of a JSON-able value (sorted keys): the same value, the same digest."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_hash(path: Path) -> str:
    """sha256 of a regular file's bytes, read in blocks (a large haystack file never sits in memory whole)."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(READ_BLOCK):
            sha.update(block)
    return sha.hexdigest()[:16]


def safetensors_print(path: Path) -> dict:
    """Size, header and the first and last bytes of every tensor of a safetensors file."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        length_bytes = handle.read(8)
        (length,) = struct.unpack("<Q", length_bytes) if len(length_bytes) == 8 else (0,)
        header_bytes = handle.read(min(length, 100_000_000))
        sha.update(header_bytes)
        try:
            header = json.loads(header_bytes)
        except ValueError:  # not a safetensors file after all: loading says so; the bytes read still count
            header = {}
        start = 8 + length
        for name in sorted(key for key in header if key != "__metadata__"):
            first, last = header[name].get("data_offsets", (0, 0))
            for offset in {first, max(first, last - SAMPLE_BYTES)}:
                handle.seek(start + offset)
                sha.update(handle.read(min(SAMPLE_BYTES, last - offset)))
    return {"size": path.stat().st_size, "sampled": sha.hexdigest()[:16]}


def chunked_print(path: Path) -> dict:
    """Size and CHUNKS chunks spread evenly over a weight file of another format."""
    size, sha = path.stat().st_size, hashlib.sha256()
    with open(path, "rb") as handle:
        for index in range(CHUNKS):
            handle.seek(max(0, size - CHUNK_BYTES) * index // max(1, CHUNKS - 1))
            sha.update(handle.read(CHUNK_BYTES))
    return {"size": size, "sampled": sha.hexdigest()[:16]}


def model_files(folder: Path) -> dict:
    """{file name: its fingerprint} of a model folder's config, weights, weight indexes and remote code."""
    found = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        name = path.name
        if name.endswith(".safetensors"):
            found[name] = safetensors_print(path)
        elif name.endswith(WEIGHT_SUFFIXES):
            found[name] = chunked_print(path)
        elif name in MODEL_FILES or name.endswith((".index.json", ".py")):
            found[name] = file_hash(path)
    return found


def tokenizer_files(folder: Path) -> dict:
    return {name: file_hash(folder / name) for name in TOKENIZER_FILES if (folder / name).is_file()}


def model_folder(path: str) -> Path | None:
    """The folder a model's files are in: the path itself, or a hub id's snapshot in transformers' cache."""
    if os.path.isdir(os.path.expanduser(path)):
        return Path(os.path.expanduser(path)).resolve()
    try:
        from transformers.utils import cached_file

        found = cached_file(path, "config.json", local_files_only=True, _raise_exceptions_for_missing_entries=False)
        if not found:  # not cached yet: fetch what loading would (so a first run and its resume agree)
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(path, allow_patterns=HUB_FILES))
    except Exception:  # any failure to resolve it here: loading the model says why, in its own words
        return None
    return Path(found).parent


def of_model(path: str, loaded=None) -> dict:
    """The model's and tokenizer's fingerprints: {"model": {...}, "tokenizer": {...}}, each with its `digest`."""
    folder = model_folder(path)
    if folder is not None:
        model = {"files": model_files(folder)}
        tokenizer = {"files": tokenizer_files(folder)}
        if folder.parent.name == "snapshots":  # a hub cache snapshot: its folder is the commit
            model["revision"] = folder.name
    elif loaded is not None:
        model, tokenizer = loaded_model_print(loaded.model), loaded_tokenizer_print(loaded.tokenizer)
    else:
        model, tokenizer = {"name": path}, {"name": path}
    return {"model": model | {"digest": digest(model)}, "tokenizer": tokenizer | {"digest": digest(tokenizer)}}


def loaded_model_print(model) -> dict:
    """A model with no folder (built in memory and handed to the API): its config and, per tensor, its name,
    dtype, shape and first and last values."""
    sha = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        ends = flat[:8].float().cpu().tolist() + flat[-8:].float().cpu().tolist() if flat.numel() else []
        sha.update(f"{name}{tensor.dtype}{tuple(tensor.shape)}{ends}".encode())
    return {"in_memory": sha.hexdigest()[:16]}


def loaded_tokenizer_print(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return {"in_memory": digest([text, getattr(tokenizer, "chat_template", None), tokenizer.special_tokens_map])}


def of_data(paths) -> dict:
    """{"files": {path: content hash}, "paths": {path: digest}, "digest"} of the files and folders a task reads (a
    folder: each regular file in it by relative path). A path that is missing or not a regular file is recorded
    as such; the task itself refuses it with its own line."""
    files = {}
    for given in paths:
        path = Path(given)
        if path.is_dir():
            files[str(given)] = {str(inner.relative_to(path)): file_hash(inner)
                                 for inner in sorted(path.rglob("*")) if inner.is_file()}  # links followed, as read
        elif path.is_file():
            files[str(given)] = file_hash(path)
        else:
            files[str(given)] = "missing" if not os.path.lexists(path) else "not a regular file"
    contents = sorted(json.dumps(value, sort_keys=True) for value in files.values())  # what, not where it lies
    return {"files": files, "paths": {path: digest(value) for path, value in files.items()}, "digest": digest(contents)}


def difference(mine: dict | None, theirs: dict | None, parts=("model", "tokenizer", "data")) -> str | None:
    """What differs between two runs' identities ('model (its config or weights)', 'data (needles.jsonl)'),
    None when `parts` are the same or either is unknown (a run written before identities were recorded)."""
    if not mine or not theirs:
        return None
    for part, words in (("model", "model (its config or weights)"), ("tokenizer", "tokenizer")):
        if part in parts and part_digest(mine, part) != part_digest(theirs, part):
            return words
    if "data" in parts and part_digest(mine, "data") != part_digest(theirs, "data"):
        ours, other = (data_paths(side) for side in (mine, theirs))
        changed = [Path(path).name for path in ours if ours[path] != other.get(path)] or [Path(p).name for p in ours]
        return f"data ({', '.join(changed) or 'none read'})"
    return None


def data_paths(identity: dict) -> dict:
    data = identity.get("data")
    return data.get("paths", {}) if isinstance(data, dict) else {}


def part_digest(identity: dict, part: str) -> str | None:
    """A part's digest, from a whole identity ({"model": {..., "digest"}}) or from `digests` ({"model": digest})."""
    value = identity.get(part)
    return value.get("digest") if isinstance(value, dict) else value


def digests(identity: dict) -> dict:
    """The digests alone (and each data path's): what a run id covers and a log row carries (ablation,
    specificity and kv logs), enough for `difference` to name the file that changed."""
    data = identity.get("data") or {}
    return {"model": part_digest(identity, "model"), "tokenizer": part_digest(identity, "tokenizer"),
            "data": {"digest": data.get("digest"), "paths": data.get("paths", {})}}
