"""One small flow per stage: the entrypoints of the stage deployments that the `apo` flow submits
under `execution: work-pool` (see prefect.yaml and flows/dispatch.py).

One flow per stage rather than one flow with a `stage` parameter: each deployment then shows its
stage by name in the UI and in `prefect flow-run ls`, has a parameter form of its own (a shard
takes shard ids, training takes V*), and only the shard flow carries a concurrency limit. Each
body is the stage's task, then the hand-off of its result.
"""

from __future__ import annotations

from prefect import flow

from flows.dispatch import publish
from tasks.aggregate_vstar import aggregate_vstar
from tasks.evaluate import evaluate
from tasks.preprocess import preprocess
from tasks.sample_reference import sample_reference_shard
from tasks.stage import RunContext, StageResult
from tasks.train_online import train_online


@flow(name="apo-preprocess", log_prints=True)
def preprocess_flow(ctx: RunContext) -> StageResult:
    return publish(ctx, preprocess(ctx))


@flow(name="apo-sample-reference-shard", log_prints=True)
def sample_reference_shard_flow(ctx: RunContext, prep: StageResult, shard_ids: list[int],
                                mlflow_run_id: str | None = None) -> dict[str, float]:
    """Parts of stage-1 shards `shard_ids`; the apo flow assembles samples.parquet once all shard runs are done."""
    return sample_reference_shard(ctx, prep, shard_ids, mlflow_run_id)


@flow(name="apo-aggregate-vstar", log_prints=True)
def aggregate_vstar_flow(ctx: RunContext, samples: StageResult) -> StageResult:
    return publish(ctx, aggregate_vstar(ctx, samples))


@flow(name="apo-train-online", log_prints=True)
def train_online_flow(ctx: RunContext, prep: StageResult, vstar: StageResult) -> StageResult:
    return publish(ctx, train_online(ctx, prep, vstar))


@flow(name="apo-evaluate", log_prints=True)
def evaluate_flow(ctx: RunContext, prep: StageResult, trained: StageResult) -> StageResult:
    return publish(ctx, evaluate(ctx, prep, trained))
