"""The one config object of a pipeline run: typed, documented per field, validated at load.

Every stage reads its own section; the whole resolved object is stored with each run.
``load_config`` turns any validation failure into one line that names the field.
"""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that cannot run; the message is one line naming the field and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class DataConfig(_Section):
    name: Literal["embedded"] = "embedded"
    """Prompt set: `embedded` is the synthetic multi-step arithmetic task shipped with apo."""
    train_size: int = Field(1024, ge=1)
    """Training prompts (stage 1 samples each N times; stage 2 regresses on them)."""
    test_size: int = Field(500, ge=1)
    """Held-out prompts for evaluation, never seen in training."""
    seed: int = 0
    """Seed of the prompt generator / shuffle."""


class ModelConfig(_Section):
    path: str = "embedded"
    """Reference model: `embedded` (the tiny Qwen2 shipped in apo_core/assets), a local directory, or a hub id."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype for training (master weights)."""
    device: str = "auto"
    """torch device: `auto` picks cuda when present, else cpu."""
    num_threads: int = Field(0, ge=0)
    """torch intra-op threads on CPU; 0 leaves torch's default."""


class GenerationConfig(_Section):
    engine: Literal["transformers"] = "transformers"
    """Generation backend; transformers batched `generate` (vLLM plugs in behind the same interface)."""
    batch_size: int = Field(512, ge=1)
    """Prompts per generate call."""
    autocast_bf16: bool = True
    """Run generation under bfloat16 autocast on CPU (AMX) while weights stay float32."""


class ReferenceConfig(_Section):
    n_samples: int = Field(8, ge=1)
    """N: reference samples per training prompt."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature for reference samples."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling for reference samples."""
    max_new_tokens: int = Field(96, ge=1)
    """Longest reference response (paper: 1024)."""
    seed: int = 1234
    """Base seed; sample index i uses seed + i."""


class VstarConfig(_Section):
    beta1: float = Field(0.5, ge=0)
    """beta1 of V* = beta1 * (logsumexp(r/beta1) - log N); 0 means the mean reward."""
    filter_all_zero: bool = False
    """Drop prompts whose N reference rewards are all 0 (count reported)."""


class TrainConfig(_Section):
    steps: int = Field(200, ge=0)
    """Rollout steps: each samples ONE response for each of `rollout_batch_size` prompts."""
    rollout_batch_size: int = Field(64, ge=1)
    """Prompts per rollout step (paper: 256)."""
    minibatch_size: int = Field(64, ge=1)
    """Prompts per optimizer step (paper: 128); must divide rollout_batch_size."""
    beta2: float = Field(1e-3, gt=0)
    """beta2: weight of the log-ratio in the regression (paper: 1e-3)."""
    lr: float = Field(3e-5, gt=0)
    """AdamW learning rate, constant (paper: 1e-6 on Qwen2.5)."""
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    """AdamW beta1."""
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    """AdamW beta2."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay."""
    grad_clip: float = Field(1.0, gt=0)
    """Max global grad norm."""
    entropy_coef: float = Field(0.0, ge=0)
    """Optional entropy bonus (paper: 1e-3 when used)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the on-policy responses."""
    max_new_tokens: int = Field(96, ge=1)
    """Longest on-policy response."""
    checkpoint_every: int = Field(20, ge=1)
    """Save a resumable checkpoint every this many rollout steps (and at the end)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept on disk (oldest deleted first)."""
    seed: int = 0
    """Seed for prompt order and sampling."""

    @model_validator(mode="after")
    def _divides(self) -> "TrainConfig":
        if self.rollout_batch_size % self.minibatch_size:
            raise ValueError(
                f"minibatch_size ({self.minibatch_size}) must divide rollout_batch_size ({self.rollout_batch_size})"
            )
        return self


class EvalConfig(_Section):
    max_new_tokens: int = Field(96, ge=1)
    """Longest evaluation response."""
    evaluate_reference: bool = True
    """Also evaluate the reference model, so the summary shows the gain."""


class TrackingConfig(_Section):
    mlflow_tracking_uri: str | None = None
    """MLflow tracking URI; None means a SQLite store under a local artifact_root."""
    experiment: str = "apo"
    """MLflow experiment name."""


_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ApoConfig(_Section):
    """A whole A*-PO pipeline run."""

    run_id: str | None = None
    """Run id: artifacts go under <artifact_root>/<run_id>/; re-using one resumes it. None: a timestamp."""
    artifact_root: str = "./.apo"
    """Where stages exchange Parquet: a local folder or any fsspec URI (s3://bucket/prefix)."""
    reward: Literal["embedded", "gsm8k"] = "embedded"
    """Verifier that scores responses (see apo_core.rewards)."""
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    vstar: VstarConfig = Field(default_factory=VstarConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _run_id_ok(self) -> "ApoConfig":
        if self.run_id is not None and not _RUN_ID.match(self.run_id):
            raise ValueError(f"run_id {self.run_id!r} must match {_RUN_ID.pattern}")
        return self

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
        set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    try:
        return ApoConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None
