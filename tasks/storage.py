"""Artifact I/O on any fsspec URI (local folder, s3://...): Parquet, JSON and model folders.

Single files are published atomically (local: write a temp file, then rename; object stores:
one PUT is atomic). A stage is complete only when its marker file exists (see tasks.stage).

Every operation on storage is retried with exponential backoff while its error is transient
(connection refused or reset, timeouts, HTTP 5xx, throttling), within a bound on attempts and on
total sleep (``configure``, from the run's ``storage`` config section); a missing file, a denied
request or a bad value fails at once. Each retry prints the operation and the URI (credentials
cut out of it); giving up raises ``StorageError`` with one line naming both.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import fsspec
import polars as pl

T = TypeVar("T")


class StorageError(OSError):
    """Storage stayed unreachable (or kept failing transiently) through every retry; one line."""


class DiskFull(StorageError):
    """No space was left where something was being written; one line naming the path and what.
    Nothing was half-published (writes are atomic, markers last): free space and rerun the run id."""


_FULL_MESSAGES = ("no space left on device", "database or disk is full", "disk quota exceeded", "not enough space on the disk")
# what torch and safetensors say when a write fails without an errno (ENOSPC behind it, most often)
_WRITE_FAILED = ("iostream error", "failed writing file", "file write failed", "unexpected pos", "failed to write")
_NEARLY_FULL = 16 * 2**20


def free_bytes(path: str | Path) -> int | None:
    """Free bytes of the local file system holding `path` (its nearest existing parent), else None."""
    try:
        probe = Path(str(path).removeprefix("file://")).resolve()
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def out_of_space(exc: BaseException, path: str | Path | None = None) -> bool:
    """True when `exc` (or what caused it) means the disk was full: ENOSPC/EDQUOT, SQLite's "database
    or disk is full", or a write failure without an errno while `path`'s file system is nearly full."""
    for err in _chain(exc):
        if isinstance(err, DiskFull) or (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)):
            return True
        text = str(err).lower()
        if any(m in text for m in _FULL_MESSAGES):
            return True
        if path is not None and any(m in text for m in _WRITE_FAILED):
            free = free_bytes(path)
            if free is not None and free < _NEARLY_FULL:
                return True
    return False


@contextmanager
def writing(what: str, path: str | Path) -> Iterator[None]:
    """Inside the block, running out of space becomes DiskFull naming `what` and `path`."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as exc:
        if not out_of_space(exc, path):
            raise
        where = getattr(exc, "filename", None) or path
        free = free_bytes(path)
        left = f", {free / 2**20:.1f} MiB free" if free is not None else ""
        raise DiskFull(f"no space left on device writing {what} to {redact(str(where))}{left} "
                       "(free space, then rerun the same run id: it resumes)") from exc


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    """Tries per operation, the first included."""
    base_delay_s: float = 0.5
    """Sleep before the first retry; doubled before each next one."""
    max_delay_s: float = 60.0
    """Bound on the total sleep of one operation across its retries."""


_policy = RetryPolicy()


def configure(settings: Any = None, **kwargs: Any) -> RetryPolicy:
    """Set the retry policy of this process from an object with attempts / base_delay_s /
    max_delay_s (the config's `storage` section) or keywords; returns the one in force."""
    global _policy
    fields = {k: getattr(settings, k) for k in ("attempts", "base_delay_s", "max_delay_s") if hasattr(settings, k)}
    _policy = RetryPolicy(**{**fields, **kwargs})
    return _policy


def policy() -> RetryPolicy:
    return _policy


# Exception classes (by name, so botocore/aiohttp need not be imported here) that mean the
# endpoint could not be reached or the exchange broke off: worth another try.
_TRANSIENT_NAMES = {
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "HTTPClientError", "ClientConnectionError", "ClientConnectorError", "ServerDisconnectedError",
    "ClientPayloadError", "IncompleteRead", "ResponseStreamingError", "FSTimeoutError", "ProxyConnectionError",
}
_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
                     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EAGAIN, errno.EBUSY,
                     getattr(errno, "EREMOTEIO", errno.EIO)}
_THROTTLING = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
               "RequestTimeout", "InternalError", "ServiceUnavailable"}
