"""MLflow tracking through explicit run ids (MlflowClient), so any thread or process of a
pipeline run can log into its parent run and its own stage run.

Layout: experiment `apo` (tagged as model training, so MLflow's UI opens it on runs and charts);
one parent run per pipeline run (tag apo.run_id, resolved config as params and config.json, the
run's summary as its description); one nested run per stage, named after the stage. Data sets are
dataset inputs of the runs that read them, the trained model a logged model (transformers flavour)
of train_online and the parent run.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from .config import ApoConfig

from . import storage

RUN_ID_TAG = "apo.run_id"
STAGE_TAG = "apo.stage"
ROLE_TAG = "apo.role"  # "pipeline" on parent runs, "stage" on nested ones
DESCRIPTION_TAG = "mlflow.note.content"  # the run page's description (markdown)
# MLflow 3.17's UI opens an experiment without this tag in its GenAI view (traces, judges, prompts)
EXPERIMENT_KIND = ("mlflow.experimentKind", "finetuning")
DIGEST_CHARS = 16  # of a sha256 hex digest, as a dataset digest (MLflow keeps at most 36 characters)


@dataclass(frozen=True)
class DatasetRef:
    """A table as an MLflow dataset input: its name, the digest of its content, where it lives,
    its rows and columns, and the run's use of it (`context`: training, evaluation, ...)."""

    name: str
    digest: str
    source: str
    rows: int
    columns: dict[str, str]  # column -> polars dtype name
    context: str

    @classmethod
    def of_frame(cls, name: str, digest: str, source: str, frame, context: str) -> "DatasetRef":
        return cls(name, digest[:DIGEST_CHARS], source, frame.height, {c: str(t) for c, t in frame.schema.items()}, context)


_MLFLOW_TYPES = {"String": "string", "Int64": "long", "Int32": "integer", "Float64": "double", "Float32": "float",
                 "Boolean": "boolean"}


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


FAILURE_TAG = "apo.failure"  # why a run ended FAILED or KILLED, in one line


def stopped_from_outside(exc: BaseException) -> bool:
    """True when `exc` is a stop from outside the work (SIGTERM, Ctrl-C, a Prefect cancellation, a
    lost run lease) rather than a failure of it."""
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"KeyboardInterrupt", "SystemExit", "TerminationSignal", "CancelledError", "Abort",
                         "LeaseLost", "RunCancelled", "Preempted"})


