"""Reading raw data set rows from any fsspec path (JSONL, JSON, Parquet; one file, or a folder or
glob of parts) or the HF hub."""

from __future__ import annotations

import io
import json
from typing import Mapping

import polars as pl

from apo_core.data import TEMPLATES, Cleaned, DatasetSpec, chat_prompt, clean_rows, render_prompt, spec_for

from . import storage


def hub_uri(spec: DatasetSpec, split: str, name: str) -> str:
    """`hf://` URI (huggingface_hub's fsspec file system) of a built-in split."""
    if split not in spec.files:
        raise ValueError(f"data set {name!r} has no {split!r} split on the hub; set data.{split}_path to a JSONL or Parquet file")
    return f"hf://datasets/{spec.hub_id}@{spec.hub_revision}/{spec.files[split]}"


DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def data_files(uri: str) -> list[str]:
    """The files a data path names: itself, or a folder's (recursively) or a glob's JSONL/JSON/
    Parquet files in name order, so parts added later (part-00002.jsonl) append rows."""
    if not any(c in uri for c in "*?[") and not _is_dir(uri):
        return [uri]
    fs, path = storage.fs_path(uri)
    found = storage.with_retries("list", uri, lambda: fs.glob(path) if any(c in uri for c in "*?[") else fs.find(path))
    scheme = "" if storage.is_local(uri) else uri.split("://", 1)[0] + "://"
    files = sorted(scheme + f if scheme and not f.startswith(scheme) else f for f in found
                   if f.lower().endswith(DATA_SUFFIXES) and not f.rsplit("/", 1)[-1].startswith("."))
    if not files:
        raise FileNotFoundError(f"data file not found: no JSONL, JSON or Parquet file under {uri}")
    return files


def content_digests(paths: Mapping[str, str | None]) -> dict[str, str]:
    """label -> "<file> sha256:<prefix>" of every data file each configured path names (a folder's
    or a glob's files each under "<label> <file>"): what a stage that reads them fingerprints, so
    changed data recomputes it. storage.file_sha256 re-reads a file only when its size or mtime
    (ETag on S3) changed. A missing file is "missing" (the stage itself then fails naming it); hub
    sources have no path here: their revision is in the config."""
    out: dict[str, str] = {}
    for label, path in paths.items():
        if not path:
            continue
        try:
            files = data_files(path)
            out.update({label if files == [path] else f"{label} {f}": f"{f} sha256:{storage.file_sha256(f)[:16]}" for f in files})
        except FileNotFoundError:
            out[label] = f"{path} missing"
    return out


def _is_dir(uri: str) -> bool:
    fs, path = storage.fs_path(uri)
    return storage.with_retries("stat", uri, lambda: fs.isdir(path))


def read_rows(uri: str) -> list[dict]:
    """Rows of a JSONL/JSON/Parquet file. A JSONL line that does not parse is kept as an empty
    row, so it is counted as a bad row downstream rather than failing the whole file."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise FileNotFoundError(f"data file not found: {uri}") from None
    name = uri.lower().rsplit("?", 1)[0]
    if name.endswith(".parquet"):
        return pl.read_parquet(io.BytesIO(data)).to_dicts()
    if name.endswith(".json") and data.lstrip().startswith(b"["):
        try:
            return [r if isinstance(r, dict) else {} for r in json.loads(data.decode("utf-8"))]
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"data file {uri} is not a JSON array of rows: {exc}".splitlines()[0]) from None
    rows = []
    for line in data.splitlines():  # decoded per line: one non-UTF-8 line is one bad row, not a bad file
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = {}
        rows.append(row if isinstance(row, dict) else {})
    return rows


def load_split(name: str, spec: DatasetSpec, split: str, path: str | None, limit: int | None, tokenizer,
               max_prompt_tokens: int | None = None) -> tuple[Cleaned, str]:
    """Cleaned records of one split (from `path`, else the hub) and the URI they came from.
    Raises a one-line error when no row is usable."""
    paper = TEMPLATES["math" if spec.template == "math" else "gsm8k"]

    def chat(question: str) -> str:
        return chat_prompt(tokenizer, render_prompt(question, paper))

    uri = path or hub_uri(spec, split, name)
    rows = [row for part in (data_files(path) if path else [uri]) for row in read_rows(part)]
    cleaned = clean_rows(
        rows, split=split, name=name, prompt_field=spec.prompt_field, answer_field=spec.answer_field,
        answer_from=spec.answer_from, template=spec.template, id_field=spec.id_field,
        max_prompt_tokens=max_prompt_tokens, count_tokens=lambda p: len(tokenizer(p, add_special_tokens=False)["input_ids"]),
        chat_template=chat if spec.template == "chat" else None, limit=limit,
    )
    if not cleaned.records:
        reasons = ", ".join(f"{k}: {v}" for k, v in cleaned.skipped.items()) or "the file is empty"
        raise ValueError(f"no usable {split} row in {uri} ({reasons})")
    return cleaned, uri


def load_benchmark(entry: str, tokenizer, limit: int | None = None, template: str = "auto"):
    """Records of a benchmark given as `name` (hub) or `name=path`; the held-out split of it
    (`test`, or the only split an eval set has on the hub)."""
    from apo_core.config import DataConfig

    name, _, path = entry.partition("=")
    spec = spec_for(DataConfig(name=name, template=template))
    split = "test" if "test" in spec.files or path else next(iter(spec.files))
    cleaned, uri = load_split(name, spec, split, path or None, limit, tokenizer)
    return cleaned, uri
