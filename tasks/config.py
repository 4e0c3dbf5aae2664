"""The pipeline's config: the `apo` flow's one parameter, typed, documented per field, validated at load.

The algorithm's and the model's sections come from apo_core.config; storage, tracking, the model
registry and orchestration are the pipeline's own. Fields are ordered as a person fills Prefect's
parameter form: what to run first, where and how it runs last. Every stage reads its own section;
the whole resolved object is stored with each run. ``load_config`` turns any validation failure
into one line that names the field.
"""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from apo_core.config import (DataConfig, EvalConfig, GenerationConfig, ModelConfig, ReferenceConfig, Section,
                             TrainConfig, VstarConfig)
from apo_core.data import reward_of
from apo_core.rewards import REWARDS


class ConfigError(ValueError):
    """A config that cannot run; the message is one line naming the field and the fix."""


class TrackingConfig(Section):
    mlflow_tracking_uri: str | None = None
    """MLflow tracking URI; None means a SQLite store under a local artifact_root."""
    experiment: str = "apo"
    """MLflow experiment name."""
    system_metrics_interval_s: float = Field(10.0, ge=0)
    """Seconds between system-metric samples (CPU, memory, disk, network; GPU where present) logged to every stage's MLflow run as system/*; 0 turns them off."""


class StorageConfig(Section):
    attempts: int = Field(6, ge=1)
    """Tries per artifact-storage operation (read, write, list, remove, upload, download), the first included; only transient errors (connection refused/reset, timeouts, HTTP 5xx, throttling) are retried. Credentials never go here: s3fs reads them from the environment."""
    base_delay_s: float = Field(0.5, ge=0)
    """Sleep before the first retry, doubled before each next one (with jitter)."""
    max_delay_s: float = Field(60.0, ge=0)
    """Bound on the total sleep of one operation across its retries; then the stage fails with one line naming the operation and URI, and publishes nothing."""


class RegistryConfig(Section):
    enabled: bool = False
    """After evaluate, register the trained model (its folder in the artifact root, no second upload) as a new version of `model_name` in the MLflow model registry, with the parent run as its run."""
    model_name: str = Field("apo", min_length=1)
    """Registered model name the versions go to (one name per task/model family you promote between)."""
    benchmark: str = "heldout"
    """Score that decides the `champion` alias: greedy accuracy of the trained model on `heldout` (the run's own held-out split) or on one of eval.benchmarks (by name, e.g. math500)."""
    min_improvement: float = Field(0.0, ge=0)
    """The new version becomes `champion` only when its score exceeds the champion's by more than this (accuracy, 0.01 = one point); a tie never moves the alias. No champion yet: the new version becomes it."""


def _deployment_name(value: str) -> str:
    flow_name, sep, name = value.partition("/")
    if not sep or not flow_name or not name or "/" in name:
        raise ValueError(f"deployment {value!r} must look like <flow name>/<deployment name>, e.g. apo-preprocess/apo-cpu")
    return value


class StageDeployments(Section):
    preprocess: str = "apo-preprocess/apo-cpu"
    """Deployment that runs preprocess, written as flow name/deployment name from prefect.yaml; a CPU pool."""
    sample_reference: str = "apo-sample-reference-shard/apo-gpu"
    """Deployment that runs ONE shard group of stage 1; the apo flow submits `reference.shards` of them at once (GPU pool, bounded by the deployment's concurrency limit)."""
    aggregate_vstar: str = "apo-aggregate-vstar/apo-cpu"
    """Deployment that runs aggregate_vstar; a CPU pool."""
    train_online: str = "apo-train-online/apo-gpu"
    """Deployment that runs train_online; a GPU pool."""
    evaluate: str = "apo-evaluate/apo-gpu"
    """Deployment that runs evaluate; a GPU pool."""

    @field_validator("*")
    @classmethod
    def _names_ok(cls, value: str) -> str:
        return _deployment_name(value)


class OrchestrationConfig(Section):
    deployments: StageDeployments = Field(default_factory=StageDeployments)
    """Which deployment each stage is submitted to under `execution: work-pool` (pools: apo-cpu, apo-gpu in prefect.yaml)."""
    stage_timeout_s: float = Field(86400.0, gt=0)
    """Longest wait for a stage's flow run(s); past it they are cancelled and the pipeline fails naming the stage."""
    poll_s: float = Field(2.0, gt=0)
    """Seconds between state checks of the submitted stage flow runs."""
    lease_ttl_s: float = Field(120.0, ge=5)
    """Life of the run's lease (one writer per run id) without renewal; the holder renews it every quarter of this. A second process for the run id stops at once while the holder lives; a holder on another host that vanished is taken over after this long (one on the same host at once)."""


_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ReferenceSettings(ReferenceConfig):
    store: str | None = None
    """Reference-sample store shared by every run (any fsspec URI): samples are kept under a digest of the model, tokenizer, dtype, engine, prompt, gold answer, verifier version, sampling settings and seed, and stage 1 draws only those no earlier run drew. None: the `_reference` folder of `artifact_root`."""

    def store_uri(self, artifact_root: str) -> str:
        return self.store or artifact_root.rstrip("/") + "/_reference"


