"""`execution: work-pool` end to end, every part real on loopback: moto's S3 server (bucket
apo-test), an MLflow server with its artifacts in that bucket, a Prefect server, work pools
apo-cpu / apo-gpu with a process worker each, `prefect deploy --all` from the project's
prefect.yaml, then `prefect deployment run apo/full`. Plus the quick pieces (shard grouping,
config from a URI, one-line errors) that need none of it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from apo_core.seeds import keyed_seed
from tasks.config import ConfigError, load_config
from tests.helpers.servers import free_port, wait_for_http

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGE_FILES = {
    "preprocess": "prompts.parquet",
    "sample_reference": "samples.parquet",
    "aggregate_vstar": "vstar.parquet",
    "train_online": "metrics.parquet",
    "evaluate": "results.parquet",
}
STAGE_DEPLOYMENTS = {
    "preprocess": "apo-preprocess/apo-cpu",
    "sample_reference": "apo-sample-reference-shard/apo-gpu",
    "aggregate_vstar": "apo-aggregate-vstar/apo-cpu",
    "train_online": "apo-train-online/apo-gpu",
    "evaluate": "apo-evaluate/apo-gpu",
}


# ---------------------------------------------------------------- quick pieces (no servers)


def test_shards_are_grouped_contiguously_and_evenly():
    from tasks.sample_reference import group_shards

    assert group_shards([0, 1, 2, 3, 4], 2) == [[0, 1, 2], [3, 4]]
    assert group_shards([0, 1, 2], 3) == [[0], [1], [2]]
    assert group_shards([2, 5], 4) == [[2], [5]]  # never an empty run
    groups = group_shards(list(range(10)), 3)
    assert sum(groups, []) == list(range(10)) and sorted(map(len, groups)) == [3, 3, 4]


def test_reference_shards_does_not_change_the_samples_fingerprint():
    from tasks.sample_reference import stage_fingerprint
    from tasks.stage import StageResult

    prep = StageResult(stage="preprocess", uri="x", status="ran", fingerprint="abc", seconds=0, peak_rss_mb=0)
    one, four = (load_config(overrides=[f"reference.shards={n}"]) for n in (1, 4))
    assert stage_fingerprint(one, prep) == stage_fingerprint(four, prep)
    other = load_config(overrides=["reference.shard_size=7"])
    assert stage_fingerprint(other, prep) != stage_fingerprint(one, prep)


@pytest.mark.parametrize("override, expected", [
    ("execution=pool", "config: execution: Input should be 'local' or 'work-pool' (got 'pool')"),
    ("orchestration.deployments.evaluate=apo-evaluate", "config: orchestration.deployments.evaluate: deployment 'apo-evaluate' must look like <flow name>/<deployment name>"),
    ("reference.shards=0", "config: reference.shards: Input should be greater than or equal to 1"),
    ("orchestration.stage_timeout_s=0", "config: orchestration.stage_timeout_s: Input should be greater than 0"),
])
def test_bad_orchestration_values_fail_in_one_line(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def test_config_from_a_uri_is_validated_in_one_line(tmp_path):
    from tasks.run import read_config

    good = tmp_path / "retrain.yaml"
    good.write_text("execution: work-pool\nreference: {shards: 3}\n")
    cfg = read_config(good.as_uri())
    assert cfg.execution == "work-pool" and cfg.reference.shards == 3
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "typo.yaml").write_text("referense: {shards: 3}\n")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    cases = {
        str(tmp_path / "missing.yaml"): "config: cannot read ",
        str(tmp_path / "list.yaml"): "must hold a mapping at top level",
        str(tmp_path / "typo.yaml"): "config: unknown key 'referense'",
        str(tmp_path / "bad.yaml"): "is not YAML",
    }
    for uri, expected in cases.items():
        with pytest.raises(ConfigError, match=re.escape(expected)) as err:
            read_config(uri)
        assert "\n" not in str(err.value)


def test_prefect_yaml_declares_every_stage_deployment_on_its_pool():
    import yaml

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    from flows import stages

    flows_by_entry = {}
    for d in spec["deployments"]:
        module, func = d["entrypoint"].split(":")
        target = {"flows/apo.py": "apo", "flows/stages.py": getattr(stages, func, None)}[module]
        name = target if isinstance(target, str) else target.name
        flows_by_entry[f"{name}/{d['name']}"] = d
    defaults = load_config().orchestration.deployments.model_dump()
    assert set(defaults.values()) | {"apo/full", "apo/retrain"} == set(flows_by_entry)
    for stage, full in defaults.items():
        assert flows_by_entry[full]["work_pool"]["name"] == ("apo-cpu" if stage in ("preprocess", "aggregate_vstar") else "apo-gpu")
    assert flows_by_entry["apo-sample-reference-shard/apo-gpu"]["concurrency_limit"]["limit"] >= 1
    retrain = flows_by_entry["apo/retrain"]
    assert retrain["schedules"][0]["cron"] and retrain["parameters"]["config_uri"].startswith("s3://")


# ---------------------------------------------------------------- the stack


class Stack:
    """Subprocesses this module started (each in its own session, so a stop ends its children)."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def spawn(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        log.close()
        self.procs.append((name, proc))
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {name}.log\n{(self.root / f'{name}.log').read_text(errors='replace')[-3000:]}"
                         for name, _ in self.procs)

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def _wait_http(url: str, proc: subprocess.Popen, what: str, stack: Stack, seconds: float = 180) -> None:
    def failed(reason: str) -> None:
        pytest.fail(f"{what} did not come up at {url}: {reason}\n{stack.logs()}")

    wait_for_http(url, proc, seconds, failed, poll=0.5)


