"""Opening and closing a pipeline run: the MLflow parent run, config.json and summary.json."""

from __future__ import annotations

from contextlib import contextmanager, suppress
from typing import Iterator, Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE

from .config import ApoConfig

from . import lease, review, storage
from .faults import failpoint
from .preflight import PreflightError, check_artifact_root, preflight
from .register import registry_record
from .stage import RunContext, StageResult
from .tracking import DESCRIPTION_TAG, Tracker, default_tracking_uri, failure_reason, ui_command


def _not_a_preflight_failure(task, task_run, state) -> bool:
    """Retry start_run on I/O trouble, not on a run that cannot start (retrying cannot fix it)."""
    return not isinstance(state.result(raise_on_failure=False), PreflightError)


@contextmanager
def pipeline_run(config: ApoConfig, take_over: bool = False) -> Iterator[RunContext]:
    """The block of one pipeline run: first the run id's lease (tasks/lease.py: one writer per run
    id, before anything is written), then start_run. Whatever stops the block (a failed stage, a
    signal, a cancellation) ends the MLflow parent run FAILED or KILLED with its reason as a tag
    before it propagates; the lease is released last."""
    cfg = config.with_run_id()
    storage.configure(cfg.storage)
    check_artifact_root(storage.join(cfg.artifact_root, cfg.run_id or ""))  # writable, before the lease is written there
    with lease.hold(storage.join(cfg.artifact_root, cfg.run_id or ""), cfg.run_id or "",
                    cfg.orchestration.lease_ttl_s, take_over) as held:
        ctx = start_run(cfg, held.record["token"])
        try:
            yield ctx
        except BaseException as exc:
            status = "FAILED"
            with suppress(Exception):  # the tracking store may be what failed
                status = ctx.tracker().fail(ctx.parent_run_id, exc)
            print(f"[apo] run {cfg.run_id} ended {status}: {failure_reason(exc)[:300]}")
            if status == "KILLED" and not isinstance(exc, Exception):
                crashed(exc)  # a signal: the process may end before Prefect records a final state
            raise


def crashed(exc: BaseException) -> None:
    """Mark this flow run Cancelled (when a cancel was asked for) or Crashed, naming `exc`."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run
    from prefect.states import Cancelled, Crashed

    if not flow_run.id:
        return
    with suppress(Exception), get_client(sync_client=True) as client:
        current = client.read_flow_run(flow_run.id).state
        state = Cancelled if current is not None and current.is_cancelling() else Crashed
        client.set_flow_run_state(flow_run.id, state(message=f"apo: {failure_reason(exc)}"), force=True)


@task(name="start_run", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=_not_a_preflight_failure)
def start_run(config: ApoConfig, lease_token: str | None = None) -> RunContext:
    cfg = config.with_run_id()
    storage.configure(cfg.storage)
    preflight(cfg, storage.join(cfg.artifact_root, cfg.run_id or ""))  # before any MLflow run or model load
    tracker = Tracker.for_config(cfg)
    parent = tracker.parent_run(cfg, tags=review.source_tags())
    ctx = RunContext(config=cfg, tracking_uri=default_tracking_uri(cfg), parent_run_id=parent, lease_token=lease_token)
    storage.write_json(cfg.model_dump(mode="json"), storage.join(ctx.run_uri, "config.json"))
    review.prefect_link(ctx, tracker.experiment_id)
    print(f"[apo] run {cfg.run_id}: artifacts {ctx.run_uri}, MLflow run {parent} at {ctx.tracking_uri}")
    return ctx


@task(name="finish_run", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def finish_run(ctx: RunContext, results: Sequence[StageResult]) -> dict:
    by_stage = {r.stage: r for r in results}
    accuracy = by_stage["evaluate"].metrics if "evaluate" in by_stage else {}
    summary = {
        "run_id": ctx.config.run_id,
        "reference_accuracy": accuracy.get("eval/reference_accuracy"),
        "trained_accuracy": accuracy.get("eval/trained_accuracy"),
        "stage_seconds": {r.stage: round(r.seconds, 2) for r in results},
        "stage_peak_rss_mb": {r.stage: round(r.peak_rss_mb, 1) for r in results},
        "stage_status": {r.stage: r.status for r in results},
        "stages_recomputed": [r.stage for r in results if r.status == "ran"],
        "artifacts": {r.stage: r.uri for r in results},
        "data_version": data_version_of(by_stage.get("preprocess")),
        "skipped_rows": {k.removeprefix("data/skipped/"): int(v) for r in results for k, v in r.metrics.items() if k.startswith("data/skipped/")},
        "metrics": {k: v for r in results for k, v in r.metrics.items()},
        "mlflow_tracking_uri": ctx.tracking_uri,
        "mlflow_run_id": ctx.parent_run_id,
        "mlflow_stage_runs": {r.stage: r.mlflow_run_id for r in results},
        "mlflow_ui": ui_command(ctx.tracking_uri),
        "registry": registry_record(ctx, by_stage.get("evaluate")),  # tasks/register.py's decision, None when off
        "summary_uri": storage.join(ctx.run_uri, "summary.json"),
        "config": ctx.config.model_dump(mode="json"),
    }
    failpoint("run.before_summary")
    tracker = ctx.tracker()
    headline = {k: v for k, v in (("eval/reference_accuracy", summary["reference_accuracy"]),
                                  ("eval/trained_accuracy", summary["trained_accuracy"])) if v is not None}
    headline.update({f"time/{k}_s": v for k, v in summary["stage_seconds"].items()})
    headline.update({f"memory/{k}_peak_rss_mb": v for k, v in summary["stage_peak_rss_mb"].items()})
    headline.update({k: summary["metrics"][k] for k in ("reference/reused", "reference/sampled") if k in summary["metrics"]})
    tracker.log_metrics(ctx.parent_run_id, headline)
    if summary["data_version"]:
        tracker.set_tags(ctx.parent_run_id, {f"apo.data_version.{k}": v for k, v in summary["data_version"].items()})
    tracker.log_dict(ctx.parent_run_id, summary, "summary.json")
    text = review.description(summary)
    tracker.set_tags(ctx.parent_run_id, {DESCRIPTION_TAG: text})
    review.publish_figures(ctx, tracker, summary, by_stage)
    review.prefect_summary(ctx, summary, text, tracker.experiment_id)
    tracker.end(ctx.parent_run_id, ok=True)
    storage.write_json(summary, summary["summary_uri"])
    return summary


def data_version_of(prep: StageResult | None) -> dict[str, str] | None:
    """The data version preprocess recorded in provenance.json (all, train, test)."""
    if prep is None or "provenance" not in prep.outputs:
        return None
    return storage.read_json(prep.outputs["provenance"]).get("data_version")


def read_config(uri: str) -> ApoConfig:
    """The run's config from a YAML file at any fsspec URI (e.g. s3://bucket/configs/retrain.yaml),
    validated like `apo run --config`; any problem is one ConfigError line naming the URI."""
    import yaml

    from .config import ConfigError, load_config

    try:
        raw = storage.read_bytes(uri)
    except Exception as exc:  # missing file, no access, endpoint down (after storage's own retries)
        raise ConfigError(f"config: cannot read {uri}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    try:
        tree = yaml.safe_load(raw) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {uri} is not YAML: {exc}".splitlines()[0]) from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config: {uri} must hold a mapping at top level")
    return load_config(base=tree)
