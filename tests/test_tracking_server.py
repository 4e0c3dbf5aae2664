"""The pipeline against a shared MLflow tracking server over HTTP (the `mlflow_server` fixture:
runs and registry in the server's SQLite, artifacts in the S3 bucket), with its artifact root in
the same bucket. What the server shows is read through its REST API, what was stored from the
bucket itself."""

import pytest
import requests

from tests.test_flow import STAGE_FILES, tiny_config

SECRETS = ("apo-test-secret", "apo-test-key")  # the keys the s3_endpoint fixture puts in the environment


def rest(server, method, endpoint, **kwargs):
    reply = requests.request(method, f"{server}/api/2.0/mlflow/{endpoint}", timeout=30, **kwargs)
    assert reply.ok, f"{endpoint}: {reply.status_code} {reply.text[:300]}"
    return reply.json()


def as_dict(pairs):
    return {p["key"]: p["value"] for p in pairs or []}


@pytest.fixture(scope="module")
def server_run(prefect_api, mlflow_server, tiny_model_dir):
    from flows.apo import apo

    cfg = tiny_config("s3://apo-test/served", tiny_model_dir, **{
        "run_id": "served", "train.steps": 2, "tracking.mlflow_tracking_uri": mlflow_server,
        "registry.enabled": "true", "registry.model_name": "served-model"})
    return apo(config=cfg)


def test_server_shows_the_parent_and_one_nested_run_per_stage(server_run, mlflow_server):
    experiment = rest(mlflow_server, "GET", "experiments/get-by-name", params={"experiment_name": "apo"})["experiment"]
    runs = rest(mlflow_server, "POST", "runs/search", json={
        "experiment_ids": [experiment["experiment_id"]], "filter": "tags.`apo.run_id` = 'served'"})["runs"]
    parents = [r for r in runs if as_dict(r["data"].get("tags")).get("apo.role") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent["info"]["run_id"] == server_run["mlflow_run_id"] and parent["info"]["status"] == "FINISHED"
    assert as_dict(parent["data"].get("params"))["train.steps"] == "2"
    assert "eval/trained_accuracy" in {m["key"] for m in parent["data"]["metrics"]}
    children = [r for r in runs if as_dict(r["data"].get("tags")).get("mlflow.parentRunId") == parent["info"]["run_id"]]
    stages = sorted(as_dict(r["data"]["tags"])["apo.stage"] for r in children)
    assert stages == sorted(STAGE_FILES)
    assert all(r["info"]["status"] == "FINISHED" for r in children)
    train = next(r for r in children if as_dict(r["data"]["tags"])["apo.stage"] == "train_online")
    history = rest(mlflow_server, "GET", "metrics/get-history", params={"run_id": train["info"]["run_id"], "metric_key": "train/loss"})
    assert [m["step"] for m in history["metrics"]] == [1, 2]


def test_mlflow_artifacts_are_objects_in_the_bucket(server_run, mlflow_server):
    """--no-serve-artifacts: the server hands out s3:// locations and the pipeline wrote there itself."""
    import s3fs

    fs = s3fs.S3FileSystem()
    runs = {"parent": server_run["mlflow_run_id"], **server_run["mlflow_stage_runs"]}
    where = {name: rest(mlflow_server, "GET", "runs/get", params={"run_id": run_id})["run"]["info"]["artifact_uri"]
             for name, run_id in runs.items()}
    assert all(uri.startswith("s3://apo-test/mlflow/") for uri in where.values()), where
    expected = {"parent": ("summary.json", "config.json"), "train_online": ("train_samples.json", "model/model.safetensors"),
                "evaluate": ("eval_results.json",)}
    for name, files in expected.items():
        for file in files:
            assert fs.exists(f"{where[name].removeprefix('s3://')}/{file}"), (name, file)
    summary = fs.cat_file(f"{where['parent'].removeprefix('s3://')}/summary.json")
    assert b'"run_id": "served"' in summary
    # listing through the server works too (the client lists the bucket with the location it was given)
    from mlflow.tracking import MlflowClient

    assert {"summary.json", "config.json"} <= {a.path for a in MlflowClient(mlflow_server).list_artifacts(runs["parent"])}


def test_stage_artifacts_are_under_the_artifact_root(server_run):
    import s3fs

    fs = s3fs.S3FileSystem()
    for stage, (name, _) in STAGE_FILES.items():
        assert fs.exists(f"apo-test/served/served/{stage}/{name}"), stage
        assert fs.exists(f"apo-test/served/served/{stage}/_COMPLETE.json"), stage
    assert fs.exists("apo-test/served/served/summary.json")
    assert server_run["artifacts"]["train_online"] == "s3://apo-test/served/served/train_online"


def test_no_aws_secret_reaches_mlflow_params_or_tags(server_run, mlflow_server):
    import s3fs

    runs = {"parent": server_run["mlflow_run_id"], **server_run["mlflow_stage_runs"]}
    for name, run_id in runs.items():
        data = rest(mlflow_server, "GET", "runs/get", params={"run_id": run_id})["run"]["data"]
        for key, value in {**as_dict(data.get("params")), **as_dict(data.get("tags"))}.items():
            assert not any(s in key or s in value for s in SECRETS), (name, key)
    fs = s3fs.S3FileSystem()
    for path in fs.find("apo-test/mlflow"):
        if path.endswith((".json", ".yaml", ".txt")):
            assert not any(s.encode() in fs.cat_file(path) for s in SECRETS), path


def test_the_model_is_registered_on_the_server_from_the_bucket(server_run, mlflow_server):
    alias = rest(mlflow_server, "GET", "registered-models/alias", params={"name": "served-model", "alias": "champion"})
    version = alias["model_version"]
    assert version["version"] == "1" and version["run_id"] == server_run["mlflow_run_id"]
    assert version["source"] == "s3://apo-test/served/served/train_online/model"  # the artifact root's copy, not a second upload
    assert server_run["registry"]["decision"] == "first"
    tags = as_dict(version.get("tags"))
    assert float(tags["apo.score.heldout"]) == server_run["trained_accuracy"]
