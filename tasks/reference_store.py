"""The reference-sample store: scored reference samples kept across runs under a digest of
everything that decides them, so stage 1 draws only what no earlier run drew.

Layout under the store root (any fsspec URI; default `<artifact_root>/_reference`)::

    v1/<model>/manifests/<entry>.json            the commit of one entry: its files' bytes and sha256
    v1/<model>/index/<entry>-<writer>.parquet    key, sample_idx, reward (small: what lookups read)
    v1/<model>/samples/<entry>-<writer>.parquet  key, sample_idx, seed, response, reward, n_tokens, finish_reason
    v1/<model>/contexts/<context>.json           the settings the keys of one context were made from
    v1/<model>/readers/<run_id>.json             a stage reading the store now (pruning leaves the model alone)
    v1/<model>/used.json                         the last run that used this model
    v1/<model>/damaged/<entry>.json              manifests whose files failed their check (sampled again)

`<model>` is 16 hex digits of the reference weights' digest, so dropping a model is one folder.
A key is a digest of the context (weights, tokenizer, dtype, engine, verifier version, sampling
settings, base seed) and the prompt's rendered text and gold answer; a store row is sample i of a key.

An entry is published by creating its manifest exclusively once both of its files are complete:
a writer killed before that leaves files no manifest names (pruning removes them), never a half
entry. `<entry>` is a digest of the entry's (key, sample) pairs, so two writers of the same samples
race for one manifest and the loser removes its files; where entries overlap, each (key, sample) is
read from the first published.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import io
import json
import os
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator

import polars as pl

from . import storage
from .faults import failpoint

VERSION = "v1"
READER_TTL_S = 24 * 3600  # a reader marker older than this is a crashed run's, not a running one's
ORPHAN_AGE_S = 3600  # files no manifest names, older than this, are a killed writer's
INDEX_COLUMNS = ("key", "sample_idx", "reward")
SAMPLE_SCHEMA = {"key": pl.String, "sample_idx": pl.Int64, "seed": pl.Int64, "response": pl.String, "reward": pl.Float64,
                 "n_tokens": pl.Int64, "finish_reason": pl.String}

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")
MODEL_CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "tokenizer.model")


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name in MODEL_CONFIG_FILES


def is_tokenizer_file(name: str) -> bool:
    return name in TOKENIZER_FILES or name.endswith(".tiktoken")


@dataclass(frozen=True)
class SampleContext:
    """Everything besides the prompt that decides a reference sample and its reward."""

    model: str  # digest of the weight files and model config (storage.folder_digest)
    tokenizer: str  # digest of the tokenizer files
    dtype: str
    engine: str  # the resolved engine: vllm and transformers draw different tokens from one seed
    reward: str  # rewards.reward_version
    temperature: float
    top_p: float
    max_new_tokens: int
    stop_token_ids: tuple[int, ...] | None
    seed: int

    def digest(self) -> str:
        return _context_digest(self)

    def key(self, prompt: str, answer: str) -> str:
        """The store key of (rendered prompt, gold answer) under this context."""
        return hashlib.sha256(f"{self.digest()}\x1f{prompt}\x1f{answer}".encode()).hexdigest()[:32]


HIT_SCHEMA = {"key": pl.String, "sample_idx": pl.Int64, "entry": pl.String}


@functools.cache
def _context_digest(context: SampleContext) -> str:
    """Computed once per context, not once per key (a lookup keys every training prompt)."""
    return hashlib.sha256(json.dumps(asdict(context), sort_keys=True).encode()).hexdigest()


@dataclass
class Lookup:
    """What the store holds for some keys: each (key, sample) with the entry it is read from."""

    hits: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=HIT_SCHEMA))
    manifests: dict[str, dict] = field(default_factory=dict)  # entry -> manifest, of entries read from
    damaged: list[str] = field(default_factory=list)  # entries quarantined during this lookup

    def indices(self) -> dict[str, set[int]]:
        """key -> the sample indices stored for it."""
        grouped = self.hits.group_by("key").agg(pl.col("sample_idx"))
        return {k: set(idx) for k, idx in grouped.iter_rows()}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def _age_s(stamp: str) -> float:
    try:
        return time.time() - dt.datetime.fromisoformat(stamp).timestamp()
    except (TypeError, ValueError):
        return float("inf")


def _parquet_bytes(df: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.write_parquet(buf)
    return buf.getvalue()


def _file_record(data: bytes, rel: str) -> dict:
    return {"path": rel, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _check(data: bytes | None, record: dict) -> str | None:
    if data is None:
        return f"{record['path']} is missing"
    if len(data) != record["bytes"]:
        return f"{record['path']} has {len(data)} bytes, its manifest says {record['bytes']}"
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        return f"{record['path']} does not match its sha256"
    return None


class ReferenceStore:
    """The store at `root` for one sample context; `run_id` names this run in what it writes."""

    def __init__(self, root: str, context: SampleContext, run_id: str = ""):
        self.root, self.context, self.run_id = root, context, run_id or "run"
        self.folder = storage.join(root, VERSION, context.model[:16])

    def _path(self, *parts: str) -> str:
        return storage.join(self.folder, *parts)

    # -- reading ----------------------------------------------------------------------------
    def _manifests(self) -> list[tuple[str, dict]]:
        """(entry, manifest) of every published entry, first published first."""
        out = []
        for uri, data in _json_files(self._path("manifests")).items():
            entry = uri.rsplit("/", 1)[1].removesuffix(".json")
            try:
                out.append((entry, json.loads(data)))
            except ValueError:
                self._quarantine(entry, data, "its manifest is not JSON")
        return sorted(out, key=lambda em: (em[1].get("published", ""), em[0]))

    def lookup(self, keys: Iterable[str]) -> Lookup:
        """Which samples of `keys` the store holds (reads the manifests and the small index files;
        an index that fails its manifest's check is reported and its entry quarantined)."""
        wanted = set(keys)
        found = Lookup()
        manifests = self._manifests()
        blobs = storage.read_many([self._path(m["index"]["path"]) for _, m in manifests], missing_ok=True)
        frames = []
        for order, (entry, m) in enumerate(manifests):
            data = blobs.get(self._path(m["index"]["path"]))
            problem = _check(data, m["index"])
            if problem:
                self._quarantine(entry, json.dumps(m).encode(), problem)
                found.damaged.append(entry)
                continue
            frames.append(pl.read_parquet(io.BytesIO(data), columns=["key", "sample_idx"]).with_columns(
                pl.lit(order).alias("order"), pl.lit(entry).alias("entry")))
        if frames:
            found.hits = (pl.concat(frames).filter(pl.col("key").is_in(list(wanted)))
                          .sort("order").unique(["key", "sample_idx"], keep="first", maintain_order=True)
                          .select(list(HIT_SCHEMA)).cast(HIT_SCHEMA))
            used = set(found.hits["entry"].unique().to_list())
            found.manifests = {e: m for e, m in manifests if e in used}
        return found

    def read(self, found: Lookup) -> tuple[pl.DataFrame, list[str]]:
        """(the stored rows of `found`, entries whose samples file failed its check: quarantined,
        their rows left out, so the caller samples them again)."""
        uris = {e: self._path(m["samples"]["path"]) for e, m in found.manifests.items()}
        blobs = storage.read_many(list(uris.values()), missing_ok=True)
        frames, damaged = [], []
        for entry, m in found.manifests.items():
            data = blobs.get(uris[entry])
            problem = _check(data, m["samples"])
            if problem:
                self._quarantine(entry, json.dumps(m).encode(), problem)
                damaged.append(entry)
                continue
            frames.append(pl.read_parquet(io.BytesIO(data)).with_columns(pl.lit(entry).alias("entry")))
        if not frames:
            return pl.DataFrame(schema=SAMPLE_SCHEMA), damaged
        picked = found.hits.filter(~pl.col("entry").is_in(damaged))
        rows = pl.concat(frames, how="vertical_relaxed").join(picked, on=["key", "sample_idx", "entry"], how="inner")
        return rows.select(list(SAMPLE_SCHEMA)).cast(SAMPLE_SCHEMA), damaged

    def _quarantine(self, entry: str, manifest_bytes: bytes, problem: str) -> None:
        print(f"[reference store] entry {entry} is damaged ({problem}); its samples are drawn again")
        storage.write_bytes(self._path("damaged", f"{entry}.json"), manifest_bytes)
        storage.remove(self._path("manifests", f"{entry}.json"))

    # -- writing ----------------------------------------------------------------------------
    def publish(self, rows: pl.DataFrame) -> bool:
        """Publish `rows` (SAMPLE_SCHEMA) as one entry; False when the same samples were published
        first by another writer (this writer's files are removed again)."""
        rows = rows.select(list(SAMPLE_SCHEMA)).cast(SAMPLE_SCHEMA).sort(["key", "sample_idx"])
        entry = hashlib.sha256("\n".join(f"{k}:{i}" for k, i in rows.select("key", "sample_idx").iter_rows()).encode()).hexdigest()[:32]
        writer = uuid.uuid4().hex[:12]
        samples, index = _parquet_bytes(rows), _parquet_bytes(rows.select(list(INDEX_COLUMNS)))
        files = {"samples": f"samples/{entry}-{writer}.parquet", "index": f"index/{entry}-{writer}.parquet"}
        self._describe_context()
        storage.write_bytes(self._path(files["samples"]), samples)
        storage.write_bytes(self._path(files["index"]), index)
        failpoint("reference_store.before_manifest")
        manifest = {"entry": entry, "writer": writer, "run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                    "published": _now(), "context": self.context.digest(), "rows": rows.height,
                    "keys": rows["key"].n_unique(), "samples": _file_record(samples, files["samples"]),
                    "index": _file_record(index, files["index"])}
        if storage.create_bytes(self._path("manifests", f"{entry}.json"), json.dumps(manifest, sort_keys=True).encode()):
            return True
        theirs = storage.read_json(self._path("manifests", f"{entry}.json"))
        if theirs.get("writer") == writer:  # our own create, retried after its reply was lost
            return True
        for rel in files.values():
            storage.remove(self._path(rel))
        return False

    def _describe_context(self) -> None:
        uri = self._path("contexts", f"{self.context.digest()[:16]}.json")
        if not storage.exists(uri):
            storage.create_bytes(uri, json.dumps(asdict(self.context), indent=2, sort_keys=True).encode())

    @contextmanager
    def reading(self, model_path: str) -> Iterator["ReferenceStore"]:
        """Mark this run as a reader of the model's entries while the block runs (pruning leaves
        them alone) and record the model as used."""
        marker = self._path("readers", f"{self.run_id}.json")
        stamp = {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(), "since": _now()}
        storage.write_json(stamp, marker)
        storage.write_json({**stamp, "model_path": model_path, "last_used": stamp["since"]}, self._path("used.json"))
        try:
            yield self
        finally:
            storage.remove(marker)


# -- the whole store: what `apo store` shows and prunes ---------------------------------------
def model_folders(root: str) -> list[str]:
    return storage.listing(storage.join(root, VERSION))


def describe(root: str) -> list[dict]:
    """Per model in the store: its digest, the model path and time it was last used with, entries,
    prompts, samples, bytes and whether a run is reading it now."""
    out = []
    for folder in model_folders(root):
        name = folder.rstrip("/").rsplit("/", 1)[-1]
        used = _read_json_or(storage.join(folder, "used.json"), {})
        manifests = [json.loads(b) for b in _json_files(storage.join(folder, "manifests")).values()]
        keys: set[str] = set()
        for data in storage.read_many([storage.join(folder, m["index"]["path"]) for m in manifests]).values():
            keys.update(pl.read_parquet(io.BytesIO(data), columns=["key"])["key"].to_list())
        out.append({"model": name, "model_path": used.get("model_path"), "last_used": used.get("last_used"),
                    "entries": len(manifests), "prompts": len(keys), "samples": sum(m["rows"] for m in manifests),
                    "bytes": sum(m["samples"]["bytes"] + m["index"]["bytes"] for m in manifests),
                    "readers": len(_fresh_readers(folder))})
    return out


def prune(root: str, unused_days: float, models: Iterable[str] = (), dry_run: bool = False) -> list[str]:
    """Remove the models not used for `unused_days` (or named in `models` by digest prefix), never one
    a run is reading; and in the rest, files no manifest names older than ORPHAN_AGE_S. Returns what
    was (or, with `dry_run`, would be) removed."""
    named = tuple(models)
    removed = []
    for folder in model_folders(root):
        name = folder.rstrip("/").rsplit("/", 1)[-1]
        if _fresh_readers(folder):
            continue
        used = _read_json_or(storage.join(folder, "used.json"), {})
        if (named and name.startswith(named)) or (not named and _age_s(used.get("last_used", "")) > unused_days * 86400):
            removed.append(folder)
            if not dry_run:
                storage.remove(folder)
            continue
        removed += _remove_orphans(folder, dry_run)
    return removed


def _remove_orphans(folder: str, dry_run: bool) -> list[str]:
    manifests = _json_files(storage.join(folder, "manifests"))
    named = {storage.join(folder, json.loads(b)[part]["path"]) for b in manifests.values() for part in ("samples", "index")}
    fs, _ = storage.fs_path(folder)
    out = []
    for sub in ("samples", "index"):
        for uri in storage.listing(storage.join(folder, sub)):
            if uri in named:
                continue
            info = fs.info(storage.fs_path(uri)[1])
            mtime = info.get("mtime") or info.get("LastModified")
            age = time.time() - (mtime.timestamp() if hasattr(mtime, "timestamp") else float(mtime or 0))
            if age > ORPHAN_AGE_S:
                out.append(uri)
                if not dry_run:
                    storage.remove(uri)
    return out


def _fresh_readers(folder: str) -> list[dict]:
    readers = [json.loads(b) for b in _json_files(storage.join(folder, "readers")).values()]
    return [r for r in readers if _age_s(r.get("since", "")) < READER_TTL_S]


def _json_files(folder: str) -> dict[str, bytes]:
    """uri -> bytes of every .json file directly in `folder`, read in one batch."""
    return storage.read_many([u for u in storage.listing(folder) if u.endswith(".json")])


def _read_json_or(uri: str, default):
    try:
        return storage.read_json(uri)
    except FileNotFoundError:
        return default
