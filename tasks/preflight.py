"""Checks a run passes before any expensive work (model load, generation) starts: the model
folder holds a config, readable weights and a tokenizer that fit together (vocabulary, stop
tokens, a chat template where one is used); data files exist and look whole; the template
renders; the artifact root takes a write. Each failure is one line naming the setting; where apo
falls back instead (no pad token), it says so in one warning line.

The stage-level guard `check_vstar_belongs` lives here too: stage 2 refuses a V* table whose
prompts are not the run's own (another run's aggregate_vstar output).
"""

from __future__ import annotations

import json
import os
import string
import struct
from typing import Iterable

from .config import ApoConfig
from apo_core.data import TEMPLATES, spec_for
from apo_core.engines import stop_ids_of
from apo_core.modeling import EMBEDDED_MODELS

from . import storage

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_MAX_HEADER = 100 * 2**20  # safetensors caps its JSON header at 100 MB


class PreflightError(ValueError):
    """A run that cannot start; the message is one line naming the setting and the problem."""


def _fail(message: str) -> None:
    raise PreflightError("preflight: " + " ".join(message.split()))


def check_template(template: str) -> None:
    """A user template may use `{question}` and nothing else (no other field, no attribute or
    index access: it is applied with str.format)."""
    if template in ("auto", "chat", *TEMPLATES):
        return
    try:
        fields = [(name, conv, spec) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        _fail(f"data.template {template[:80]!r} is not a valid format string ({exc}); write literal braces as {{{{ and }}}}")
    bad = ["{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
           for name, conv, spec in fields if name != "question" or conv or spec]
    if bad:
        _fail(f"data.template {template[:80]!r} may only use {{question}} as is; it also uses {bad[0]}")
    if not fields:
        _fail(f"data.template {template[:80]!r} must contain {{question}}")


def check_safetensors(uri: str) -> None:
    """The file's header parses and its tensors end exactly where the file does (a truncated or
    overwritten file fails here, before any load)."""
    fs, path = storage.fs_path(uri)

    def read_header() -> tuple[int, bytes, int]:
        size = int(fs.size(path))
        with fs.open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return size, b"", -1
            (n,) = struct.unpack("<Q", head)
            return size, f.read(min(n, _MAX_HEADER)), n

    size, header, n = storage.with_retries("read", uri, read_header)
    name = uri.rsplit("/", 1)[-1]
    if n < 0 or n > _MAX_HEADER or 8 + n > size:
        _fail(f"model weights {storage.redact(uri)}: not a safetensors file (header of {n} bytes in a {size}-byte file)")
    try:
        meta = json.loads(header)
        end = max((int(t["data_offsets"][1]) for k, t in meta.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError):
        _fail(f"model weights {storage.redact(uri)}: corrupt safetensors header")
    if 8 + n + end != size:
        _fail(f"model weights {name} at {storage.redact(uri)}: tensors need {8 + n + end} bytes, the file has {size} "
              "(truncated or corrupt); re-copy the model")


def check_model(path: str, setting: str = "model.path") -> None:
    """`path` is a built-in model, a hub id, or a folder (local or fsspec) with config.json,
    weights and a tokenizer."""
    if path in EMBEDDED_MODELS:
        return
    local = storage.is_local(path)
    if local and not os.path.exists(storage.local_path(path)):
        if path.count("/") == 1 and not path.startswith((".", "/", "~")):
            return  # a hub id (owner/name): resolved by transformers at load
        _fail(f"{setting} {path!r}: no such folder, and not a hub id (owner/name)")
    if local and not os.path.isdir(storage.local_path(path)):
        _fail(f"{setting} {path!r} is a file; give the model's folder (config.json, weights, tokenizer)")
    if not local and not storage.exists(path):
        _fail(f"{setting} {storage.redact(path)}: no such folder")
    names = {uri.rstrip("/").rsplit("/", 1)[-1]: uri for uri in storage.listing(path)}
    if "config.json" not in names:
        _fail(f"{setting} {storage.redact(path)}: no config.json (not a saved model folder)")
    weights = [n for n in names if n.endswith(WEIGHT_SUFFIXES) and not n.startswith("training_args")]
    if not weights:
        _fail(f"{setting} {storage.redact(path)}: no weights (*.safetensors or pytorch_model*.bin)")
    if not any(n in names for n in TOKENIZER_FILES):
        _fail(f"{setting} {storage.redact(path)}: no tokenizer (tokenizer.json / tokenizer_config.json)")
    index = names.get("model.safetensors.index.json")
    if index:
        shards = sorted(set(storage.read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if s not in names]
        if missing:
            _fail(f"{setting} {storage.redact(path)}: weight shard {missing[0]} listed in model.safetensors.index.json is missing")
    for name in sorted(weights):
        if name.endswith(".safetensors"):
            check_safetensors(names[name])


def check_model_tokens(cfg: ApoConfig) -> None:
    """The tokenizer, the model's vocabulary, the stop tokens and the template fit together.
    Fatal: a chat template missing where `data.template` is `chat`, a stop token outside the
    vocabulary, a vocabulary smaller than the tokenizer. A warning where apo falls back (no pad
    token: it pads with eos). Local folders and built-in models: the tokenizer is loaded (no
    weights); fsspec folders: what their JSON files say."""
    path = cfg.model.path
    if not storage.is_local(path) or path in EMBEDDED_MODELS or os.path.isdir(storage.local_path(path)):
        from apo_core.modeling import resolve_model_path

        folder = resolve_model_path(path) if path in EMBEDDED_MODELS else path
    else:
        return  # a hub id: resolved by transformers at load
    names = {uri.rstrip("/").rsplit("/", 1)[-1]: uri for uri in storage.listing(folder)}
    config = storage.read_json(names["config.json"]) if "config.json" in names else {}
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    generation = storage.read_json(names["generation_config.json"]) if "generation_config.json" in names else {}
    tok_config = storage.read_json(names["tokenizer_config.json"]) if "tokenizer_config.json" in names else {}
    has_chat = bool(tok_config.get("chat_template")) or "chat_template.jinja" in names or "chat_template.json" in names
    tokenizer = None
    if storage.is_local(folder):
        from apo_core.modeling import load_tokenizer

        try:
            tokenizer = load_tokenizer(storage.local_path(folder) if path not in EMBEDDED_MODELS else path, pad_fallback=False)
        except Exception as exc:  # noqa: BLE001 - any loader failure is this one refusal
            _fail(f"model.path {storage.redact(path)}: its tokenizer does not load ({type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:200] if str(exc) else ''})")
        has_chat = has_chat or bool(getattr(tokenizer, "chat_template", None))
    if cfg.data.template == "chat" and not has_chat:
        _fail(f"data.template is chat, but the tokenizer of model.path {storage.redact(path)} has no chat template "
              "(tokenizer_config.json chat_template or chat_template.jinja); use data.template=auto or a {question} string")
    if tokenizer is not None and vocab and len(tokenizer) > int(vocab):
        _fail(f"model.path {storage.redact(path)}: the tokenizer has {len(tokenizer):,} tokens but the model's vocabulary "
              f"only {int(vocab):,} rows (config.json vocab_size): ids past {int(vocab) - 1} would index out of range")
    configured = cfg.generation.stop_token_ids
    stops = stop_ids_of(generation.get("eos_token_id"), getattr(tokenizer, "eos_token_id", None), configured)
    setting = "generation.stop_token_ids" if configured else f"the eos token of model.path {storage.redact(path)}"
    limit = int(vocab) if vocab else len(tokenizer) if tokenizer is not None else None  # ids the model can emit
    outside = [t for t in stops if limit is not None and not 0 <= t < limit]
    if outside:
        _fail(f"{setting}: stop token {outside[0]} is outside the vocabulary (ids 0-{limit - 1}), so no response "
              "could end on it")
    if not stops:
        _fail(f"model.path {storage.redact(path)}: no stop token (no eos in generation_config.json or the tokenizer); "
              "set generation.stop_token_ids")
    if tokenizer is not None and tokenizer.pad_token_id is None:
        print(f"[preflight] WARNING: the tokenizer of model.path {storage.redact(path)} has no pad token; apo pads "
              f"with its eos token {tokenizer.eos_token!r} (padding is masked, so scores do not change)", flush=True)


def check_data_file(uri: str, setting: str) -> None:
    """The file, or every part of a folder or glob of parts, exists and, when Parquet, is whole
    (PAR1 at both ends); a folder or glob names at least one part."""
    from .datasets import data_files

    if not any(c in uri for c in "*?[") and not storage.exists(uri):
        _fail(f"{setting} {storage.redact(uri)}: no such file")
    try:
        parts = data_files(uri)
    except FileNotFoundError:
        _fail(f"{setting} {storage.redact(uri)}: a folder or glob that holds no JSONL, JSON or Parquet file")
    for part in parts:
        if part.lower().rsplit("?", 1)[0].endswith(".parquet"):
            check_parquet_ends(part, setting)


def check_parquet_ends(uri: str, setting: str) -> None:
    fs, path = storage.fs_path(uri)

    def ends() -> tuple[int, bytes, bytes]:
        size = int(fs.size(path))
        with fs.open(path, "rb") as f:
            head = f.read(4)
            f.seek(max(0, size - 4))
            return size, head, f.read(4)

    size, head, tail = storage.with_retries("read", uri, ends)
    if size < 12 or head != b"PAR1" or tail != b"PAR1":
        _fail(f"{setting} {storage.redact(uri)}: not a whole Parquet file ({size} bytes; truncated?)")


def check_data(cfg: ApoConfig) -> None:
    data = cfg.data
    check_template(data.template)
    if data.name == "embedded":
        return
    from .datasets import hub_uri

    spec = spec_for(data)
    for split, path in (("train", data.train_path), ("test", data.test_path)):
        if path:
            check_data_file(path, f"data.{split}_path")
            continue
        try:
            hub_uri(spec, split, data.name)
        except ValueError as exc:
            _fail(str(exc))
        if data.name == "custom":
            _fail(f"data.{split}_path is required for data.name=custom")
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            _fail(f"data.{split}_path is unset, so {data.name}'s {split} split would come from the hub, "
                  f"but HF_HUB_OFFLINE is set; point data.{split}_path at a local copy")
    for entry in cfg.eval.benchmarks:
        name, _, path = entry.partition("=")
        if path:
            check_data_file(path, f"eval.benchmarks[{name}]")


def check_artifact_root(run_uri: str) -> None:
    """A small write (and its removal) under the run's folder succeeds."""
    probe = storage.join(run_uri, ".preflight")
    try:
        storage.write_bytes(probe, b"ok")
        storage.remove(probe)
    except OSError as exc:
        _fail(f"artifact_root: cannot write under {storage.redact(run_uri)}: {type(exc).__name__}: {exc}")


def estimated_need(cfg: ApoConfig) -> tuple[int, str] | None:
    """(bytes, how) a run may write under its artifact root, from the model's weight files: the
    checkpoints on disk at once (keep_checkpoints, plus one being written), each the weights and
    two optimizer moments (~3x), and the trained model twice (the stage's copy, MLflow's logged
    model). None when the weights' size is not known here (a built-in model, a hub id)."""
    path = cfg.model.path
    if path in EMBEDDED_MODELS or not storage.is_local(path) or not os.path.isdir(storage.local_path(path)):
        return None
    weights = sum(f.stat().st_size for f in storage.local_path(path).iterdir() if f.name.endswith(WEIGHT_SUFFIXES))
    copies = 3 * (cfg.train.keep_checkpoints + 1) + 2
    return weights * copies, f"{cfg.train.keep_checkpoints + 1} checkpoints of ~3x the {weights / 2**30:.2f} GiB of weights, the trained model twice"


def check_free_space(cfg: ApoConfig, run_uri: str) -> None:
    """Warn (not fail: the estimate is rough) when a local artifact root has less free space than
    the run may need; a disk that fills later stops the run in one line and it resumes."""
    if not storage.is_local(run_uri):
        return
    need, free = estimated_need(cfg), storage.free_bytes(run_uri)
    if need is not None and free is not None and free < need[0]:
        print(f"[preflight] WARNING: {storage.redact(run_uri)} has {free / 2**30:.2f} GiB free; this run may write "
              f"~{need[0] / 2**30:.2f} GiB ({need[1]}). Free space, lower train.keep_checkpoints, or use another artifact_root.")


def preflight(cfg: ApoConfig, run_uri: str) -> None:
    """Every cheap check of a run, in order; the first failure raises PreflightError (one line)."""
    check_data(cfg)
    check_model(cfg.model.path)
    check_model_tokens(cfg)
    check_artifact_root(run_uri)
    check_free_space(cfg, run_uri)


def check_vstar_belongs(vstar_ids: Iterable[str], prompt_ids: Iterable[str], vstar_uri: str) -> None:
    """Stage 2 trains against V* values of exactly the run's training prompts: a table with other
    prompts (another run's aggregate_vstar output) is refused, never half-used."""
    have, want = set(vstar_ids), set(prompt_ids)
    if have == want:
        return
    foreign, missing = sorted(have - want), sorted(want - have)
    detail = []
    if foreign:
        detail.append(f"{len(foreign)} of its {len(have)} prompt ids are not this run's (e.g. {foreign[0]!r})")
    if missing:
        detail.append(f"{len(missing)} of the run's {len(want)} training prompts have no V* (e.g. {missing[0]!r})")
    raise PreflightError(f"train_online: the V* table {storage.redact(vstar_uri)} does not belong to this run: "
                         f"{'; '.join(detail)} (another run's aggregate_vstar output?)")