def failure_reason(exc: BaseException) -> str:
    """`exc` in one line: its type and message, or the signal's name for a signal.

    >>> failure_reason(ValueError("bad\\nvalue")), failure_reason(KeyboardInterrupt())
    ('ValueError: bad', 'KeyboardInterrupt')
    """
    import signal

    text = str(exc).strip()
    if not text and isinstance(getattr(exc, "signal", None), int):
        text = f"{signal.Signals(exc.signal).name} received"
    return (f"{type(exc).__name__}: {text}" if text else type(exc).__name__).splitlines()[0][:500]


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
        if found is None or found.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
            self.client.set_experiment_tag(self.experiment_id, *EXPERIMENT_KIND)

    @classmethod
    def for_config(cls, cfg: ApoConfig) -> "Tracker":
        uri = default_tracking_uri(cfg)
        location = None
        if uri.startswith("sqlite:///") and storage.is_local(cfg.artifact_root):
            location = (storage.local_path(cfg.artifact_root) / "mlartifacts").as_uri()
        return cls(uri, cfg.tracking.experiment, location)

    def parent_run(self, cfg: ApoConfig, tags: dict[str, str] | None = None) -> str:
        """The pipeline run for cfg.run_id: reused when it exists (resume), else created; `tags`
        (where the code and the orchestrator run came from) are set either way."""
        existing = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{cfg.run_id}' and tags.`{ROLE_TAG}` = 'pipeline'",
            max_results=1, order_by=["attributes.start_time ASC"]
        )
        if existing:
            run_id = existing[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            if tags:
                self.set_tags(run_id, tags)
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=cfg.run_id,
                                     tags={**(tags or {}), RUN_ID_TAG: cfg.run_id, ROLE_TAG: "pipeline"})
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

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None, model_id: str | None = None,
                    dataset: DatasetRef | None = None) -> None:
        """`model_id` / `dataset`: the logged model and data set the metrics were measured on
        (shown on the model's page)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        on = {"dataset_name": dataset.name, "dataset_digest": dataset.digest} if dataset else {}
        items = [Metric(k, float(v), now, step or 0, model_id=model_id, **on) for k, v in metrics.items()]
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

    def log_figure(self, run_id: str, figure, artifact_file: str) -> None:
        self.client.log_figure(run_id, figure, artifact_file)

    def log_datasets(self, run_id: str, datasets: Sequence[DatasetRef]) -> None:
        """`datasets` as dataset inputs of the run (source, digest, rows, schema; the use as the
        input's context tag)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = []
        for d in datasets:
            schema = {"mlflow_colspec": [{"type": _MLFLOW_TYPES.get(t, "string"), "name": c, "required": True}
                                         for c, t in d.columns.items()]}
            source_type = "s3" if d.source.startswith("s3://") else "local" if "://" not in d.source else "http"
            entity = Dataset(d.name, d.digest, source_type, json.dumps({"uri": d.source}), json.dumps(schema),
                             json.dumps({"num_rows": d.rows}))
            inputs.append(DatasetInput(entity, tags=[InputTag("mlflow.data.context", d.context)]))
        if inputs:
            self.client.log_inputs(run_id, datasets=inputs)

    def log_model(self, run_id: str, folder: Path, also_runs: Sequence[str] = ()) -> str:
        """The transformers checkpoint in `folder` as a logged model `model` of run `run_id`
        (one copy of its files, in the model's artifact location), also shown on `also_runs`;
        returns its id: load it with mlflow.transformers.load_model("models:/<id>")."""
        import huggingface_hub
        import mlflow
        import torch
        import transformers
        from mlflow.entities import LoggedModelOutput
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        model = self.client.create_logged_model(self.experiment_id, name="model", source_run_id=run_id,
                                                tags={ROLE_TAG: "policy"})
        card = huggingface_hub.ModelCard("---\nlicense: other\n---\nA policy trained with A*-PO by apo; its run has the "
                                         "configuration, data sets and evaluation.\n")  # no hub lookup for a card
        requirements = [f"transformers=={transformers.__version__}", f"torch=={torch.__version__.split('+')[0]}"]
        with _use_tracking_uri(self.tracking_uri):  # MLflow's flavour API reads the process-wide URI
            mlflow.transformers.log_model(str(folder), name="model", task="text-generation", run_id=run_id,
                                          model_id=model.model_id, model_card=card, pip_requirements=requirements)
        for other in also_runs:
            self.client.log_outputs(other, [LoggedModelOutput(model.model_id, step=0)])
        return model.model_id

    @contextlib.contextmanager
    def system_metrics(self, run_id: str, interval_s: float) -> Iterator[None]:
        """CPU, memory, disk, network (and GPU where pynvml finds one) as system/* metrics of the
        run every `interval_s` seconds while the block runs; 0: none."""
        if interval_s <= 0:
            yield
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=self.tracking_uri)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()
            if monitor._logging_step == 0:  # the block ended inside the first interval: log the sample taken at its start
                with contextlib.suppress(Exception):
                    monitor.publish_metrics(monitor.aggregate_metrics())
                    monitor.mlflow_logger.flush()

    def end(self, run_id: str, ok: bool = True) -> None:
        self.client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")

    def fail(self, run_id: str, exc: BaseException) -> str:
        """End `run_id` as what `exc` says happened: KILLED for a stop from outside (a signal, a
        cancellation, a lost lease), FAILED otherwise; the reason's first line as tag apo.failure.
        Returns the status. Never raises: the original error is what the caller reports."""
        status = "KILLED" if stopped_from_outside(exc) else "FAILED"
        reason = failure_reason(exc)
        with contextlib.suppress(Exception):
            self.set_tags(run_id, {FAILURE_TAG: reason})
        with contextlib.suppress(Exception):
            self.client.set_terminated(run_id, status=status)
        return status

    # --- model registry (same client, so the registry lives where the runs do) ---

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def model_versions(self, model_name: str, run_id: str) -> list:
        """Versions of `model_name` registered from MLflow run `run_id`, newest first."""
        found = self.client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
        return sorted(found, key=lambda v: int(v.version), reverse=True)

    def all_versions(self, model_name: str) -> list:
        """Every version of `model_name`, oldest first."""
        return sorted(self.client.search_model_versions(f"name = '{model_name}'"), key=lambda v: int(v.version))

    def register_version(self, model_name: str, source: str, run_id: str, tags: dict[str, Any], model_id: str | None = None):
        """A new version of `model_name` pointing at `source` (no copy of the files is made), from
        logged model `model_id` when given; the registered model is created on first use."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(model_name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        with _use_tracking_uri(self.tracking_uri):  # a local registry store resolves models:/<id> through the process-wide URI
            return self.client.create_model_version(model_name, source, run_id=run_id, tags={k: str(v) for k, v in tags.items()},
                                                    model_id=model_id)

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
