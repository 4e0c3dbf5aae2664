"""Reading raw data set rows from any fsspec path (JSONL, JSON, Parquet) or the HF hub."""

from __future__ import annotations

import io
import json

import polars as pl

from apo_core.data import DatasetSpec

from . import storage


def hub_uri(spec: DatasetSpec, split: str, name: str) -> str:
    """`hf://` URI (huggingface_hub's fsspec file system) of a built-in split."""
    if split not in spec.files:
        raise ValueError(f"data set {name!r} has no {split!r} split on the hub; set data.{split}_path to a JSONL or Parquet file")
    return f"hf://datasets/{spec.hub_id}@{spec.hub_revision}/{spec.files[split]}"


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
    text = data.decode("utf-8")
    if name.endswith(".json") and text.lstrip().startswith("["):
        return [r if isinstance(r, dict) else {} for r in json.loads(text)]
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = {}
        rows.append(row if isinstance(row, dict) else {})
    return rows
