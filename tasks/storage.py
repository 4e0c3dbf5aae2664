"""Artifact I/O on any fsspec URI (local folder, s3://...): Parquet, JSON and model folders.

Single files are published atomically (local: write a temp file, then rename; object stores:
one PUT is atomic). A stage is complete only when its marker file exists (see tasks.stage).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import fsspec
import polars as pl

CACHE_DIR = Path(os.environ.get("APO_CACHE_DIR", Path.home() / ".cache" / "apo"))


def fs_path(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://")).resolve()


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def exists(uri: str) -> bool:
    fs, path = fs_path(uri)
    return fs.exists(path)


def write_bytes(uri: str, data: bytes) -> None:
    if is_local(uri):
        target = local_path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    else:
        fs, path = fs_path(uri)
        with fs.open(path, "wb") as f:
            f.write(data)


def read_bytes(uri: str) -> bytes:
    fs, path = fs_path(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def write_parquet(df: pl.DataFrame, uri: str) -> None:
    buf = io.BytesIO()
    df.write_parquet(buf)
    write_bytes(uri, buf.getvalue())


def read_parquet(uri: str) -> pl.DataFrame:
    return pl.read_parquet(io.BytesIO(read_bytes(uri)))


HASH_LIMIT = 256 * 2**20  # files up to this size are hashed in manifests; larger ones by size only


def _sha256(fs: fsspec.AbstractFileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(8 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def manifest(uri: str, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """relative path -> {bytes, sha256 (files up to HASH_LIMIT), rows (Parquet)} of every file
    under the folder `uri`, leaving out top-level entries named in `skip`."""
    fs, root = fs_path(uri)
    out: dict[str, dict] = {}
    for path, info in sorted(fs.find(root, detail=True).items()):
        rel = path[len(root.rstrip("/")) + 1 :]
        if rel.split("/", 1)[0] in skip:
            continue
        entry: dict = {"bytes": int(info["size"])}
        if entry["bytes"] <= HASH_LIMIT:
            entry["sha256"] = _sha256(fs, path)
        if rel.endswith(".parquet"):
            entry["rows"] = pl.read_parquet(io.BytesIO(fs.cat_file(path))).height
        out[rel] = entry
    return out


def manifest_mismatch(uri: str, expected: dict[str, dict]) -> str | None:
    """Why the files under `uri` differ from a manifest (missing, other size, other hash), or None."""
    fs, root = fs_path(uri)
    for rel, entry in expected.items():
        path = f"{root.rstrip('/')}/{rel}"
        if not fs.exists(path):
            return f"{rel} is missing"
        size = int(fs.size(path))
        if size != entry["bytes"]:
            return f"{rel} has {size} bytes, the manifest says {entry['bytes']} (truncated or rewritten)"
        if "sha256" in entry and _sha256(fs, path) != entry["sha256"]:
            return f"{rel} does not match its sha256 in the manifest"
    return None


def write_json(obj: Any, uri: str) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def remove(uri: str) -> None:
    fs, path = fs_path(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def put_dir(local: Path, uri: str) -> None:
    """Copy a local folder to `uri` (no-op when `uri` is that folder)."""
    if is_local(uri):
        target = local_path(uri)
        if target == Path(local).resolve():
            return
        shutil.copytree(local, target, dirs_exist_ok=True)
        return
    fs, path = fs_path(uri)
    fs.put(str(local), path, recursive=True)


def localize_dir(uri: str) -> Path:
    """A local folder holding `uri`'s files: itself when local, else a download in the cache."""
    if is_local(uri):
        return local_path(uri)
    fs, path = fs_path(uri)
    target = CACHE_DIR / "downloads" / path.strip("/").replace("/", "__")
    if not target.exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=CACHE_DIR, prefix=".dl-"))
        fs.get(path.rstrip("/") + "/", str(tmp), recursive=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(target)
    return target
