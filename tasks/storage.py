"""Artifact I/O on any fsspec URI (local folder, s3://...): Parquet, JSON and model folders.

Single files are published atomically (local: write a temp file, then rename; object stores:
one PUT is atomic). A stage is complete only when its marker file exists (see tasks.stage).
"""

from __future__ import annotations

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
