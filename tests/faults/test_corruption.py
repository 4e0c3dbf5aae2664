"""Damaged published files and checkpoints: detected, never trusted, recomputed to the same
result (the manifest checks themselves live in tasks/stage.py and tasks/storage.py).

The cases share one tiny run, in order; each leaves it complete again except the last.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from tests.test_flow import tiny_config

RUN_ID = "damaged"


def run(cfg) -> dict:
    from flows.apo import apo

    return apo(config=cfg)


@pytest.fixture(scope="module")
def complete_run(prefect_api, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("corruption")
    cfg = tiny_config(root, tiny_model_dir, **{"run_id": RUN_ID, "train.steps": 5, "train.checkpoint_every": 2,
                                              "train.keep_checkpoints": 3})
    summary = run(cfg)
    return cfg, root / RUN_ID, summary


def test_truncated_parquet_is_detected_and_recomputed(complete_run, record_fault):
    cfg, folder, first = complete_run
    samples = folder / "sample_reference" / "samples.parquet"
    good = samples.read_bytes()
    samples.write_bytes(good[: len(good) // 2])
    out = run(cfg)
    assert out["stage_status"]["sample_reference"] == "ran"
    assert samples.read_bytes() == good  # recomputed (from its finished shard parts) byte for byte
    assert [out["stage_status"][s] for s in ("aggregate_vstar", "train_online", "evaluate")] == ["skipped"] * 3
    assert out["trained_accuracy"] == first["trained_accuracy"]
    record_fault("corruption", "sample_reference/samples.parquet truncated to half its bytes after the run",
                 "the rerun found it shorter than its manifest, recomputed it byte-identical and reused the stages after it")


def test_manifest_that_does_not_match_its_data_is_detected(complete_run, record_fault):
    cfg, folder, first = complete_run
    results = folder / "evaluate" / "results.parquet"
    good = results.read_bytes()
    marker_path = folder / "evaluate" / "_COMPLETE.json"
    marker = json.loads(marker_path.read_text())
    marker["manifest"]["results.parquet"]["sha256"] = "0" * 64  # same size, other content
    marker_path.write_text(json.dumps(marker))
    out = run(cfg)
    assert out["stage_status"]["evaluate"] == "ran" and out["stage_status"]["train_online"] == "skipped"
    assert pl.read_parquet(results).equals(pl.read_parquet(io_bytes(good)))
    assert out["trained_accuracy"] == first["trained_accuracy"]
    record_fault("corruption", "evaluate's manifest sha256 does not match results.parquet (same size)",
                 "the rerun refused the stage's output, re-evaluated and published equal results")


def io_bytes(data: bytes):
    import io

    return io.BytesIO(data)


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(complete_run, record_fault):
    cfg, folder, first = complete_run
    stage = folder / "train_online"
    weights = load_file(stage / "model" / "model.safetensors")
    table = pl.read_parquet(stage / "samples.parquet")
    newest = stage / "checkpoints" / "step_000005" / "model" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])
    (stage / "_COMPLETE.json").unlink()  # as if the run had died before publishing the stage
    out = run(cfg)
    assert out["stage_status"]["train_online"] == "ran"
    from mlflow.tracking import MlflowClient

    steps = [m.step for m in MlflowClient(out["mlflow_tracking_uri"]).get_metric_history(
        out["mlflow_stage_runs"]["train_online"], "train/loss")]
    assert steps == [5]  # resumed from step_000004, not from the start
    for key, value in weights.items():
        assert torch.allclose(load_file(stage / "model" / "model.safetensors")[key], value, atol=1e-6), key
    assert pl.read_parquet(stage / "samples.parquet").equals(table)
    assert out["trained_accuracy"] == first["trained_accuracy"]
    record_fault("corruption", "newest train_online checkpoint (step 5 of 5) truncated, stage marker gone",
                 "the damaged checkpoint was reported and skipped; training resumed from step_000004 and ended with "
                 "equal weights, sample table and accuracy")



def test_resume_against_an_altered_vstar_table_fails_loudly(complete_run, record_fault):
    """V* values changed under a resumable run (its manifest rewritten to match, so the stage is
    reused): the checkpoint's V* hash catches it; nothing trains against the wrong values."""
    from apo_core.rollouts import TrainPrompt
    from apo_core.checkpoints import vstar_table_hash
    from tasks import storage
    from tasks.stage import RESUME_STATE

    cfg, folder, _ = complete_run
    stage, values = folder / "aggregate_vstar", folder / "aggregate_vstar" / "vstar.parquet"
    marker_path = stage / "_COMPLETE.json"
    saved = values.read_bytes(), marker_path.read_text()
    table = pl.read_parquet(values).with_columns(vstar=pl.col("vstar") + 0.125)
    table.write_parquet(values)
    marker = json.loads(saved[1])
    marker["manifest"] = storage.manifest(str(stage), skip=RESUME_STATE)
    marker_path.write_text(json.dumps(marker))
    train = folder / "train_online"
    (train / "_COMPLETE.json").unlink()  # the run died in stage 2, and is resumed
    newest = sorted((train / "checkpoints").glob("step_*"))[-1]
    trained_against = json.loads((newest / "trainer_state.json").read_text())["vstar_hash"]
    kept = table.filter(pl.col("kept"))
    now = vstar_table_hash([TrainPrompt(p, "", "", v) for p, v in zip(kept["prompt_id"], kept["vstar"])])
    model_before = (train / "model" / "model.safetensors").read_bytes()
    with pytest.raises(Exception) as err:
        run(cfg)
    message = str(err.value)
    assert "\n" not in message and trained_against in message and now in message and str(newest) in message
    assert (train / "model" / "model.safetensors").read_bytes() == model_before
    values.write_bytes(saved[0])  # V* as it was; train_online stays incomplete (a resumable run)
    marker_path.write_text(saved[1])
    record_fault("corruption", "V* values changed under a resumable run (vstar.parquet + 0.125, its manifest rewritten to match)",
                 "the resume stopped before training with one line naming the checkpoint's V* hash, the run's V* hash "
                 "and the checkpoint; the published model was left intact")

def test_no_readable_checkpoint_stops_instead_of_starting_over(complete_run, record_fault):
    cfg, folder, _ = complete_run
    stage = folder / "train_online"
    for ckpt in sorted((stage / "checkpoints").glob("step_*")):
        state = ckpt / "trainer_state.pt"
        state.write_bytes(state.read_bytes()[:100])
    (stage / "_COMPLETE.json").unlink(missing_ok=True)  # already gone after the V* case
    model_before = (stage / "model" / "model.safetensors").read_bytes()
    with pytest.raises(Exception, match=r"no readable checkpoint in .*checkpoints \(step_000005: .*; step_000004: .*\); "
                                         r"delete the folder to train from the start"):
        run(cfg)
    assert (stage / "model" / "model.safetensors").read_bytes() == model_before  # earlier output left as it was
    record_fault("corruption", "every train_online checkpoint's trainer_state.pt truncated",
                 "the stage failed with one line naming each unreadable checkpoint, instead of silently training "
                 "from step 0; the published model was left intact")
