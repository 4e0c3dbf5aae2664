"""DeepSpeed resume (apo_core.checkpoints): every rank's own RNG state, ZeRO shards and optimizer
come back from a checkpoint, so a resumed multi-rank run equals an uninterrupted one."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.test_deepspeed import WORKER, _run, assert_same_weights


def test_a_resumed_zero2_run_equals_an_uninterrupted_one_rank_by_rank(tiny_model_dir, tmp_path, tmp_path_factory, record_fault):
    """Each rank draws its rollouts from its own RNG stream; a new launch (another seed) resuming
    from step 2's checkpoint restores every rank's RNG state, ZeRO shards and optimizer, so step 3
    has the same responses on each rank, the same loss and the same final weights."""
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", str(WORKER), str(tiny_model_dir)]
    whole = tmp_path_factory.mktemp("ds-whole")
    _run([*torchrun, str(whole), "2", "all"], whole)
    _run([*torchrun, str(tmp_path), "2", "first"], tmp_path)
    _run([*torchrun, str(tmp_path), "2", "rest"], tmp_path)
    for rank in (0, 1):
        full = json.loads((whole / f"steps_all_{rank}.json").read_text())
        resumed = json.loads((tmp_path / f"steps_rest_{rank}.json").read_text())
        assert list(resumed) == ["3"]
        assert resumed["3"]["responses"] == full["3"]["responses"], f"rank {rank} drew other rollouts after the resume"
        assert resumed["3"]["loss"] == pytest.approx(full["3"]["loss"], rel=1e-5, abs=1e-7)
    assert_same_weights(load_file(tmp_path / "checkpoints" / "step_000003" / "model" / "model.safetensors"),
                        load_file(whole / "checkpoints" / "step_000003" / "model" / "model.safetensors"))
    record_fault("kill", "DeepSpeed ZeRO-2 on 2 ranks, each drawing its rollouts from its own RNG stream: stopped after step 2, "
                 "resumed by a new launch seeded differently",
                 "every rank restored its RNG state (rng_rank*.pt), ZeRO shards and optimizer from step_000002: step 3 drew the "
                 "same responses on each rank, with the same loss and final weights as the uninterrupted run")
