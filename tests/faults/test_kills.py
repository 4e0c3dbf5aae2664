"""SIGKILL of a real `apo run` process at fail points spread over every stage (tasks/faults.py),
then a resume of the same run id: it must reuse what was complete, redo only the rest, and end
with the same tables, accuracies and final weights as one uninterrupted run.

The uninterrupted run happens once per module; every kill runs in its own artifact root.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from tasks.config import load_config
from tasks.stage import STAGES

REPO = Path(__file__).resolve().parents[2]
RUN_ID = "killed"
# The shipped model (rewards and accuracies are not all zero), 3 stage-1 shards of 10 prompts,
# checkpoints at steps 2 and 4 of 5; one thread so every process computes bit for bit the same.
SIZES = {
    "model.path": "embedded", "model.num_threads": 1, "data.train_size": 24, "data.test_size": 16,
    "reference.n_samples": 2, "reference.shard_size": 10, "reference.max_new_tokens": 40,
    "train.max_new_tokens": 40, "eval.max_new_tokens": 40, "train.steps": 5, "train.rollout_batch_size": 8,
    "train.minibatch_size": 4, "train.lr": 1e-3, "train.checkpoint_every": 2, "generation.batch_size": 64,
}
TABLES = {
    "preprocess": "prompts.parquet",
    "sample_reference": "samples.parquet",
    "aggregate_vstar": "vstar.parquet",
    "train_online": "samples.parquet",
    "evaluate": "results.parquet",
}


def overrides(root: Path) -> dict:
    return {"run_id": RUN_ID, "artifact_root": str(root), **SIZES}


def run_in_process(root: Path) -> dict:
    """The flow in this process (under the session's Prefect API), torch threads restored after."""
    from flows.apo import apo

    threads = torch.get_num_threads()
    try:
        return apo(config=load_config(overrides=[f"{k}={v}" for k, v in overrides(root).items()]))
    finally:
        torch.set_num_threads(threads)


def apo_command(root: Path, **env: str) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of `apo run` on the module's sizes under the session's Prefect API."""
    from prefect.settings import PREFECT_API_URL

    environ = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env}
    args = [str(Path(sys.executable).parent / "apo"), "run"]
    for key, value in overrides(root).items():
        args += ["--set", f"{key}={value}"]
    return args, environ


def run_killed(root: Path, point: str) -> str:
    """`apo run` in its own process with one fail point armed; it must die of SIGKILL there,
    holding the run's lease (a resume right after must take it over at once)."""
    args, env = apo_command(root, APO_FAILPOINTS=point)
    done = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == -signal.SIGKILL, f"exit {done.returncode}, not SIGKILL:\n{log[-3000:]}"
    assert f"fail point {point.split(':')[0]}" in log, log[-3000:]
    assert lease_files(root) == [(1, False)], "the killed process should have left its lease held"
    return log


def lease_files(root: Path) -> list[tuple[int, bool]]:
    """(number, released) of each lease file of the run."""
    return [(int(p.stem), json.loads(p.read_text())["released"]) for p in sorted((root / RUN_ID / "_lease").glob("*.json"))]


@pytest.fixture(scope="module")
def uninterrupted(prefect_api, tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    summary = run_in_process(root)
    assert summary["stages_recomputed"] == list(STAGES)
    return root / RUN_ID, summary


def assert_same_results(run: Path, summary: dict, uninterrupted, leases=((2, True),)) -> None:
    """Equal to the uninterrupted run; `leases`: the run's lease files at the end (by default: the
    resume took over the killed holder's lease 1 as lease 2, then released it)."""
    base, base_summary = uninterrupted
    assert lease_files(run.parent) == list(leases)
    assert (summary["reference_accuracy"], summary["trained_accuracy"]) == (
        base_summary["reference_accuracy"], base_summary["trained_accuracy"])
    for stage, name in TABLES.items():
        ours, theirs = pl.read_parquet(run / stage / name), pl.read_parquet(base / stage / name)
        assert ours.equals(theirs), f"{stage}/{name} differs from the uninterrupted run"
    ours, theirs = (pl.read_parquet(p / "train_online" / "metrics.parquet") for p in (run, base))
    steady = [c for c in theirs.columns if not c.startswith("time/")]
    assert ours["step"].to_list() == list(range(1, SIZES["train.steps"] + 1))
    for column in steady:
        assert ours[column].to_list() == pytest.approx(theirs[column].to_list(), rel=1e-5, abs=1e-7), column
    ours, theirs = (load_file(p / "train_online" / "model" / "model.safetensors") for p in (run, base))
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.allclose(ours[key], value, atol=1e-6, rtol=1e-5), key


def trained_steps(summary: dict) -> list[int]:
    """Rollout steps the resumed train_online stage logged to MLflow (the steps it trained)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary["mlflow_tracking_uri"])
    return [m.step for m in client.get_metric_history(summary["mlflow_stage_runs"]["train_online"], "train/loss")]


def statuses(summary: dict) -> str:
    ran = [s for s in STAGES if summary["stage_status"][s] == "ran"]
    skipped = [s for s in STAGES if summary["stage_status"][s] == "skipped"]
    return (f"the resume right after took over the killed holder's lease at once; "
            f"reused {', '.join(skipped) or 'nothing'}; recomputed {', '.join(ran) or 'nothing'}")


def expect(summary: dict, skipped: int) -> None:
    """The first `skipped` stages were complete before the kill: reused, not recomputed."""
    assert [summary["stage_status"][s] for s in STAGES] == ["skipped"] * skipped + ["ran"] * (len(STAGES) - skipped)


SAME = "tables, accuracies and final weights equal to the uninterrupted run"


def test_kill_in_preprocess_before_its_marker(uninterrupted, tmp_path, record_fault):
    run_killed(tmp_path, "preprocess.before_marker")
    stage = tmp_path / RUN_ID / "preprocess"
    assert (stage / "prompts.parquet").exists() and not (stage / "_COMPLETE.json").exists()
    summary = run_in_process(tmp_path)
    expect(summary, 0)
    assert_same_results(tmp_path / RUN_ID, summary, uninterrupted)
    record_fault("kill", "SIGKILL in preprocess: prompts.parquet written, stage marker not yet",
                 f"the unmarked output was not trusted: {statuses(summary)}; {SAME}")


def store_entries(root: Path) -> list[Path]:
    """Manifests of the run's reference-sample store (the artifact root's `_reference`), oldest first."""
    return sorted(root.glob("_reference/v1/*/manifests/*.json"), key=lambda m: json.loads(m.read_text())["published"])


def test_kill_mid_shard_in_sample_reference(uninterrupted, tmp_path, record_fault):
    run_killed(tmp_path, "sample_reference.mid_shard:2")
    assert len(store_entries(tmp_path)) == 1  # shard 2 was drawn but never published; no partial entry
    summary = run_in_process(tmp_path)
    expect(summary, 1)
    assert summary["metrics"]["reference/reused"] == 10 * 2 and summary["metrics"]["reference/sampled"] == 14 * 2
    assert summary["metrics"]["reference/shards"] == 2.0
    assert_same_results(tmp_path / RUN_ID, summary, uninterrupted)
    record_fault("kill", "SIGKILL in sample_reference mid-shard 2 of 3 (samples drawn and scored, not published)",
                 f"resume took shard 1 from the store and redid shards 2-3; {statuses(summary)}; {SAME}")


def test_kill_between_shards_in_sample_reference(uninterrupted, tmp_path, record_fault):
    run_killed(tmp_path, "sample_reference.after_shard:2")
    entries = store_entries(tmp_path)
    assert len(entries) == 2
    mtimes = [m.stat().st_mtime_ns for m in entries]
    summary = run_in_process(tmp_path)
    expect(summary, 1)
    assert summary["metrics"]["reference/reused"] == 20 * 2 and summary["metrics"]["reference/sampled"] == 4 * 2
    assert [m.stat().st_mtime_ns for m in entries] == mtimes  # published shards not rewritten
    assert_same_results(tmp_path / RUN_ID, summary, uninterrupted)
    record_fault("kill", "SIGKILL in sample_reference between shards 2 and 3",
                 f"resume took shards 1-2 from the store untouched and sampled shard 3 only; {statuses(summary)}; {SAME}")


def test_kill_during_a_store_write(uninterrupted, tmp_path, record_fault):
    run_killed(tmp_path, "reference_store.before_manifest:2")
    entries = store_entries(tmp_path)
    model = entries[0].parent.parent
    named = {json.loads(m.read_text())[f]["path"] for m in entries for f in ("samples", "index")}
    written = {str(f.relative_to(model)) for f in [*model.glob("samples/*.parquet"), *model.glob("index/*.parquet")]}
    assert len(entries) == 1 and len(written - named) == 2  # shard 2's two files, which no manifest names
    summary = run_in_process(tmp_path)
    expect(summary, 1)
    assert summary["metrics"]["reference/sampled"] == 14 * 2
    assert len(store_entries(tmp_path)) == 3
    assert_same_results(tmp_path / RUN_ID, summary, uninterrupted)
    record_fault("kill", "SIGKILL in a reference-store write: both files of shard 2 written, its manifest not",
                 f"no entry was published half: the rerun sampled shards 2-3 again; {statuses(summary)}; {SAME}")


def test_kill_in_aggregate_vstar_before_its_marker(uninterrupted, tmp_path, record_fault):
    run_killed(tmp_path, "aggregate_vstar.before_marker")
    assert not (tmp_path / RUN_ID / "aggregate_vstar" / "_COMPLETE.json").exists()
    summary = run_in_process(tmp_path)
    expect(summary, 2)
    assert_same_results(tmp_path / RUN_ID, summary, uninterrupted)
    record_fault("kill", "SIGKILL in aggregate_vstar: vstar.parquet written, stage marker not yet",
                 f"{statuses(summary)}; {SAME}")


def checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "train_online" / "checkpoints").iterdir())


def test_kill_in_train_online_between_checkpoints(uninterrupted, tmp_path, record_fault):
    run_killed(tmp_path, "train_online.after_step:3")  # step 3 trained; checkpoints at 2 and 4
    assert checkpoints(tmp_path / RUN_ID) == ["step_000002"]
    summary = run_in_process(tmp_path)
    expect(summary, 3)
    assert trained_steps(summary) == [3, 4, 5]  # step 3's lost update redone from the step-2 checkpoint
    assert_same_results(tmp_path / RUN_ID, summary, uninterrupted)
    record_fault("kill", "SIGKILL in train_online after rollout step 3, between the checkpoints of steps 2 and 4",
                 f"resumed from step_000002 (model, optimizer, RNG states, data position, V* hash) and trained steps 3-5; "
                 f"{statuses(summary)}; {SAME}")


def test_kill_right_after_a_checkpoint_write(uninterrupted, tmp_path, record_fault):
    run_killed(tmp_path, "train_online.after_checkpoint:2")  # the step-4 checkpoint just published
    assert checkpoints(tmp_path / RUN_ID) == ["step_000002", "step_000004"]
    summary = run_in_process(tmp_path)
    expect(summary, 3)
    assert trained_steps(summary) == [5]
    assert_same_results(tmp_path / RUN_ID, summary, uninterrupted)
    record_fault("kill", "SIGKILL in train_online right after the step-4 checkpoint was published",
                 f"resumed from step_000004 and trained step 5 only; {statuses(summary)}; {SAME}")


def test_kill_while_a_checkpoint_is_being_written(uninterrupted, tmp_path, record_fault):
    run_killed(tmp_path, "train_online.checkpoint_unpublished:2")  # step 4's checkpoint under its temporary name
    assert checkpoints(tmp_path / RUN_ID) == [".tmp_step_000004", "step_000002"]
    summary = run_in_process(tmp_path)
    expect(summary, 3)
    assert trained_steps(summary) == [3, 4, 5]  # the half-written checkpoint was never taken for a complete one
    assert checkpoints(tmp_path / RUN_ID) == ["step_000004", "step_000005"]
    assert_same_results(tmp_path / RUN_ID, summary, uninterrupted)
    record_fault("kill", "SIGKILL in train_online while the step-4 checkpoint was being written (not yet renamed)",
                 f"the partial checkpoint was ignored and replaced; resumed from step_000002, trained steps 3-5; "
                 f"{statuses(summary)}; {SAME}")


def test_kill_between_train_online_and_evaluate(uninterrupted, tmp_path, record_fault):
    run_killed(tmp_path, "train_online.after_marker")
    assert not (tmp_path / RUN_ID / "evaluate").exists()
    summary = run_in_process(tmp_path)
    expect(summary, 4)
    assert_same_results(tmp_path / RUN_ID, summary, uninterrupted)
    record_fault("kill", "SIGKILL between stages: train_online's marker written, evaluate not started",
                 f"{statuses(summary)}; {SAME}")


def test_kill_during_evaluate(uninterrupted, tmp_path, record_fault):
    log = run_killed(tmp_path, "evaluate.after_model:1")  # the reference evaluated, the trained model not yet
    assert "reference on heldout" in log and "trained on heldout" not in log
    summary = run_in_process(tmp_path)
    expect(summary, 4)
    assert_same_results(tmp_path / RUN_ID, summary, uninterrupted)
    record_fault("kill", "SIGKILL during evaluate, after the reference model and before the trained one",
                 f"{statuses(summary)}; {SAME}")



def test_a_second_process_for_the_run_id_stops_before_any_stage(uninterrupted, tmp_path, record_fault):
    args, env = apo_command(tmp_path)
    first = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not lease_files(tmp_path) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lease_files(tmp_path) == [(1, False)], "the first process did not take the lease"
        second = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        out, _ = first.communicate(timeout=300)
    finally:
        first.kill()
    log = second.stdout + second.stderr
    assert second.returncode == 3, log[-3000:]
    said = [line for line in log.splitlines() if line.startswith("apo: ")]
    assert len(said) == 1 and said[0].startswith(f"apo: run {RUN_ID} is being written by pid {first.pid} on host "), log[-3000:]
    last = said[0]
    assert "started ->" not in log and "Traceback" not in log and "Flow run" not in log, log[-3000:]  # no flow run, no stage
    assert first.returncode == 0, out[-3000:]
    summary = json.loads((tmp_path / RUN_ID / "summary.json").read_text())
    assert summary["stages_recomputed"] == list(STAGES)
    assert_same_results(tmp_path / RUN_ID, summary, uninterrupted, leases=[(1, True)])
    record_fault("concurrency", "two `apo run --run-id same` processes, the second started while the first ran",
                 f"the second exited 3 before any stage with one line ({last.split(' since ')[0].replace(str(first.pid), '<pid>')}, "
                 f"since ...); the first finished alone: {SAME}")


def run_terminated(root: Path, point: str, *extra: str) -> str:
    """`apo run` with a SIGTERM sent at a fail point (an eviction); it must stop by itself."""
    args, env = apo_command(root, APO_FAILPOINTS=point)
    for item in extra:
        args += ["--set", item]
    done = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 1, f"exit {done.returncode}:\n{log[-3000:]}"  # stopped, resumable
    return log


def run_states(root: Path) -> dict:
    """MLflow status and failure reason of the pipeline run and of each stage run, and the Prefect
    flow run's state, of the run in `root`."""
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client

    from tasks.tracking import default_tracking_uri

    client = MlflowClient(default_tracking_uri(load_config(overrides=[f"{k}={v}" for k, v in overrides(root).items()])))
    runs = client.search_runs(client.get_experiment_by_name("apo").experiment_id)
    parent = next(r for r in runs if r.data.tags.get("apo.role") == "pipeline")
    states = {"pipeline": (parent.info.status, parent.data.tags.get("apo.failure"))}
    for r in runs:
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id:
            states[r.data.tags.get("apo.stage", r.info.run_name)] = (r.info.status, r.data.tags.get("apo.failure"))
    with get_client(sync_client=True) as prefect:
        states["prefect"] = prefect.read_flow_run(parent.data.tags["apo.prefect.flow_run_id"]).state.name
    return states


def test_sigterm_in_train_online_checkpoints_the_step_within_the_grace_period(uninterrupted, tmp_path, record_fault):
    log = run_terminated(tmp_path, "train_online.after_step:3:term")
    said = [line for line in log.splitlines() if line.startswith("apo: stopped: train_online stopped after step 3/5")]
    assert said and "checkpoint step_000003 written in" in said[0] and log.strip().endswith(said[0]), log[-3000:]
    checkpoints = sorted(p.name for p in (tmp_path / RUN_ID / "train_online" / "checkpoints").glob("step_*"))
    assert checkpoints == ["step_000002", "step_000003"]
    states = run_states(tmp_path)
    assert states["pipeline"][0] == "KILLED" and "Preempted" in states["pipeline"][1]
    assert states["train_online"][0] == "KILLED" and "stopped after step 3/5" in states["train_online"][1]
    assert states["sample_reference"] == ("FINISHED", None) and "evaluate" not in states
    assert states["prefect"] == "Failed", states
    summary = run_in_process(tmp_path)
    assert trained_steps(summary)[-2:] == [4, 5] and 3 not in trained_steps(summary)
    assert_same_results(tmp_path / RUN_ID, summary, uninterrupted, leases=[(2, True)])
    record_fault("stop", "SIGTERM in train_online after rollout step 3 (checkpoints every 2 steps; train.grace_s 20)",
                 f"training stopped after step 3 and wrote checkpoint step_000003 ({said[0].split('written in ')[1].split(';')[0]}); "
                 f"the train_online and pipeline MLflow runs ended KILLED with the reason as tag apo.failure, the Prefect flow "
                 f"run {states['prefect']}; the resume trained steps 4-5 only; {SAME}")


def test_sigterm_without_time_for_a_checkpoint_exits_at_once(uninterrupted, tmp_path, record_fault):
    log = run_terminated(tmp_path, "train_online.after_step:3:term", "train.grace_s=0")
    said = [line for line in log.splitlines() if line.startswith("apo: stopped: train_online stopped after step 3/5")]
    assert said and "no checkpoint written" in said[0] and "a resume starts from step_000002" in said[0], log[-3000:]
    assert sorted(p.name for p in (tmp_path / RUN_ID / "train_online" / "checkpoints").glob("*step_*")) == ["step_000002"]
    summary = run_in_process(tmp_path)
    assert trained_steps(summary)[-3:] == [3, 4, 5]
    assert_same_results(tmp_path / RUN_ID, summary, uninterrupted, leases=[(2, True)])
    record_fault("stop", "SIGTERM in train_online after step 3 when a checkpoint cannot be written in time (train.grace_s 0)",
                 "stopped at once without a checkpoint, saying so and that a resume starts from step_000002; "
                 f"the resume trained steps 3-5 from the last periodic checkpoint; {SAME}")


@pytest.fixture
def small_disk(tmp_path):
    """A real file system that fills up: a tmpfs of 20 MB (the run writes ~35 MB: two 12 MB
    checkpoints, the model twice, MLflow's SQLite store), resized by `grow(size)` later (a
    remount keeps its files). Needs mount rights (root with CAP_SYS_ADMIN, as CI has)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(disk)], capture_output=True, text=True)
    if done.returncode:
        pytest.fail(f"cannot mount a tmpfs for the full-disk case (needs root and CAP_SYS_ADMIN): {done.stderr.strip()}")

    def grow(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)

    yield disk, grow
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_stops_the_run_in_one_line_and_the_run_id_resumes_after_space_is_freed(uninterrupted, small_disk, record_fault):
    disk, grow = small_disk
    args, env = apo_command(disk)
    done = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    last = log.strip().splitlines()[-1]
    assert done.returncode == 1, log[-3000:]
    assert last.startswith("apo: stopped: no space left on device writing ") and str(disk) in last, log[-3000:]
    assert "rerun the same run id" in last
    run = disk / RUN_ID
    for marker in run.glob("*/_COMPLETE.json"):  # what was published is whole and matches its manifest
        from tasks.stage import StageResult
        from tasks.storage import manifest_mismatch

        result = StageResult.model_validate_json(marker.read_text())
        assert manifest_mismatch(result.uri, result.manifest) is None, marker
    assert not (run / "train_online" / "_COMPLETE.json").exists() and not (run / "summary.json").exists()
    assert not list(run.rglob(".tmp_step_*")) and not [p for p in run.rglob(".*") if p.is_file()]  # no partial files left
    grow("200m")
    summary = run_in_process(disk)
    assert summary["stage_status"]["train_online"] == "ran" and summary["stage_status"]["preprocess"] == "skipped"
    assert_same_results(run, summary, uninterrupted, leases=[(2, True)])
    record_fault("disk", "artifact root (and MLflow's SQLite store in it) on a 20 MB tmpfs that fills during train_online",
                 f"the run stopped (exit 1) with one line: `{last.replace(str(disk), '<root>')[:220]}`; no partial checkpoint or "
                 f"temp file left, every published stage matched its manifest, train_online unmarked; after the tmpfs grew "
                 f"to 200 MB the same run id resumed: {statuses(summary).split('; ', 1)[1]}; {SAME}")


def test_sigterm_outside_training_ends_every_run_state_honestly(uninterrupted, tmp_path, record_fault):
    args, env = apo_command(tmp_path, APO_FAILPOINTS="evaluate.after_model:1:term")
    done = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM, 1), f"exit {done.returncode}:\n{log[-3000:]}"
    states = run_states(tmp_path)
    assert states["pipeline"][0] == states["evaluate"][0] == "KILLED", states
    assert states["pipeline"][1] == "TerminationSignal: SIGTERM received" and states["train_online"] == ("FINISHED", None)
    assert states["prefect"] == "Crashed", states
    assert lease_files(tmp_path) == [(1, True)]  # released on the way out: a resume needs no takeover
    summary = run_in_process(tmp_path)
    expect(summary, 4)
    record_fault("stop", "SIGTERM during evaluate (after the reference model), outside training",
                 f"the process ended (exit {done.returncode}); the evaluate and pipeline MLflow runs ended KILLED with "
                 f"apo.failure `{states['pipeline'][1][:60]}`, the Prefect flow run {states['prefect']}, the lease released; "
                 "the rerun reused the four finished stages and re-evaluated")