@pytest.fixture(scope="module")
def stack(s3_endpoint, mlflow_server, tmp_path_factory):
    """Prefect server, pools apo-cpu/apo-gpu, one process worker per pool, deployments from prefect.yaml."""
    root = tmp_path_factory.mktemp("work-pool-stack")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "INFO", "OMP_NUM_THREADS": "1"})
    stack = Stack(root)
    try:
        server = stack.spawn("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], {
            **base, "PREFECT_HOME": str(root / "server-home"), "PREFECT_UI_ENABLED": "false",
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root}/prefect-server.db",
            # a shard run over the concurrency limit retries its slot after 1 s, not the default 30 s
            "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "1",
            # SQLite on a busy 2-core machine: wait for the write lock instead of answering 503, and leave
            # out the services this test does not use (the scheduler would insert apo/retrain's cron runs)
            "PREFECT_SERVER_DATABASE_TIMEOUT": "60", "PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT": "60",
            "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false", "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
            "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
        })
        _wait_http(f"{api}/health", server, "Prefect server", stack)
        # flow-run logs go to the workers' log files (shown when something fails), not into the server's database
        client_env = {**base, "PREFECT_API_URL": api, "PREFECT_HOME": str(root / "client-home"),
                      "PREFECT_LOGGING_TO_API_ENABLED": "false"}

        def cli(*args: str, attempts: int = 1) -> str:
            for attempt in range(attempts):
                out = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], env=client_env, cwd=REPO,
                                     capture_output=True, text=True, timeout=600)
                if out.returncode == 0:
                    return out.stdout
            pytest.fail(f"prefect {' '.join(args)} failed {attempts}x:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")

        for pool in ("apo-cpu", "apo-gpu"):
            cli("work-pool", "create", pool, "--type", "process")
            stack.spawn(f"worker-{pool}", [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process",
                                           "--name", f"{pool}-worker"], {
                **client_env, "PREFECT_HOME": str(root / f"{pool}-home"), "APO_HOME": str(REPO),
                "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5",
            })
        cli("deploy", "--all", attempts=3)  # idempotent: a retry re-applies the same deployments
        yield {"api": api, "cli": cli, "mlflow": mlflow_server, "stack": stack}
    finally:
        stack.stop()


def _client(api: str):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(api)


def _wait_final(api: str, flow_run_id: str, stack: Stack, seconds: float = 900):
    deadline = time.monotonic() + seconds
    with _client(api) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            if time.monotonic() > deadline:
                pytest.fail(f"flow run {flow_run_id} still {run.state.name if run.state else None} after {seconds}s\n{stack.logs()}")
            time.sleep(2)


def _start(stack: dict, *params: str) -> str:
    out = stack["cli"]("deployment", "run", "apo/full", *params)
    found = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert found, out
    return found.group(1)