# Failures that another try cannot fix: missing, denied, wrong kind of path, bad value.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError,
              ValueError, TypeError, KeyError, StorageError)


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: connection refused/reset, timeouts, HTTP 5xx, throttling.
    The outermost error that says anything decides (s3fs turns a 403 into PermissionError)."""
    for err in _chain(exc):
        if isinstance(err, _PERMANENT):
            return False
        if isinstance(err, (ConnectionError, TimeoutError)):
            return True
        if {c.__name__ for c in type(err).__mro__} & _TRANSIENT_NAMES:
            return True
        response = getattr(err, "response", None)
        if isinstance(response, dict) and ("Error" in response or "ResponseMetadata" in response):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return code in _THROTTLING or int(status) >= 500 or int(status) == 429
        if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
            return True
    return False


_SECRET_KEYS = re.compile(r"(key|secret|token|signature|credential|password|passwd|auth|sig)", re.I)


def redact(uri: str) -> str:
    """`uri` fit for a log line: user:password@ and secret-looking query values replaced by ***.

    >>> redact("s3://AKIA:sec@bucket/x?X-Amz-Signature=abc&part=1")
    's3://***@bucket/x?X-Amz-Signature=***&part=1'
    """
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparseable uri>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if _SECRET_KEYS.search(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]}"


def with_retries(op: str, uri: str, fn: Callable[[], T], cleanup: Callable[[], None] | None = None) -> T:
    """fn() retried under the policy while it fails transiently; `cleanup` runs after each
    failed try (e.g. drop a half-downloaded folder)."""
    pol, slept, attempt = _policy, 0.0, 0
    start = time.monotonic()
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:
            if cleanup is not None:
                cleanup()
            if not is_transient(exc):
                raise
            # exponential backoff with jitter, cut so the total sleep stays within max_delay_s
            delay = min(pol.base_delay_s * 2 ** (attempt - 1) * random.uniform(0.75, 1.0), pol.max_delay_s - slept)
            if attempt >= pol.attempts or delay <= 0:
                raise StorageError(
                    f"storage: {op} {redact(uri)} failed after {attempt} attempts in "
                    f"{time.monotonic() - start:.1f}s: {_one_line(exc)}"
                ) from exc
            print(f"[storage] {op} {redact(uri)}: {_one_line(exc)}; retry {attempt}/{pol.attempts - 1} in {delay:.1f}s")
            time.sleep(delay)
            slept += delay


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
    return with_retries("exists", uri, lambda: fs.exists(path))


def listing(uri: str) -> list[str]:
    """URIs of the entries directly under the folder `uri` (sorted; [] when it does not exist)."""
    fs, path = fs_path(uri)
    scheme = "" if is_local(uri) else uri.split("://", 1)[0] + "://"

    def ls() -> list[str]:
        if not fs.exists(path):
            return []
        return sorted(scheme + p if scheme and not p.startswith(scheme) else p for p in fs.ls(path, detail=False))

    return with_retries("list", uri, ls)


def _publish_local(uri: str, data: bytes, exclusive: bool) -> bool:
    """Write a complete temp file beside `uri`, then move it into place: os.replace, or with
    `exclusive` a hard link, which fails (False) when `uri` exists."""
    target = local_path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if exclusive:
            os.link(tmp, target)
        else:
            os.replace(tmp, target)
        return True
    except FileExistsError:
        if exclusive:
            return False
        raise
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_bytes(uri: str, data: bytes) -> None:
    """Publish `data` at `uri` atomically: a reader sees the old file, no file, or all of it."""
    if is_local(uri):
        with writing(f"{len(data)} bytes", uri):
            _publish_local(uri, data, exclusive=False)
        return
    fs, path = fs_path(uri)
    # one PUT (or one completed multipart upload) is atomic on an object store
    with_retries("write", uri, lambda: fs.pipe_file(path, data))


def create_bytes(uri: str, data: bytes) -> bool:
    """Publish `data` at `uri` only if nothing is there yet (exclusive create: locally a hard link
    of a complete temp file, on S3 a conditional PUT); True when this call created it, False when
    the file existed. A retry after a lost reply may find its own write: compare the bytes."""
    if is_local(uri):
        with writing(f"{len(data)} bytes", uri):
            return _publish_local(uri, data, exclusive=True)
    fs, path = fs_path(uri)

    def put() -> bool:
        try:
            fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False

    return with_retries("create", uri, put)


def read_bytes(uri: str) -> bytes:
    fs, path = fs_path(uri)
    return with_retries("read", uri, lambda: fs.cat_file(path))


def read_many(uris: list[str], missing_ok: bool = False) -> dict[str, bytes]:
    """uri -> bytes of every file in `uris`, fetched concurrently where the file system can
    (s3fs batches the requests); a missing file fails the call, or with `missing_ok` is left out."""
    if not uris:
        return {}
    fs, _ = fs_path(uris[0])
    paths = {fs_path(u)[1]: u for u in uris}
    got = with_retries("read", uris[0].rsplit("/", 1)[0], lambda: fs.cat(list(paths), on_error="omit" if missing_ok else "raise"))
    return {paths[k]: v for k, v in got.items() if not isinstance(v, BaseException)}


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


def file_sha256(uri: str) -> str:
    """sha256 of one file, remembered in apo's cache by (path, size, mtime) locally or (URI, size,
    ETag) on an object store, so a 15 GB checkpoint is read once, not on every run."""
    fs, path = fs_path(uri)
    info = with_retries("stat", uri, lambda: fs.info(path))
    if is_local(uri):
        target = local_path(uri)
        stat = target.stat()  # of the file a link points to
        key = f"{target}|{stat.st_size}|{stat.st_mtime_ns}"
    else:
        key = f"{uri}|{info.get('size')}|{info.get('ETag') or info.get('etag') or info.get('LastModified')}"
    cache = _digest_cache()
    if key not in cache:
        cache[key] = with_retries("hash", uri, lambda: _sha256(fs, path))
        _save_digest_cache(cache)
    return cache[key]


def _digest_cache_path() -> Path:
    from apo_core.tokenizer import cache_dir  # the one cache folder of apo ($APO_CACHE_DIR)

    return cache_dir() / "file-sha256.json"


def _digest_cache() -> dict[str, str]:
    try:
        return json.loads(_digest_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_digest_cache(cache: dict[str, str]) -> None:
    try:
        write_bytes(str(_digest_cache_path()), json.dumps(cache, sort_keys=True).encode())
    except OSError:  # a read-only or full cache only costs a re-hash next time
        pass


def folder_digest(uri: str, keep: Callable[[str], bool]) -> str:
    """One sha256 over the files of folder `uri` whose names `keep` accepts (name and content
    digest of each, sorted by name); links are followed."""
    fs, root = fs_path(uri)
    names = sorted(p.rsplit("/", 1)[-1] for p in with_retries("list", uri, lambda: fs.ls(root, detail=False)))
    digest = hashlib.sha256()
    for name in names:
        if keep(name):
            digest.update(f"{name}\0{file_sha256(join(uri, name))}\n".encode())
    return digest.hexdigest()


def manifest(uri: str, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """relative path -> {bytes, sha256 (files up to HASH_LIMIT), rows (Parquet)} of every file
    under the folder `uri`, leaving out top-level entries named in `skip`."""
    fs, root = fs_path(uri)

    def build() -> dict[str, dict]:
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

    return with_retries("manifest", uri, build)


def manifest_mismatch(uri: str, expected: dict[str, dict]) -> str | None:
    """Why the files under `uri` differ from a manifest (missing, other size, other hash), or None."""
    fs, root = fs_path(uri)

    def check() -> str | None:
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

    return with_retries("verify", uri, check)


def write_json(obj: Any, uri: str) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def remove(uri: str) -> None:
    fs, path = fs_path(uri)

    def rm() -> None:
        if fs.exists(path):  # re-checked on a retry: an earlier try may have removed part of it
            fs.rm(path, recursive=True)

    with_retries("remove", uri, rm)


def put_dir(local: Path, uri: str) -> None:
    """Copy a local folder to `uri` (no-op when `uri` is that folder)."""
    if is_local(uri):
        target = local_path(uri)
        if target == Path(local).resolve():
            return
        with writing(f"a copy of {local}", target):
            shutil.copytree(local, target, dirs_exist_ok=True)
        return
    fs, path = fs_path(uri)
    # The trailing slash copies the folder's contents into `path`, also when `path` already
    # exists (an earlier try or run): without it fsspec would nest the folder inside it.
    with_retries("upload", uri, lambda: fs.put(str(local).rstrip("/") + "/", path.rstrip("/"), recursive=True))


def localize_dir(uri: str) -> Path:
    """A local folder holding `uri`'s files: itself when local, else a download in the cache
    (into a temp folder renamed when complete, so a broken download never looks cached). The
    cached copy is keyed by the folder's content as its listing states it (each file's path,
    size and ETag), so a folder rewritten under the same URI is downloaded again, never served
    stale; the copies of its earlier contents are removed."""
    if is_local(uri):
        return local_path(uri)
    fs, path = fs_path(uri)
    from apo_core.tokenizer import cache_dir  # the one cache folder of apo ($APO_CACHE_DIR)

    cache = cache_dir()
    listed = with_retries("list", uri, lambda: fs.find(path.rstrip("/"), detail=True))
    root = path.strip("/")
    content = hashlib.sha256("\n".join(
        f"{p.strip('/')[len(root):]}\0{info.get('size')}\0{info.get('ETag') or info.get('etag') or info.get('LastModified')}"
        for p, info in sorted(listed.items())).encode()).hexdigest()[:16]
    slug = root.replace("/", "__")
    target = cache / "downloads" / f"{slug}@{content}"
    if not target.exists():
        for stale in (cache / "downloads").glob(f"{slug}@*"):
            shutil.rmtree(stale, ignore_errors=True)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".dl-"))

        def fresh() -> None:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True, exist_ok=True)

        try:
            with writing(f"a download of {redact(uri)}", tmp):
                with_retries("download", uri, lambda: fs.get(path.rstrip("/") + "/", str(tmp), recursive=True), cleanup=fresh)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.rename(target)
        except OSError:  # another process finished the same download first
            shutil.rmtree(tmp, ignore_errors=True)
    return target
