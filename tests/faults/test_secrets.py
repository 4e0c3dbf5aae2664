"""A whole run with recognisable fake credentials in its environment (S3 keys for the moto
endpoint, an MLflow token sent to a real MLflow server, a hub token), then a scan of everything
the run left behind: its stdout/stderr, every Prefect log line, every MLflow param, tag, metric
name and artifact, and every file under the artifact root. None may hold a secret."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from tests.test_flow import tiny_config

RUN_ID = "secrets-scan"
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAAPOFAKEKEYID7731",
    "AWS_SECRET_ACCESS_KEY": "apoFakeAwsSecret/kq93Lx0vP2w8Rt",
    "MLFLOW_TRACKING_TOKEN": "apo-fake-mlflow-token-5d1e9c",
    "HF_TOKEN": "hf_apoFakeHubToken9931zz",
    "AWS_SESSION_TOKEN": "apoFakeSessionToken+0Q8/x",
}


def find_secrets(where: str, blob: bytes | str, found: list[str]) -> None:
    data = blob.encode("utf-8", "replace") if isinstance(blob, str) else blob
    for name, value in SECRETS.items():
        if value.encode() in data:
            found.append(f"{name} in {where}")


def prefect_logs_since(start: dt.datetime) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTimestamp

    lines: list[str] = []
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_logs(LogFilter(timestamp=LogFilterTimestamp(after_=start)), limit=200, offset=len(lines))
            lines += [f"{log.name}: {log.message}" for log in page]
            if len(page) < 200:
                return lines


def prefect_flow_run_records(start: dt.datetime) -> list[str]:
    """Parameters, names and state messages of the flow and task runs since `start`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterStartTime

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=start)))
        tasks = client.read_task_runs()
    return [json.dumps(r.model_dump(mode="json"), default=str) for r in [*runs, *tasks]]


def test_no_secret_reaches_logs_mlflow_or_artifacts(prefect_api, s3_endpoint, mlflow_server, tiny_model_dir, tmp_path,
                                                   monkeypatch, record_fault):
    import s3fs
    from mlflow.tracking import MlflowClient
    from prefect.settings import PREFECT_API_URL

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)  # moto and the MLflow server accept any credentials
    s3fs.S3FileSystem.clear_instance_cache()
    cfg = tiny_config("s3://apo-test/secrets", tiny_model_dir, **{
        "run_id": RUN_ID, "train.steps": 2, "data.train_size": 16, "data.test_size": 8,
        "tracking.mlflow_tracking_uri": mlflow_server})
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    start = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)

    # the run as a user starts it: the `apo` command in its own process, against the test Prefect API (the prefect_api fixture)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(config_file)], env=env,
                          capture_output=True, timeout=900, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]

    planted: list[str] = []
    find_secrets("a planted line", f"Authorization: Bearer {SECRETS['MLFLOW_TRACKING_TOKEN']}", planted)
    assert planted == ["MLFLOW_TRACKING_TOKEN in a planted line"]  # the scanner does find a secret where one is

    found: list[str] = []
    scanned = {"stdout/stderr bytes": len(proc.stdout) + len(proc.stderr)}
    find_secrets("stdout", proc.stdout, found)
    find_secrets("stderr", proc.stderr, found)

    logs = prefect_logs_since(start)
    assert any(f"run {RUN_ID}" in line for line in logs), "the scan did not see the run's own Prefect logs"
    scanned["Prefect log lines"] = len(logs)
    for line in logs:
        find_secrets("a Prefect log", line, found)
    records = prefect_flow_run_records(start)
    scanned["Prefect flow/task run records"] = len(records)
    for record in records:
        find_secrets("a Prefect flow/task run record", record, found)

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], f"tags.`apo.run_id` = '{RUN_ID}'")
    assert len(runs) == 6  # the pipeline run and its 5 stage runs
    assert any(r.data.params.get("train.steps") == "2" for r in runs)  # the resolved config is there to scan
    artifact_files = 0
    for run in runs:
        for key, value in run.data.params.items():
            find_secrets(f"MLflow param {key}", f"{key}={value}", found)
        for key, value in run.data.tags.items():
            find_secrets(f"MLflow tag {key}", f"{key}={value}", found)
        for key in run.data.metrics:
            find_secrets("an MLflow metric name", key, found)
        local = client.download_artifacts(run.info.run_id, "", tempfile.mkdtemp(dir=tmp_path))
        for path in Path(local).rglob("*"):
            if path.is_file():
                artifact_files += 1
                find_secrets(f"MLflow artifact {path.name}", path.read_bytes(), found)
    scanned["MLflow runs"], scanned["MLflow artifact files"] = len(runs), artifact_files
    assert artifact_files >= 5

    fs = s3fs.S3FileSystem()
    files = fs.find(f"apo-test/secrets/{RUN_ID}")
    names = {f.rsplit("/", 1)[-1] for f in files}
    assert {"summary.json", "config.json", "_COMPLETE.json", "model.safetensors"} <= names
    for path in files:
        find_secrets(path, fs.cat_file(path), found)
    scanned["artifact-root files"] = len(files)

    assert found == [], f"secrets leaked: {found}"
    record_fault("secrets", "run (`apo run` in its own process) with fake AWS keys + session token, MLFLOW_TRACKING_TOKEN "
                            "(sent to a real MLflow server) and HF_TOKEN in the environment",
                 "none found in " + ", ".join(f"{v} {k}" for k, v in scanned.items()) + " (params, tags, metric names included)")
    s3fs.S3FileSystem.clear_instance_cache()