def _tiny(model_dir, run_id: str, mlflow_uri: str, **extra) -> dict:
    """The tiny pipeline of tests/test_flow.py on work pools: 24 prompts in 3 stage-1 shards, 3 shard runs."""
    overrides = {
        "run_id": run_id, "execution": "work-pool", "artifact_root": "s3://apo-test/deployed",
        "tracking.mlflow_tracking_uri": mlflow_uri, "model.path": str(model_dir),
        "data.train_size": 24, "data.test_size": 12, "reference.n_samples": 2, "reference.shard_size": 8,
        "reference.shards": 3, "reference.max_new_tokens": 12, "train.max_new_tokens": 12, "eval.max_new_tokens": 12,
        "train.steps": 2, "train.rollout_batch_size": 8, "train.minibatch_size": 4, "train.lr": 1e-3,
        "train.checkpoint_every": 2, "generation.batch_size": 64, "orchestration.poll_s": 0.5, **extra,
    }
    return load_config(overrides=[f"{k}={v}" for k, v in overrides.items()]).model_dump(mode="json")


@pytest.fixture(scope="module")
def deployed_run(stack, tiny_model_dir):
    config = _tiny(tiny_model_dir, "deployed", stack["mlflow"])
    parent_id = _start(stack, "--params", json.dumps({"config": config}))
    parent = _wait_final(stack["api"], parent_id, stack["stack"])
    assert parent.state.is_completed(), f"apo/full ended {parent.state.name}: {parent.state.message}\n{stack['stack'].logs()}"
    return parent


