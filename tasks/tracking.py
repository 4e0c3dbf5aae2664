"""MLflow tracking through explicit run ids (MlflowClient), so any thread or process of a
pipeline run can log into its parent run and its own stage run.

Layout: experiment `apo`; one parent run per pipeline run (tag apo.run_id, resolved config as
params and config.json); one nested run per stage, named after the stage.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable

from .config import ApoConfig

from . import storage

RUN_ID_TAG = "apo.run_id"
STAGE_TAG = "apo.stage"
ROLE_TAG = "apo.role"  # "pipeline" on parent runs, "stage" on nested ones


def default_tracking_uri(cfg: ApoConfig) -> str:
    if cfg.tracking.mlflow_tracking_uri:
        return cfg.tracking.mlflow_tracking_uri
    if not storage.is_local(cfg.artifact_root):
        raise ValueError("config: tracking.mlflow_tracking_uri must be set when artifact_root is not a local folder")
    root = storage.local_path(cfg.artifact_root)
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def ui_command(tracking_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {tracking_uri} --port 5000"


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


class Tracker:
    def __init__(self, tracking_uri: str, experiment: str = "apo", artifact_location: str | None = None):
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            try:
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_location)
            except Exception:  # created meanwhile by another process
                self.experiment_id = self.client.get_experiment_by_name(experiment).experiment_id
        else:
            self.experiment_id = found.experiment_id

    @classmethod
    def for_config(cls, cfg: ApoConfig) -> "Tracker":
        uri = default_tracking_uri(cfg)
        location = None
        if uri.startswith("sqlite:///") and storage.is_local(cfg.artifact_root):
            location = (storage.local_path(cfg.artifact_root) / "mlartifacts").as_uri()
        return cls(uri, cfg.tracking.experiment, location)

    def parent_run(self, cfg: ApoConfig) -> str:
        """The pipeline run for cfg.run_id: reused when it exists (resume), else created."""
        existing = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{cfg.run_id}' and tags.`{ROLE_TAG}` = 'pipeline'",
            max_results=1, order_by=["attributes.start_time ASC"]
        )
        if existing:
            run_id = existing[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=cfg.run_id, tags={RUN_ID_TAG: cfg.run_id, ROLE_TAG: "pipeline"})
        resolved = cfg.model_dump(mode="json")
        self.log_params(run.info.run_id, flatten(resolved))
        self.client.log_dict(run.info.run_id, resolved, "config.json")
        return run.info.run_id

    def stage_run(self, parent_run_id: str, stage: str, run_id_tag: str) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=stage,
            tags={"mlflow.parentRunId": parent_run_id, STAGE_TAG: stage, RUN_ID_TAG: run_id_tag, ROLE_TAG: "stage"},
        )
        return run.info.run_id

    def stage_runs(self, parent_run_id: str) -> dict[str, str]:
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
        return {r.data.tags.get(STAGE_TAG, r.info.run_name): r.info.run_id for r in runs}

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:500]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i : i + 1000])

    def log_table(self, run_id: str, rows: Iterable[dict], artifact_file: str) -> None:
        rows = list(rows)
        if rows:
            columns = {k: [r.get(k) for r in rows] for k in rows[0]}
            self.client.log_table(run_id, data=columns, artifact_file=artifact_file)

    def log_dict(self, run_id: str, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(run_id, obj, artifact_file)

    def log_artifacts(self, run_id: str, local_dir: Path, artifact_path: str) -> None:
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)

    def end(self, run_id: str, ok: bool = True) -> None:
        self.client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")

    # --- model registry (same client, so the registry lives where the runs do) ---

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def model_versions(self, model_name: str, run_id: str) -> list:
        """Versions of `model_name` registered from MLflow run `run_id`, newest first."""
        found = self.client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
        return sorted(found, key=lambda v: int(v.version), reverse=True)

    def register_version(self, model_name: str, source: str, run_id: str, tags: dict[str, Any]):
        """A new version of `model_name` pointing at `source` (no copy of the files is made);
        the registered model is created on first use."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(model_name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        return self.client.create_model_version(model_name, source, run_id=run_id, tags={k: str(v) for k, v in tags.items()})

    def version_by_alias(self, model_name: str, alias: str):
        """The version holding `alias`, or None when no version does (or the model is not registered yet)."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(model_name, alias)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise

    def set_alias(self, model_name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(model_name, alias, version)

    def set_version_tags(self, model_name: str, version: str, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(model_name, version, key, str(value))
