"""Checkpoints of stage 2: what a resumed run needs to continue exactly where it stopped.

A checkpoint folder `step_NNNNNN/` holds the model (and tokenizer), the optimizer state (under
DeepSpeed: every rank's shards in ds/), the step, every RNG state per rank (torch CPU and CUDA,
numpy, python `random`) for the draws that are not seeded per step, the data position, and the
hash of the V* table it trained against: resuming against other V* values fails instead of
training. Folders are written under a temporary name and renamed, so a kill mid-write never
leaves one that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from .distributed import gathered
from .modeling import is_peft
from .rollouts import TrainPrompt

if TYPE_CHECKING:
    from .trainer import OnlineTrainer

STATE_FILE = "trainer_state.pt"


class CheckpointMismatch(ValueError):
    """A checkpoint that must not be resumed here (it trained against another V* table)."""


def vstar_table_hash(prompts: Sequence[TrainPrompt]) -> str:
    """sha256 of the V* table a run trains against: its (prompt_id, vstar) pairs, i.e. the rows of
    vstar.parquet that stage 2 keeps, one `prompt_id<TAB>float.hex(vstar)` line each, sorted by
    prompt_id. Exact (hex floats), independent of row order and of Parquet's encoding.

    >>> a, b = TrainPrompt("a", "", "", 1.0), TrainPrompt("b", "", "", 0.5)
    >>> vstar_table_hash([a, b]) == vstar_table_hash([b, a]) != vstar_table_hash([a, TrainPrompt("b", "", "", 0.25)])
    True
    """
    lines = sorted(f"{p.prompt_id}\t{float(p.vstar).hex()}" for p in prompts)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def rng_state() -> dict:
    """Every global RNG this process draws from, in a form torch.load(weights_only=True) reads."""
    py = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() captured (CUDA only where this process has the same devices)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(trainer: OnlineTrainer, checkpoint_dir: Path, before_publish: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint_dir/step_NNNNNN/ (model, tokenizer, optimizer, step), then prune old ones.
    Under DeepSpeed, ds/ holds every rank's shards and rank 0 writes the rest.

    The folder is written under a temporary name and renamed, so a kill mid-write never
    leaves a checkpoint that looks complete; `before_publish` may add files to it first.
    """
    checkpoint_dir = Path(checkpoint_dir)
    final = checkpoint_dir / f"step_{trainer.step:06d}"
    tmp = checkpoint_dir / f".tmp_step_{trainer.step:06d}"
    lead = trainer.rank == 0
    if lead:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    trainer.barrier()
    try:
        _write(trainer, tmp, final, lead, before_publish)
    except BaseException:
        if lead:  # a failed write (a full disk most often) leaves no partial folder taking space
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if lead:
        for old in list_checkpoints(checkpoint_dir)[: -trainer.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    trainer.barrier()
    trainer.last_checkpoint = final
    return final


def _write(trainer: OnlineTrainer, tmp: Path, final: Path, lead: bool, before_publish: Callable[[Path], None] | None) -> None:
    """Every file of one checkpoint into `tmp`, then the rename to `final`."""
    position = trainer.data_position(trainer.n_prompts) if trainer.n_prompts else None
    state: dict = {"step": trainer.step, "vstar_hash": trainer.vstar_hash, "data_position": position,
                   "train_seconds": trainer.train_seconds, "last_step_seconds": trainer.last_step_seconds}
    # each rank's own RNG streams (under DeepSpeed the ranks draw different numbers)
    torch.save(rng_state(), tmp / f"rng_rank{trainer.rank:03d}.pt")
    if trainer.ds is not None:  # every rank writes its own optimizer / parameter shards
        trainer.ds.save_checkpoint(str(tmp / "ds"), tag="state")
    else:
        state["optimizer"] = trainer.optimizer.state_dict()
    with gathered(trainer.policy):  # whole weights also under ZeRO-3 (collective)
        if lead:
            trainer.policy.save_pretrained(tmp / "model")
    if lead:
        trainer.tokenizer.save_pretrained(tmp / "model")
        torch.save(state, tmp / STATE_FILE)
        (tmp / "trainer_state.json").write_text(json.dumps({
            "step": trainer.step, "train_seconds": round(trainer.train_seconds, 3), "data_position": position,
            "world_size": trainer.world_size,
            "vstar_hash": trainer.vstar_hash, "vstar_hash_of": "sorted (prompt_id, vstar) pairs of the training prompts",
            "train_config": trainer.cfg.model_dump(mode="json")}, indent=2))
        if before_publish:
            before_publish(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)


def load(trainer: OnlineTrainer, path: Path, vstar_hash: str | None = None) -> None:
    """Restore model, optimizer (and DeepSpeed's scheduler/shards), step, RNG states and data
    position from `path`. With `vstar_hash`, a checkpoint trained against another V* table
    raises CheckpointMismatch before anything is loaded; train() checks it again against the
    prompts it is given."""
    from safetensors.torch import load_file

    path = Path(path)
    # Every file is read before anything is restored: an unreadable checkpoint changes nothing.
    blob = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    rng_file = path / f"rng_rank{trainer.rank:03d}.pt"
    rng = torch.load(rng_file, weights_only=True) if rng_file.exists() else None  # absent before RNG states were saved
    resumed = {"path": str(path), "vstar_hash": blob.get("vstar_hash"), "data_position": blob.get("data_position")}
    if vstar_hash is not None:
        check_resume(resumed, vstar_hash, None)
    if trainer.ds is not None:  # model, optimizer and scheduler shards of every rank
        trainer.ds.load_checkpoint(str(path / "ds"), tag="state")
    else:
        state = {}
        for shard in sorted((path / "model").glob("*.safetensors")):
            state.update(load_file(shard))
        optimizer = blob["optimizer"]
        if is_peft(trainer.policy):  # the checkpoint holds the adapter only; base weights never change
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(trainer.policy, state)
            missing, unexpected = [m for m in result.missing_keys if "lora_" in m], result.unexpected_keys
        else:
            missing, unexpected = trainer.policy.load_state_dict(state, strict=False)
        # Tied embeddings are saved once; anything else missing is a real mismatch.
        missing = [m for m in missing if not m.endswith("lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        trainer.optimizer.load_state_dict(optimizer)  # load_state_dict moves the states to the parameters' device
    if rng is not None:
        set_rng_state(rng)
    trainer.step = int(blob["step"])
    trainer.train_seconds = float(blob.get("train_seconds", 0.0))  # absent in checkpoints older than time_budget_s
    trainer.last_step_seconds = float(blob.get("last_step_seconds", 0.0))
    trainer.resumed_from = resumed
    trainer.last_checkpoint = path


def check_resume(resumed: dict, vstar_hash: str, n_prompts: int | None) -> None:
    """Refuse (CheckpointMismatch) a checkpoint trained against another V* table or prompt count."""
    saved = resumed.get("vstar_hash")
    if saved is not None and saved != vstar_hash:
        raise CheckpointMismatch(
            f"train_online: checkpoint {resumed['path']} trained against V* table {saved}, but this run's V* table is "
            f"{vstar_hash}; refusing to resume (use a new run id, or delete the checkpoints to start over)")
    position = resumed.get("data_position")
    if n_prompts is not None and position and position["prompts"] != n_prompts:
        raise CheckpointMismatch(
            f"train_online: checkpoint {resumed['path']} was trained on {position['prompts']} prompts, this run has "
            f"{n_prompts}; refusing to resume")


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.exists():
        return []
    return sorted(p for p in checkpoint_dir.glob("step_*") if (p / STATE_FILE).exists())
