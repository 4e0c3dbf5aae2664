"""How the `apo` flow reaches its stages: in its own process (`execution: local`) or as flow runs
of the stage deployments on their work pools (`execution: work-pool`).

Under work-pool a stage flow run gets the RunContext (config, artifact root, parent MLflow run
id) and the upstream StageResults as parameters, all plain data. It hands its StageResult back
through the artifact store (`<run>/stage_runs/<flow run id>.json`), which every worker reaches
anyway, so no Prefect result storage must be shared between machines. The apo flow waits for
each submitted run; one that ends Failed, Crashed or Cancelled fails the pipeline with a message
naming the stage, the flow run and its state. Stage 1 is submitted as several shard runs at once
(how many run together is the shard deployment's concurrency limit, see prefect.yaml).
"""

from __future__ import annotations

import time
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.exceptions import TerminationSignal
from prefect.states import Cancelling
from pydantic import BaseModel

from tasks import storage
from tasks.aggregate_vstar import aggregate_vstar
from tasks.evaluate import evaluate
from tasks.preprocess import preprocess
from tasks.sample_reference import sample_reference
from tasks.stage import RunContext, StageIO, StageResult
from tasks.train_online import train_online


class StageRunFailed(RuntimeError):
    """A stage flow run (or shard run) did not complete; the message names it and its state."""


def handoff_uri(ctx: RunContext, flow_run_id: Any) -> str:
    return storage.join(ctx.run_uri, "stage_runs", f"{flow_run_id}.json")


def publish(ctx: RunContext, result: StageResult) -> StageResult:
    """Inside a stage flow run: leave its StageResult where the apo flow will look for it."""
    from prefect.runtime import flow_run

    if flow_run.id:
        storage.write_json(result.model_dump(mode="json"), handoff_uri(ctx, flow_run.id))
    return result


