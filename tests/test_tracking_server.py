"""The pipeline against a shared MLflow tracking server over HTTP (the `mlflow_server` fixture:
runs and registry in the server's SQLite, artifacts in the S3 bucket), with its artifact root in
the same bucket. What the server shows is read through its REST API, what was stored from the
bucket itself."""

import json

import requests

from tests.test_flow import STAGE_FILES

SECRETS = ("apo-test-secret", "apo-test-key")  # the keys the s3_endpoint fixture puts in the environment


def rest(server, method, endpoint, **kwargs):
    reply = requests.request(method, f"{server}/api/2.0/mlflow/{endpoint}", timeout=30, **kwargs)
    assert reply.ok, f"{endpoint}: {reply.status_code} {reply.text[:300]}"
    return reply.json()


def as_dict(pairs):
    return {p["key"]: p["value"] for p in pairs or []}


def test_server_shows_the_parent_and_one_nested_run_per_stage(served_run, mlflow_server):
    experiment = rest(mlflow_server, "GET", "experiments/get-by-name", params={"experiment_name": "apo"})["experiment"]
    runs = rest(mlflow_server, "POST", "runs/search", json={
        "experiment_ids": [experiment["experiment_id"]], "filter": "tags.`apo.run_id` = 'served'"})["runs"]
    parents = [r for r in runs if as_dict(r["data"].get("tags")).get("apo.role") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent["info"]["run_id"] == served_run["mlflow_run_id"] and parent["info"]["status"] == "FINISHED"
    assert as_dict(parent["data"].get("params"))["train.steps"] == "2"
    assert "eval/trained_accuracy" in {m["key"] for m in parent["data"]["metrics"]}
    children = [r for r in runs if as_dict(r["data"].get("tags")).get("mlflow.parentRunId") == parent["info"]["run_id"]]
    stages = sorted(as_dict(r["data"]["tags"])["apo.stage"] for r in children)
    assert stages == sorted(STAGE_FILES)
    assert all(r["info"]["status"] == "FINISHED" for r in children)
    train = next(r for r in children if as_dict(r["data"]["tags"])["apo.stage"] == "train_online")
    history = rest(mlflow_server, "GET", "metrics/get-history", params={"run_id": train["info"]["run_id"], "metric_key": "train/loss"})
    assert [m["step"] for m in history["metrics"]] == [1, 2]


def test_mlflow_artifacts_are_objects_in_the_bucket(served_run, mlflow_server):
    """--no-serve-artifacts: the server hands out s3:// locations and the pipeline wrote there itself."""
    import s3fs

    fs = s3fs.S3FileSystem()
    runs = {"parent": served_run["mlflow_run_id"], **served_run["mlflow_stage_runs"]}
    where = {name: rest(mlflow_server, "GET", "runs/get", params={"run_id": run_id})["run"]["info"]["artifact_uri"]
             for name, run_id in runs.items()}
    assert all(uri.startswith("s3://apo-test/mlflow/") for uri in where.values()), where
    expected = {"parent": ("summary.json", "config.json", "figures/stages.png"), "train_online": ("train_samples.json",),
                "evaluate": ("eval_results.json",)}
    for name, files in expected.items():
        for file in files:
            assert fs.exists(f"{where[name].removeprefix('s3://')}/{file}"), (name, file)
    (output,) = rest(mlflow_server, "GET", "runs/get", params={"run_id": runs["train_online"]})["run"]["outputs"]["model_outputs"]
    model_uri = rest(mlflow_server, "GET", f"logged-models/{output['model_id']}")["model"]["info"]["artifact_uri"]
    assert fs.exists(f"{model_uri.removeprefix('s3://')}/model/model.safetensors")  # the logged model's one copy
    assert not fs.exists(f"{where['train_online'].removeprefix('s3://')}/model")
    summary = fs.cat_file(f"{where['parent'].removeprefix('s3://')}/summary.json")
    assert b'"run_id": "served"' in summary
    # listing through the server works too (the client lists the bucket with the location it was given)
    from mlflow.tracking import MlflowClient

    assert {"summary.json", "config.json"} <= {a.path for a in MlflowClient(mlflow_server).list_artifacts(runs["parent"])}


def test_stage_artifacts_are_under_the_artifact_root(served_run):
    import s3fs

    fs = s3fs.S3FileSystem()
    for stage, (name, _) in STAGE_FILES.items():
        assert fs.exists(f"apo-test/served/served/{stage}/{name}"), stage
        assert fs.exists(f"apo-test/served/served/{stage}/_COMPLETE.json"), stage
    assert fs.exists("apo-test/served/served/summary.json")
    assert served_run["artifacts"]["train_online"] == "s3://apo-test/served/served/train_online"


def test_no_aws_secret_reaches_mlflow_params_or_tags(served_run, mlflow_server):
    import s3fs

    runs = {"parent": served_run["mlflow_run_id"], **served_run["mlflow_stage_runs"]}
    for name, run_id in runs.items():
        data = rest(mlflow_server, "GET", "runs/get", params={"run_id": run_id})["run"]["data"]
        for key, value in {**as_dict(data.get("params")), **as_dict(data.get("tags"))}.items():
            assert not any(s in key or s in value for s in SECRETS), (name, key)
    fs = s3fs.S3FileSystem()
    for path in fs.find("apo-test/mlflow"):
        if path.endswith((".json", ".yaml", ".txt")):
            assert not any(s.encode() in fs.cat_file(path) for s in SECRETS), path


def test_the_model_is_registered_on_the_server_from_the_bucket(served_run, mlflow_server):
    alias = rest(mlflow_server, "GET", "registered-models/alias", params={"name": "served-model", "alias": "champion"})
    version = alias["model_version"]
    assert version["version"] == "1" and version["run_id"] == served_run["mlflow_run_id"]
    (output,) = rest(mlflow_server, "GET", "runs/get", params={"run_id": served_run["mlflow_stage_runs"]["train_online"]})[
        "run"]["outputs"]["model_outputs"]
    assert version["source"] == f"models:/{output['model_id']}"  # the logged model: MLflow's one copy of the weights
    assert served_run["registry"]["decision"] == "first"
    tags = as_dict(version.get("tags"))
    assert float(tags["apo.score.heldout"]) == served_run["trained_accuracy"]


def test_review_surfaces_through_the_rest_api(served_run, mlflow_server, prefect_ui):
    """What MLflow's UI reads, through the server's REST API: the experiment kind, the run's
    description and sources, dataset inputs with digests, the logged model (and loading it back),
    figures, the per-prompt table, system metrics; and the Prefect artifacts of the flow run."""
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    experiment = rest(mlflow_server, "GET", "experiments/get-by-name", params={"experiment_name": "apo"})["experiment"]
    assert as_dict(experiment.get("tags"))["mlflow.experimentKind"] == "finetuning"
    parent = rest(mlflow_server, "GET", "runs/get", params={"run_id": served_run["mlflow_run_id"]})["run"]
    tags = as_dict(parent["data"]["tags"])
    first = tags["mlflow.note.content"].splitlines()[0]
    assert first == (f"Held-out accuracy: reference {100 * served_run['reference_accuracy']:.1f}% -> "
                     f"trained {100 * served_run['trained_accuracy']:.1f}%")
    assert tags["mlflow.source.name"] == "flows/apo.py:apo" and tags["apo.prefect.flow_run_id"]
    inputs = {d["dataset"]["name"]: d for d in parent["inputs"]["dataset_inputs"]}
    assert {"train", "test", "reference_samples", "vstar"} <= set(inputs)
    assert inputs["train"]["dataset"]["digest"] == served_run["data_version"]["train"][:16]
    assert inputs["vstar"]["dataset"]["source_type"] == "s3"
    assert as_dict(inputs["train"].get("tags"))["mlflow.data.context"] == "training"

    stage_runs = served_run["mlflow_stage_runs"]
    train = rest(mlflow_server, "GET", "runs/get", params={"run_id": stage_runs["train_online"]})["run"]
    (output,) = train["outputs"]["model_outputs"]
    assert [o["model_id"] for o in parent["outputs"]["model_outputs"]] == [output["model_id"]]
    model = rest(mlflow_server, "GET", f"logged-models/{output['model_id']}")["model"]
    assert model["info"]["source_run_id"] == stage_runs["train_online"]
    assert model["info"]["status"] == "LOGGED_MODEL_READY"
    assert model["info"]["artifact_uri"].startswith("s3://apo-test/mlflow/")
    with _use_tracking_uri(mlflow_server):
        pipe = mlflow.transformers.load_model(f"models:/{output['model_id']}")
    assert pipe.model.config.hidden_size == 64  # the tiny model it trained

    listed = rest(mlflow_server, "GET", "artifacts/list", params={"run_id": parent["info"]["run_id"], "path": "figures"})
    assert {f["path"] for f in listed["files"]} == {f"figures/{n}.png" for n in ("stages", "vstar", "training", "accuracy")}
    listed = rest(mlflow_server, "GET", "artifacts/list", params={"run_id": stage_runs["evaluate"]})
    assert "eval_results.json" in {f["path"] for f in listed["files"]}
    for stage in ("sample_reference", "train_online"):
        metrics = rest(mlflow_server, "GET", "runs/get", params={"run_id": stage_runs[stage]})["run"]["data"]["metrics"]
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= {m["key"] for m in metrics}, stage

    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    import asyncio

    async def artifacts():
        async with PrefectClient(f"{prefect_ui}/api") as client:  # the server served_run ran on
            return await client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[tags["apo.prefect.flow_run_id"]])))

    by_type = {}
    for artifact in asyncio.run(artifacts()):
        by_type.setdefault(artifact.type, []).append(artifact)
    (summary,) = [a for a in by_type["markdown"] if a.key == "apo-summary-served"]
    assert first in summary.data and "| stage | status | seconds | peak RSS (MB) |" in summary.data
    assert f"/#/experiments/{experiment['experiment_id']}/runs/{parent['info']['run_id']}" in summary.data
    (times,) = [a for a in by_type["table"] if a.key == "apo-stage-times-served"]
    assert [row["stage"] for row in json.loads(times.data)] == list(served_run["stage_seconds"])
    (link,) = [a for a in by_type["markdown"] if a.key == "apo-mlflow-served"]  # Prefect stores links as markdown
    assert f"/runs/{parent['info']['run_id']})" in link.data
    progress = {a.description.split(":")[0]: a.data for a in by_type["progress"]}
    assert progress == {"sample_reference": 100.0, "train_online": 100.0}