class ApoConfig(Section):
    """A whole A*-PO pipeline run."""

    run_id: str | None = None
    """Run id: the run's artifacts go in a folder of this name under `artifact_root`; re-using one resumes it. None: a timestamp."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Prompt set: the training prompts and the held-out split."""
    reward: Literal[("auto", *sorted(REWARDS))] = "auto"  # type: ignore[valid-type]
    """Verifier that scores responses (apo_core.rewards); `auto`: the data set's own (gsm8k for gsm8k and custom, math for the MATH family)."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """Reference model, which is also the policy's starting point."""
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    """Generation engine of every stage that samples."""
    reference: ReferenceSettings = Field(default_factory=ReferenceSettings)
    """Stage 1: N reference samples per training prompt."""
    vstar: VstarConfig = Field(default_factory=VstarConfig)
    """V* per prompt from the reference rewards, and the all-zero filter."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Stage 2: on-policy least-squares regression, one sample per prompt."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Held-out accuracy of the trained (and the reference) model, and extra benchmarks."""
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    """MLflow model registry: register the trained model after evaluate and move the `champion` alias only when it wins."""
    artifact_root: str = "./.apo"
    """Where stages exchange Parquet: a local folder or any fsspec URI (s3://bucket/prefix)."""
    storage: StorageConfig = Field(default_factory=StorageConfig)
    """Retries of artifact-storage operations."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """MLflow tracking server and experiment."""
    execution: Literal["local", "work-pool"] = "local"
    """Where stages run: `local` in the apo flow's own process; `work-pool`: each stage as its own Prefect flow run on its work pool (deployments in prefect.yaml, see `orchestration`), stage 1 as `reference.shards` flow runs at once. Artifacts must then be where every worker can reach them (s3://..., or a folder all workers share)."""
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)
    """How `execution: work-pool` submits and waits for the stage flow runs."""

    @model_validator(mode="after")
    def _run_id_ok(self) -> "ApoConfig":
        if self.run_id is not None and not _RUN_ID.match(self.run_id):
            raise ValueError(f"run_id {self.run_id!r} must match {_RUN_ID.pattern}")
        return self

    @model_validator(mode="after")
    def _registry_ok(self) -> "ApoConfig":
        names = ["heldout", *(entry.split("=", 1)[0] for entry in self.eval.benchmarks)]
        if self.registry.benchmark not in names:
            raise ValueError(f"registry.benchmark {self.registry.benchmark!r} is not evaluated; valid: {', '.join(names)} (add it to eval.benchmarks)")
        remote_tracking = (self.tracking.mlflow_tracking_uri or "").startswith(("http://", "https://"))
        if self.registry.enabled and remote_tracking and ("://" not in self.artifact_root or self.artifact_root.startswith("file://")):
            # an MLflow server refuses model versions whose source is a path on the client's disk
            raise ValueError("registry.enabled with an MLflow server needs an artifact_root the server accepts as a model source (s3://..., gs://...), not a local folder")
        return self

    @property
    def reward_name(self) -> str:
        """The verifier actually used (resolves `auto`)."""
        return reward_of(self.data.name) if self.reward == "auto" else self.reward

    def with_run_id(self) -> "ApoConfig":
        """This config with run_id filled in (a UTC timestamp when unset)."""
        if self.run_id:
            return self
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        return self.model_copy(update={"run_id": f"run-{stamp}"})




def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        section: Any = ApoConfig
        for part in first["loc"][:-1]:
            section = section.model_fields[str(part)].annotation
        valid = ", ".join(section.model_fields)
        return f"config: unknown key {where!r}; valid keys here: {valid}"
    msg = first["msg"].replace("Value error, ", "")
    got = first.get("input")
    shown = "" if isinstance(got, (dict, type(None))) else f" (got {got!r})"
    more = f" [+{len(error.errors()) - 1} more]" if len(error.errors()) > 1 else ""
    return f"config: {where + ': ' if where else ''}{msg}{shown}{more}"


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """tree['a']['b'] = value for key 'a.b', creating sections as needed."""
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config: {key!r}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value


def _parse_value(raw: str) -> Any:
    """A --set value: YAML scalars and lists (1e-5, true, null, [a, b]); anything YAML reads as a
    mapping, such as a template "Q: {question}", stays the string it was written as."""
    if not raw.strip():
        return None
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    return raw if isinstance(value, dict) else value


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    base: Mapping[str, Any] | None = None,
) -> ApoConfig:
    """Config from an optional YAML file, then ``key=value`` overrides (values parsed as YAML)."""
    tree: dict[str, Any] = dict(base or {})
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"config: cannot read {path}: {exc}".splitlines()[0]) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config: {path} must hold a mapping at top level")
        tree.update(loaded)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"config: override {item!r} must look like key=value (e.g. train.lr=1e-5)")
        set_dotted(tree, key.strip(), _parse_value(raw))
    try:
        return ApoConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None