def _children(api: str, parent) -> dict[str, list]:
    """Flow runs whose parent task run belongs to `parent`, by deployment name (flow/deployment)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with _client(api) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id])))
        names = {}
        for run in runs:
            if run.deployment_id not in names:
                d = client.read_deployment(run.deployment_id)
                names[run.deployment_id] = f"{client.read_flow(d.flow_id).name}/{d.name}"
            assert client.read_task_run(run.parent_task_run_id).flow_run_id == parent.id
        out: dict[str, list] = {}
        for run in runs:
            out.setdefault(names[run.deployment_id], []).append(run)
        return out


@pytest.mark.slow
def test_every_stage_ran_as_its_own_flow_run_on_its_pool(stack, deployed_run):
    children = _children(stack["api"], deployed_run)
    assert set(children) == set(STAGE_DEPLOYMENTS.values())
    for stage, deployment in STAGE_DEPLOYMENTS.items():
        runs = children[deployment]
        assert len(runs) == (3 if stage == "sample_reference" else 1), stage
        assert all(r.state.is_completed() for r in runs), stage
        assert {r.work_pool_name for r in runs} == {"apo-cpu" if stage in ("preprocess", "aggregate_vstar") else "apo-gpu"}
    # the stages ran in order: each started after the one before it ended
    order = [children[STAGE_DEPLOYMENTS[s]] for s in STAGE_FILES]
    for before, after in zip(order, order[1:]):
        assert max(r.end_time for r in before) <= min(r.start_time for r in after)


@pytest.mark.slow
def test_shard_runs_were_submitted_together_and_bounded_by_the_concurrency_limit(stack, deployed_run):
    shards = _children(stack["api"], deployed_run)[STAGE_DEPLOYMENTS["sample_reference"]]
    assert len(shards) == 3
    assert max(r.created for r in shards) < min(r.end_time for r in shards)  # all submitted before any had finished
    # never more than the deployment's limit (2, prefect.yaml) running at once ...
    events = sorted([(r.start_time, 1) for r in shards] + [(r.end_time, -1) for r in shards], key=lambda e: (e[0], e[1]))
    running, peak = 0, 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert peak <= 2
    # ... and the third waited for a slot in Prefect's AwaitingConcurrencySlot state
    with _client(stack["api"]) as client:
        waited = [r for r in shards if any(s.name == "AwaitingConcurrencySlot" for s in client.read_flow_run_states(r.id))]
    assert waited, "no shard run waited for a concurrency slot"
    assert sorted(len(r.parameters["shard_ids"]) for r in shards) == [1, 1, 1]


@pytest.mark.slow
def test_every_artifact_and_marker_is_in_the_bucket(stack, deployed_run):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    run = "apo-test/deployed/deployed"
    for stage, name in STAGE_FILES.items():
        assert fs.exists(f"{run}/{stage}/{name}"), stage
        marker = json.loads(fs.cat_file(f"{run}/{stage}/_COMPLETE.json"))
        assert marker["stage"] == stage and marker["uri"] == f"s3://{run}/{stage}"
    # the shard runs published their shards to the one reference-sample store in the bucket
    entries = [json.loads(fs.cat_file(m)) for m in fs.glob("apo-test/deployed/_reference/v1/*/manifests/*.json")]
    assert len(entries) == 3 and sum(e["rows"] for e in entries) == 24 * 2
    with fs.open(f"{run}/sample_reference/samples.parquet", "rb") as f:
        samples = pl.read_parquet(f)
    with fs.open(f"{run}/preprocess/prompts.parquet", "rb") as f:
        prompts = dict(pl.read_parquet(f).select("prompt_id", "prompt").iter_rows())
    assert samples.height == 24 * 2
    assert samples["seed"].to_list() == [keyed_seed(1234, prompts[p], i) for p, i in samples.select("prompt_id", "sample_idx").iter_rows()]
    assert fs.exists(f"{run}/train_online/model/model.safetensors")
    assert len(fs.glob(f"{run}/stage_runs/*.json")) == 4  # the hand-offs of the four whole-stage runs
    summary = json.loads(fs.cat_file(f"{run}/summary.json"))
    assert summary["stages_recomputed"] == list(STAGE_FILES)
    assert 0.0 <= summary["trained_accuracy"] <= 1.0


@pytest.mark.slow
def test_mlflow_server_shows_the_parent_and_one_nested_run_per_stage(stack, deployed_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(stack["mlflow"])
    exp = client.get_experiment_by_name("apo")
    parents = client.search_runs([exp.experiment_id], "tags.`apo.run_id` = 'deployed' and tags.`apo.role` = 'pipeline'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.params["execution"] == "work-pool"
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(STAGE_FILES)
    assert all(r.info.status == "FINISHED" for r in children)
    by_name = {r.info.run_name: r for r in children}
    # each shard run logged its timing into the stage's run, one step per shard
    history = client.get_metric_history(by_name["sample_reference"].info.run_id, "reference/shard_seconds")
    assert sorted(m.step for m in history) == [0, 1, 2]
    assert [m.step for m in client.get_metric_history(by_name["train_online"].info.run_id, "train/loss")] == [1, 2]
    assert [o.model_id for o in client.get_run(by_name["train_online"].info.run_id).outputs.model_outputs]  # the weights: a logged model of the stage run
    assert by_name["train_online"].info.artifact_uri.startswith("s3://apo-test/mlflow/")


@pytest.mark.slow
def test_a_failed_shard_fails_the_pipeline_naming_it(stack, deployed_run, tiny_model_dir, tmp_path):
    """A config file in the bucket (config_uri, as apo/retrain reads it) whose model stage 1 cannot
    load: preprocess passes (the embedded prompts need no model), every shard run fails, and the
    apo flow fails naming the stage, each shard run and its state; aggregation never runs."""
    import shutil

    import s3fs
    import yaml

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    cfg = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**cfg, "model_type": "no-such-architecture"}))
    config = _tiny(broken, "broken", stack["mlflow"], **{"reference.shards": 2})
    s3fs.S3FileSystem().pipe_file("apo-test/configs/broken.yaml", yaml.safe_dump(config).encode())

    parent_id = _start(stack, "--param", 'config_uri="s3://apo-test/configs/broken.yaml"')
    parent = _wait_final(stack["api"], parent_id, stack["stack"])
    assert parent.state.is_failed(), parent.state
    children = _children(stack["api"], parent)
    shards = children[STAGE_DEPLOYMENTS["sample_reference"]]
    assert len(shards) == 2 and all(r.state.is_failed() for r in shards)
    assert STAGE_DEPLOYMENTS["aggregate_vstar"] not in children
    message = parent.state.message
    assert "stage sample_reference: 2 of 2 flow run(s) failed" in message, message
    for g, run in enumerate(sorted(shards, key=lambda r: r.parameters["shard_ids"][0])):
        assert f"shard {g + 1}/2" in message and str(run.id) in message and "ended Failed" in message
    assert s3fs.S3FileSystem().exists("apo-test/deployed/broken/preprocess/_COMPLETE.json")
    assert not s3fs.S3FileSystem().exists("apo-test/deployed/broken/sample_reference/_COMPLETE.json")


@pytest.mark.slow
def test_two_flow_runs_of_one_run_id_one_writer(stack, deployed_run, tiny_model_dir):
    """Two `apo/full` flow runs for one run id (a double click, a retried deployment run): the one
    that takes the run's lease runs, the other fails before any stage naming the holder; the run
    that went through ends as a lone run does (the accuracies of `deployed_run`, same settings)."""
    import s3fs

    config = _tiny(tiny_model_dir, "twice", stack["mlflow"])
    ids = [_start(stack, "--params", json.dumps({"config": config})) for _ in range(2)]
    runs = [_wait_final(stack["api"], i, stack["stack"]) for i in ids]
    done = [r for r in runs if r.state.is_completed()]
    refused = [r for r in runs if r.state.is_failed()]
    assert len(done) == 1 and len(refused) == 1, [(r.id, r.state.name, r.state.message) for r in runs]
    message = refused[0].state.message or ""
    assert "run twice is being written by pid" in message and f"(Prefect flow run {done[0].id})" in message, message
    assert _children(stack["api"], refused[0]) == {}  # no stage flow run was submitted
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    ours = json.loads(fs.cat_file("apo-test/deployed/twice/summary.json"))
    lone = json.loads(fs.cat_file("apo-test/deployed/deployed/summary.json"))
    assert (ours["reference_accuracy"], ours["trained_accuracy"]) == (lone["reference_accuracy"], lone["trained_accuracy"])
    leases = fs.ls("apo-test/deployed/twice/_lease", detail=False)
    assert len(leases) == 1 and json.loads(fs.cat_file(leases[0]))["released"] is True
    with _client(stack["api"]) as client:
        assert "apo-run-twice" not in [lim.name for lim in client.read_global_concurrency_limits()]


@pytest.mark.slow
def test_cancelling_the_pipeline_cancels_its_running_stage_runs(stack, deployed_run, tiny_model_dir):
    """Cancel the apo flow run while its stage-1 shard runs work: the shard runs end Cancelled with
    it, no later stage starts, and the MLflow pipeline run ends KILLED with the reason."""
    from mlflow.tracking import MlflowClient
    from prefect.states import Cancelling

    config = _tiny(tiny_model_dir, "cancelled", stack["mlflow"], **{"reference.max_new_tokens": 48, "reference.n_samples": 4})
    parent_id = _start(stack, "--params", json.dumps({"config": config}))
    deadline = time.monotonic() + 600
    with _client(stack["api"]) as client:
        while True:
            parent = client.read_flow_run(parent_id)
            shards = _children(stack["api"], parent).get(STAGE_DEPLOYMENTS["sample_reference"], [])
            if any(r.state is not None and r.state.is_running() for r in shards):
                break
            assert not parent.state.is_final() and time.monotonic() < deadline, (parent.state, stack["stack"].logs())
            time.sleep(0.5)
        client.set_flow_run_state(parent_id, Cancelling(message="cancelled by the test"), force=True)
    parent = _wait_final(stack["api"], parent_id, stack["stack"])
    assert parent.state.is_cancelled(), parent.state
    children = _children(stack["api"], parent)
    shards = children[STAGE_DEPLOYMENTS["sample_reference"]]
    for run in shards:
        final = _wait_final(stack["api"], run.id, stack["stack"], seconds=300)
        assert final.state.is_cancelled() or final.state.is_completed(), final.state  # none left running
    assert any(_wait_final(stack["api"], r.id, stack["stack"]).state.is_cancelled() for r in shards)
    assert STAGE_DEPLOYMENTS["aggregate_vstar"] not in children
    client = MlflowClient(stack["mlflow"])
    [pipeline] = client.search_runs([client.get_experiment_by_name("apo").experiment_id],
                                    filter_string="tags.`apo.run_id` = 'cancelled' and tags.`apo.role` = 'pipeline'")
    assert pipeline.info.status == "KILLED" and pipeline.data.tags.get("apo.failure"), pipeline.data.tags
