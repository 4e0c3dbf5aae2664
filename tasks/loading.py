"""What a stage loads: its model (from any URI), its generation engine, its prompts."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import torch

from .config import ApoConfig
from apo_core.data import PromptRecord
from apo_core.engines import make_engine, resolve_engine_name
from apo_core.modeling import load_model_and_tokenizer, resolve_model_path

from . import storage
from .stage import StageResult


def quiet_transformers() -> None:
    """Stage logs carry our own progress lines; drop transformers' per-load progress bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_model(cfg: ApoConfig, path: str | None = None):
    """(model, tokenizer) for `path` (default: the configured reference model), any URI."""
    quiet_transformers()
    if cfg.model.num_threads:
        torch.set_num_threads(cfg.model.num_threads)
    path = path or cfg.model.path
    if "://" in path and not path.startswith("file://"):
        path = str(storage.localize_dir(path))
    return load_model_and_tokenizer(path, cfg.model.dtype, cfg.model.device)


def model_files(path: str) -> str:
    """Where the files of model `path` are, for digests: a URI or a local folder as is (built-in
    names resolved), a hub id as its snapshot in the Hugging Face cache (what loading fetches anyway)."""
    resolved = path if "://" in path else resolve_model_path(path)
    if "://" in resolved or Path(resolved).exists():
        return resolved
    from huggingface_hub import snapshot_download

    return snapshot_download(resolved)


# Which engine `auto` takes per stage on CPU: written by bench/engines.py (`--record-choice`)
# from its measurements of apo's own paths on the embedded default, with the run it came from.
ENGINE_CHOICE = Path(__file__).with_name("engine_choice.json")


def recorded_engine(stage: str, device_type: str = "cpu") -> str | None:
    """The engine bench/engines.py measured fastest for `stage` on `device_type`, if recorded."""
    try:
        return json.loads(ENGINE_CHOICE.read_text()).get(device_type, {}).get(stage)
    except (OSError, ValueError):
        return None


def engine_for(cfg: ApoConfig, stage: str, model, tokenizer):
    """The generation engine configured for `stage` (`auto` resolved for the model's device) over `model`."""
    gen = cfg.generation
    name = resolve_engine_name(gen.engine_for_stage(stage), next(model.parameters()).device, recorded_engine(stage))
    if name == "vllm":
        kwargs = dict(max_model_len=gen.max_model_len, gpu_memory_utilization=gen.gpu_memory_utilization,
                      enable_sleep_mode=gen.enable_sleep_mode, cpu_kvcache_gb=gen.cpu_kvcache_gb,
                      max_num_seqs=gen.max_num_seqs)
    else:
        kwargs = dict(batch_size=gen.batch_size, autocast_bf16=gen.autocast_bf16)
    return make_engine(name, model, tokenizer, stop_token_ids=gen.stop_token_ids, **kwargs)


def read_prompts(prep: StageResult, split: str) -> list[PromptRecord]:
    df = storage.read_parquet(prep.outputs["prompts"]).filter(pl.col("split") == split)
    return [PromptRecord(**row) for row in df.iter_rows(named=True)]
