"""What every stage shares: where its outputs live, when it counts as done, what it measured.

A stage's folder is `<artifact_root>/<run_id>/<stage>/`; the stage is complete when its
marker `_COMPLETE.json` exists, written last, with a manifest of every output file (bytes,
sha256, Parquet rows): a skipped stage is reused only while its files still match it. The marker records a fingerprint of the config
the stage depends on and of its inputs; a re-run with the same run id skips a stage whose
fingerprint matches and recomputes it (and so everything downstream) when it does not.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import psutil
from pydantic import BaseModel

from .config import ApoConfig

from . import lease, storage
from .faults import failpoint
from .tracking import Tracker

MARKER = "_COMPLETE.json"
# Entries that hold a stage's resumable working state, not its published output: training's
# checkpoints, stage 1's plan for its shard runs (tasks/sample_reference.py PLAN).
RESUME_STATE = ("checkpoints", "plan.parquet", MARKER)

STAGES = ("preprocess", "sample_reference", "aggregate_vstar", "train_online", "evaluate")


class RunContext(BaseModel):
    """Everything a stage needs to find its inputs and its MLflow parent; plain data, so it
    travels to a stage running in another process or pod."""

    config: ApoConfig
    tracking_uri: str
    parent_run_id: str
    lease_token: str | None = None  # the run lease this run holds (tasks/lease.py); stages publish only under it

    @property
    def run_uri(self) -> str:
        return storage.join(self.config.artifact_root, self.config.run_id or "")

    def stage_uri(self, stage: str) -> str:
        return storage.join(self.run_uri, stage)

    def tracker(self) -> Tracker:
        return Tracker.for_config(self.config)


class StageResult(BaseModel):
    """What a stage hands downstream and into the run summary."""

    stage: str
    uri: str
    status: str  # "ran" or "skipped"
    fingerprint: str
    seconds: float
    peak_rss_mb: float
    metrics: dict[str, float] = {}
    outputs: dict[str, str] = {}
    mlflow_run_id: str | None = None
    manifest: dict[str, dict] = {}  # every published file: bytes, sha256, Parquet rows
    inputs: dict[str, str] = {}  # content digests of the external files it read (part of its fingerprint)


def fingerprint(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def sampling_parts(cfg) -> list:
    """Fingerprint parts of the generation settings that change what a model samples: the stop
    tokens when set (when unset they follow the model, which the fingerprints cover already)."""
    stops = cfg.generation.stop_token_ids
    return [{"stop_token_ids": stops}] if stops else []


def verifier_metrics(reward: str, before: dict[str, int]) -> dict[str, float]:
    """What the verifier counted since `before` (= reward_stats(reward) at the stage start):
    failures score 0 and are reported here, never raised."""
    from apo_core.rewards import reward_stats

    return {f"verifier/{k}": float(v - before.get(k, 0)) for k, v in reward_stats(reward).items()}


@dataclass
class PeakRSS:
    """Peak resident memory of this process while a block runs (sampled every 20 ms)."""

    interval: float = 0.02
    peak_bytes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def _poll(self, proc: psutil.Process) -> None:
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, proc.memory_info().rss)

    @contextmanager
    def measure(self) -> Iterator["PeakRSS"]:
        proc = psutil.Process(os.getpid())
        self.peak_bytes = proc.memory_info().rss
        thread = threading.Thread(target=self._poll, args=(proc,), daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()
            self.peak_bytes = max(self.peak_bytes, proc.memory_info().rss)


@dataclass
class StageIO:
    """Handed to a stage body: its folder, its MLflow run, and the tracker to log with."""

    uri: str
    tracker: Tracker
    mlflow_run_id: str
    fingerprint: str = ""
    parent_run_id: str | None = None

    def path(self, *names: str) -> str:
        return storage.join(self.uri, *names)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.tracker.log_metrics(self.mlflow_run_id, metrics, step)

    def log_datasets(self, datasets) -> None:
        """Dataset inputs (tracking.DatasetRef) of this stage's run and of the pipeline run."""
        for run in filter(None, (self.mlflow_run_id, self.parent_run_id)):
            self.tracker.log_datasets(run, datasets)