def _plain(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def submit(ctx: RunContext, stage: str, deployment: str, name: str, parameters: dict[str, Any]) -> FlowRun:
    """A flow run of `deployment` with `parameters`, linked to the current flow run as its subflow; returns at once."""
    run = run_deployment(deployment, parameters={k: _plain(v) for k, v in parameters.items()}, timeout=0,
                         flow_run_name=name, tags=["apo", f"apo.stage:{stage}", f"apo.run_id:{ctx.config.run_id}"])
    print(f"[apo] {name}: submitted to {deployment} as flow run {run.id}")
    return run


def describe(label: str, run: FlowRun) -> str:
    state = run.state
    message = (state.message or "").strip().splitlines() if state else []
    why = f": {message[0][:400]}" if message else ""
    return f"{label} (flow run {run.id}, {run.name!r}) ended {state.name if state else 'without a state'}{why}"


class RunCancelled(RuntimeError):
    """The apo flow run itself was cancelled while it waited for a stage; its stage runs were cancelled too."""


def cancel(client, runs: dict[str, FlowRun], why: str) -> None:
    for run in runs.values():
        client.set_flow_run_state(run.id, Cancelling(message=f"apo: {why}"), force=True)


def wait(stage: str, runs: dict[str, FlowRun], timeout_s: float, poll_s: float) -> dict[str, FlowRun]:
    """Wait until every run in `runs` (label -> run) is final. Past `timeout_s` the unfinished ones
    are cancelled and the stage fails naming them; any run that did not complete fails it too,
    after all have finished, naming each one. When the apo flow run is cancelled meanwhile (from
    the UI or the API), or this process is stopped, the unfinished ones are cancelled with it."""
    from prefect.runtime import flow_run

    deadline = time.monotonic() + timeout_s
    pending, finished = dict(runs), {}
    with get_client(sync_client=True) as client:
        try:
            while pending:
                for label, run in list(pending.items()):
                    run = client.read_flow_run(run.id)
                    if run.state is not None and run.state.is_final():
                        finished[label] = run
                        del pending[label]
                if not pending:
                    break
                if time.monotonic() > deadline:
                    cancel(client, pending, f"{stage} timed out")
                    names = ", ".join(f"{label} (flow run {run.id})" for label, run in pending.items())
                    raise StageRunFailed(f"stage {stage}: {names} still running after {timeout_s:.0f}s "
                                         "(orchestration.stage_timeout_s); cancelled")
                own = client.read_flow_run(flow_run.id).state if flow_run.id else None
                if own is not None and (own.is_cancelling() or own.is_cancelled()):
                    cancel(client, pending, "the pipeline run was cancelled")
                    raise RunCancelled(f"flow run {flow_run.id} was cancelled during {stage}; cancelled its "
                                       f"{len(pending)} running stage run(s): " + ", ".join(str(r.id) for r in pending.values()))
                time.sleep(poll_s)
        except (KeyboardInterrupt, SystemExit, TerminationSignal):  # stopped from outside: take the stage runs along
            cancel(client, pending, "the pipeline run was stopped")
            raise
    failed = [describe(label, run) for label, run in finished.items() if not run.state.is_completed()]
    if failed:
        raise StageRunFailed(f"stage {stage}: {len(failed)} of {len(runs)} flow run(s) failed: " + "; ".join(failed))
    return finished


class OnWorkPools:
    """The stages as flow runs of their deployments (`orchestration.deployments`)."""

    def _stage(self, ctx: RunContext, stage: str, **upstream: StageResult) -> StageResult:
        orch = ctx.config.orchestration
        run = submit(ctx, stage, getattr(orch.deployments, stage), f"{ctx.config.run_id}-{stage}", {"ctx": ctx, **upstream})
        done = wait(stage, {stage: run}, orch.stage_timeout_s, orch.poll_s)[stage]
        uri = handoff_uri(ctx, done.id)
        if not storage.exists(uri):
            raise StageRunFailed(f"stage {stage}: flow run {done.id} completed but left no result at {uri}")
        return StageResult.model_validate(storage.read_json(uri))

    def preprocess(self, ctx: RunContext) -> StageResult:
        return self._stage(ctx, "preprocess")

    def sample_reference(self, ctx: RunContext, prep: StageResult) -> StageResult:
        orch = ctx.config.orchestration

        def fan_out(groups: list[list[int]], io: StageIO) -> None:
            runs = {}
            for g, ids in enumerate(groups):
                label = f"shard {g + 1}/{len(groups)} (shards {ids[0]}-{ids[-1]})"
                runs[label] = submit(ctx, "sample_reference", orch.deployments.sample_reference,
                                     f"{ctx.config.run_id}-sample_reference-{g + 1}of{len(groups)}",
                                     {"ctx": ctx, "prep": prep, "shard_ids": ids, "mlflow_run_id": io.mlflow_run_id})
            wait("sample_reference", runs, orch.stage_timeout_s, orch.poll_s)

        # The stage itself (its MLflow run, assembling samples.parquet, the marker) runs here, around the shard runs.
        return sample_reference(ctx, prep, fan_out=fan_out)

    def aggregate_vstar(self, ctx: RunContext, samples: StageResult) -> StageResult:
        return self._stage(ctx, "aggregate_vstar", samples=samples)

    def train_online(self, ctx: RunContext, prep: StageResult, vstar: StageResult) -> StageResult:
        return self._stage(ctx, "train_online", prep=prep, vstar=vstar)

    def evaluate(self, ctx: RunContext, prep: StageResult, trained: StageResult) -> StageResult:
        return self._stage(ctx, "evaluate", prep=prep, trained=trained)


class InProcess:
    """The stages as tasks of the apo flow itself."""

    preprocess = staticmethod(preprocess)
    sample_reference = staticmethod(sample_reference)
    aggregate_vstar = staticmethod(aggregate_vstar)
    train_online = staticmethod(train_online)
    evaluate = staticmethod(evaluate)


def stages_for(ctx: RunContext) -> InProcess | OnWorkPools:
    return OnWorkPools() if ctx.config.execution == "work-pool" else InProcess()
