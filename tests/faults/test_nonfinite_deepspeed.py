"""Non-finite losses under DeepSpeed ZeRO (2 gloo ranks on CPU) are skipped and counted like the
plain path (train/nonfinite_skipped), with every rank agreeing even when only one rank saw NaN."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).parent / "helpers" / "ds_nonfinite.py"


def _run(args: list[str], out: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, cwd=out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (ckpt,) = sorted((out / "checkpoints").glob("step_*"))
    return json.loads((out / "history.json").read_text()), load_file(ckpt / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def plain(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    return _run([sys.executable, str(WORKER), str(tiny_model_dir), str(out), "none"], out)


@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_skips_and_counts_nonfinite_updates_like_the_plain_path(zero, plain, tiny_model_dir, tmp_path, record_fault):
    torchrun = Path(sys.executable).parent / "torchrun"
    history, weights = _run([str(torchrun), "--standalone", "--nproc_per_node=2", str(WORKER), str(tiny_model_dir),
                             str(tmp_path), str(zero)], tmp_path)
    plain_history, plain_weights = plain
    skipped = [m["train/nonfinite_skipped"] for m in history]
    assert [m["train/nonfinite_skipped"] for m in plain_history] == [0.0, 2.0, 0.0]  # both updates of step 2
    assert skipped == [0.0, 2.0, 0.0]  # rank 0's rows were finite, yet it skipped with rank 1
    assert "train/loss" not in history[1] and "train/loss" not in plain_history[1]  # no update, no loss to report
    for ours, theirs in zip(history[::2], plain_history[::2]):
        for key in ("train/loss", "train/kl"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key
    for key, value in plain_weights.items():
        assert torch.isfinite(weights[key]).all(), key
        assert torch.allclose(weights[key], value, atol=1e-5, rtol=1e-4), key
    record_fault("bad-input", f"NaN rewards on one of 2 DeepSpeed ZeRO-{zero} ranks in rollout step 2",
                 f"both ranks skipped both updates of the step (train/nonfinite_skipped {skipped}); losses and final "
                 "weights equal to the plain process skipping the same rows")
