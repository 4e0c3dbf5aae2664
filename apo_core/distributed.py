"""Data-parallel training through DeepSpeed ZeRO: the config, the split of a rollout batch
over ranks, and reading full weights back from sharded parameters.

One entry point serves every launch: `torchrun --nproc_per_node=K` (or the `deepspeed`
launcher) starts K copies of the same program; each rank generates for and trains on its own
rows of every minibatch, and ZeRO averages the gradients, so K ranks take the same optimizer
steps as one process on the whole minibatch.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .config import DeepSpeedSettings, TrainConfig


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a distributed launch."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init(backend: str | None = None) -> None:
    """Join the process group that torchrun / the deepspeed launcher describe in the environment
    (gloo on CPU, nccl on GPUs)."""
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend or ("nccl" if torch.cuda.is_available() else "gloo"))


def ds_config(settings: DeepSpeedSettings, train: TrainConfig, world_size: int) -> dict:
    """DeepSpeed config for one optimizer step per minibatch, the minibatch split over ranks."""
    if train.minibatch_size % world_size:
        raise ValueError(f"train.minibatch_size ({train.minibatch_size}) must be a multiple of the {world_size} processes")
    zero: dict = {"stage": settings.zero_stage}
    if settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if settings.offload_param:
        if settings.zero_stage != 3:
            raise ValueError("train.deepspeed.offload_param needs zero_stage 3")
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_batch_size": train.minibatch_size,
        "train_micro_batch_size_per_gpu": train.minibatch_size // world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": settings.bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def local_rows(rollout_batch_size: int, minibatch_size: int, rank: int, world_size: int) -> list[int]:
    """Rows of a rollout batch that `rank` owns: its equal share of every minibatch, so local
    minibatch k of every rank together is exactly global minibatch k."""
    share = minibatch_size // world_size
    return [k * minibatch_size + rank * share + j for k in range(rollout_batch_size // minibatch_size) for j in range(share)]


@contextlib.contextmanager
def gathered(module: torch.nn.Module):
    """Full parameters of `module` inside the block, also under ZeRO-3 (which shards them)."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def partitioned(module: torch.nn.Module) -> bool:
    """Whether ZeRO-3 partitions `module`'s parameters: then every forward of a submodule is a
    collective (its hooks all-gather, even inside `gathered`), so all ranks must make the same calls."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def all_max(n: int, device: torch.device | str = "cpu") -> int:
    """The largest `n` over all ranks (a collective; `device`: where the backend reduces, CUDA for
    nccl); `n` itself outside a distributed launch."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return n
    t = torch.tensor([n], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def everywhere(flag: bool, device: torch.device | str = "cpu") -> bool:
    """`flag` and-ed over all ranks (a collective); `flag` itself outside a distributed launch."""
    return all_max(int(not flag), device) == 0