def completed(ctx: RunContext, stage: str, fp: str, inputs: dict[str, str] | None = None) -> StageResult | None:
    """The recorded result of `stage` when it completed with fingerprint `fp`; when it completed
    with another one because an input file changed, says which."""
    marker = storage.join(ctx.stage_uri(stage), MARKER)
    if not storage.exists(marker):
        return None
    result = StageResult.model_validate(storage.read_json(marker))
    if result.fingerprint != fp:
        changed = [f"{k} ({result.inputs.get(k, 'not read')} -> {v})" for k, v in (inputs or {}).items() if result.inputs.get(k) != v]
        if changed:
            print(f"[{stage}] input changed since it ran: {'; '.join(changed)}; recomputing it and every stage after it")
        return None
    problem = storage.manifest_mismatch(result.uri, result.manifest)
    if problem:
        print(f"[{stage}] published output does not match its manifest: {problem}; recomputing")
        return None
    return result


def run_stage(
    ctx: RunContext,
    stage: str,
    fp: str,
    body: Callable[[StageIO], tuple[dict[str, float], dict[str, str]]],
    inputs: dict[str, str] | None = None,
) -> StageResult:
    """Skip `stage` if complete with this fingerprint; else run `body` measured and tracked,
    then publish the marker. `body` returns (metrics, outputs: name -> URI). `inputs`: content
    digests of the files outside the run that the stage reads (datasets.content_digests), part of
    the fingerprint."""
    storage.configure(ctx.config.storage)  # this process's retry policy (a stage may run in its own pod)
    if inputs:
        fp = fingerprint(fp, inputs)
    done = completed(ctx, stage, fp, inputs)
    if done is not None:
        print(f"[{stage}] complete already (fingerprint {fp}); skipped")
        return done.model_copy(update={"status": "skipped"})
    lease.verify(ctx.run_uri, ctx.lease_token)  # a displaced writer (its run taken over) starts nothing
    uri = ctx.stage_uri(stage)
    storage.remove(storage.join(uri, MARKER))  # a stale marker (other fingerprint) must not survive a crash
    tracker = ctx.tracker()
    mlflow_run = tracker.stage_run(ctx.parent_run_id, stage, ctx.config.run_id or "")
    print(f"[{stage}] started -> {uri}")
    start = time.perf_counter()
    try:
        with PeakRSS().measure() as rss, tracker.system_metrics(mlflow_run, ctx.config.tracking.system_metrics_interval_s):
            metrics, outputs = body(StageIO(uri, tracker, mlflow_run, fp, ctx.parent_run_id))
    except BaseException as exc:
        tracker.fail(mlflow_run, exc)
        raise
    seconds = time.perf_counter() - start
    peak_mb = rss.peak_bytes / 2**20
    tracker.log_metrics(mlflow_run, {"stage/seconds": seconds, "stage/peak_rss_mb": peak_mb})
    tracker.end(mlflow_run, ok=True)
    result = StageResult(
        stage=stage, uri=uri, status="ran", fingerprint=fp, seconds=seconds, peak_rss_mb=peak_mb,
        metrics=metrics, outputs=outputs, mlflow_run_id=mlflow_run, inputs=inputs or {},
        manifest=storage.manifest(uri, skip=RESUME_STATE),
    )
    failpoint(f"{stage}.before_marker")
    lease.verify(ctx.run_uri, ctx.lease_token)  # and publishes nothing
    storage.write_json(result.model_dump(mode="json"), storage.join(uri, MARKER))
    failpoint(f"{stage}.after_marker")
    print(f"[{stage}] done in {seconds:.1f}s, peak RSS {peak_mb:.0f} MB")
    return result
