"""DeepSpeed ZeRO-2 and ZeRO-3 on 2 processes (gloo, CPU) take the same steps as one plain
process: same losses, same final weights within float tolerance."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).parent / "helpers" / "ds_train.py"


def _run(args: list[str], tmp: Path, timeout: int = 600) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1]),
           "MASTER_ADDR": "127.0.0.1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def assert_same_weights(weights: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    """Trained weights equal one process's within float noise. Adam divides each gradient by its
    own running scale, so an element whose gradient is near zero moves by up to lr (1e-3) a step
    on noise alone: the reduction orders of 2 ranks leave such a rare element up to 3e-5 apart
    (4 of 10M on a 2-core AMD EPYC). Every element within 1e-4 (a tenth of one step), and all but
    1 in 10,000 within atol 1e-5, rtol 1e-4."""
    off = total = 0
    for k, v in ref.items():
        assert torch.allclose(weights[k], v, atol=1e-4, rtol=1e-4), k
        off += int((~torch.isclose(weights[k], v, atol=1e-5, rtol=1e-4)).sum())
        total += v.numel()
    assert off <= total * 1e-4, f"{off} of {total} weights differ by more than atol 1e-5, rtol 1e-4"


def _result(out: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    (ckpt,) = sorted((out / "checkpoints").glob("step_*"))
    return json.loads((out / "losses.json").read_text()), load_file(ckpt / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def single_process(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    _run([sys.executable, str(WORKER), str(tiny_model_dir), str(out), "none"], out)
    return _result(out)


@pytest.mark.parametrize("zero", [2, 3])
def test_two_process_zero_matches_one_process(zero, single_process, tiny_model_dir, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    _run([str(torchrun), "--standalone", "--nproc_per_node=2", str(WORKER), str(tiny_model_dir), str(tmp_path), str(zero)], tmp_path)
    losses, weights = _result(tmp_path)
    ref_losses, ref_weights = single_process
    assert len(losses) == len(ref_losses) == 3
    assert losses == pytest.approx(ref_losses, rel=1e-4, abs=1e-6)
    assert weights.keys() == ref_weights.keys()
    start = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(start[k], ref_weights[k]) for k in start)  # training moved the weights
    assert_same_weights(weights, ref_weights)
    assert (tmp_path / "checkpoints" / "step_000003" / "ds").is_dir()  # ZeRO shards for a resume


def test_zero3_scores_a_partitioned_qwen_vocabulary_head_like_one_process(tmp_path):
    """embedded-qwen under ZeRO-3: its 151,936-row tied embedding / output layer is partitioned
    over the ranks, and the chunked log-probabilities (several chunks a row here) gather it per
    chunk, forward and recomputed in the backward; losses and weights equal one process's."""
    torchrun = Path(sys.executable).parent / "torchrun"
    single, ranks = tmp_path / "single", tmp_path / "zero3"
    single.mkdir(), ranks.mkdir()
    _run([sys.executable, str(WORKER), "embedded-qwen", str(single), "none"], single)
    _run([str(torchrun), "--standalone", "--nproc_per_node=2", str(WORKER), "embedded-qwen", str(ranks), "3"], ranks)
    (ref_losses, ref_weights), (losses, weights) = _result(single), _result(ranks)
    assert len(losses) == 3 and losses == pytest.approx(ref_losses, rel=1e-4, abs=1e-6)
    assert weights["model.embed_tokens.weight"].shape == (151_936, 64)  # gathered whole for the save
    assert_same_weights(weights, ref_weights)


def test_zero3_ranks_whose_responses_differ_in_length_decode_and_score_together(tmp_path):
    """Under ZeRO-3 every call of a partitioned module is a collective. A rank whose rows have all
    stopped keeps decoding until every rank's have, and ranks score response blocks of one length
    (here one logits chunk per position), where they used to stop or score alone and crash or
    hang the others. Each rank's greedy answer equals one process's."""
    torchrun = Path(sys.executable).parent / "torchrun"
    single, ranks = tmp_path / "single", tmp_path / "zero3"
    single.mkdir(), ranks.mkdir()
    _run([sys.executable, str(WORKER), "embedded-qwen", str(single), "none", "generate"], single)
    _run([str(torchrun), "--standalone", "--nproc_per_node=2", str(WORKER), "embedded-qwen", str(ranks), "3", "generate"],
         ranks, timeout=300)
    expected = json.loads((single / "answers_0.json").read_text())["answers"]
    short, long = expected.values()
    assert len(long) > len(short)  # rank 0's answer stops before rank 1's
    per_rank = [json.loads((ranks / f"answers_{r}.json").read_text()) for r in (0, 1)]
    assert {**per_rank[0]["answers"], **per_rank[1]["answers"]} == expected
    (n0,), (n1,) = (r["step"]["n_tokens"] for r in per_rank)  # each rank's rollout of its prompt
    assert n0 != n1 and per_rank[0]["step"]["loss"] == per_rank[1]["step"]["loss"]  # the minibatch's, on both


def test_pipeline_trains_on_two_deepspeed_ranks(prefect_api, tiny_model_dir, tmp_path):
    """train.deepspeed in a pipeline run: the stage launches 2 ranks (torchrun), which train and
    checkpoint; the stage publishes the gathered model and logs every step."""
    from mlflow.tracking import MlflowClient

    from flows.apo import apo
    from tests.test_flow import tiny_config

    cfg = tiny_config(tmp_path, tiny_model_dir, **{"run_id": "ds", "train.steps": 2, "train.deepspeed.zero_stage": 3,
                                                  "train.deepspeed.processes": 2})
    summary = apo(config=cfg)
    stage = tmp_path / "ds" / "train_online"
    assert "launching 2 ranks" not in (stage / "ranks.log").read_text()  # the log is the ranks' own
    weights = load_file(stage / "model" / "model.safetensors")
    start = load_file(tiny_model_dir / "model.safetensors")
    assert weights.keys() == start.keys() and all(v.numel() for v in weights.values())  # gathered, not ZeRO-3 shards
    assert any(not torch.equal(start[k], weights[k]) for k in start)
    assert (stage / "checkpoints" / "step_000002" / "ds").is_dir()
    history = MlflowClient(summary["mlflow_tracking_uri"]).get_metric_history(summary["mlflow_stage_runs"]["train_online"], "train/loss")
    assert [m.step for m in history] == [1, 2]


def test_ranks_must_divide_the_minibatch():
    from tasks.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"deepspeed.processes \(3\) must divide minibatch_size \(64\)"):
        load_config(overrides=["train.deepspeed.processes=3"])
