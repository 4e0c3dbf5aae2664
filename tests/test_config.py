"""Config: defaults, YAML + overrides, and one-line errors that name the field."""

import pytest

from tasks.config import ApoConfig, ConfigError, load_config


def test_defaults_are_the_embedded_job():
    cfg = load_config()
    assert cfg.model.path == "embedded" and cfg.reference.n_samples == 8 and cfg.vstar.beta1 == 0.5
    assert cfg.artifact_root == "./.apo"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.001\n  steps: 5\nvstar:\n  filter_all_zero: true\n")
    cfg = load_config(path, ["train.steps=7", "run_id=abc"])
    assert (cfg.train.lr, cfg.train.steps, cfg.vstar.filter_all_zero, cfg.run_id) == (0.001, 7, True, "abc")


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lrr=1", "unknown key 'train.lrr'; valid keys here: steps,"),
        ("bogus=1", "unknown key 'bogus'"),
        ("train.lr=-1", "train.lr: Input should be greater than 0 (got -1)"),
        ("reward=nope", "reward: Input should be 'auto', 'embedded', 'gsm8k' or 'math'"),
        ("train.minibatch_size=48", "minibatch_size (48) must divide rollout_batch_size (64)"),
        ("run_id=a/b", "run_id 'a/b' must match"),
        ("train.steps", "must look like key=value"),
        ("train.lr.x=1", "train.lr: Input should be a valid number"),
    ],
)
def test_bad_values_fail_in_one_line(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    message = str(info.value)
    assert expected in message and "\n" not in message


def test_every_field_is_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, ApoConfig.__mro__[1]):
                walk(annotation)
            else:
                assert field.description, f"{model.__name__}.{name} has no docstring"

    walk(ApoConfig)


def test_with_run_id_fills_a_timestamp():
    assert load_config().with_run_id().run_id.startswith("run-")
    assert load_config(overrides=["run_id=x1"]).with_run_id().run_id == "x1"


def test_example_gpu_configs_load_with_the_paper_settings():
    from pathlib import Path

    paths = sorted(Path("configs").glob("*.yaml"))
    assert {p.name for p in paths} >= {"gsm8k-qwen2.5-1.5b.yaml", "math-qwen2.5-7b.yaml"}
    for path in paths:
        cfg = load_config(path)
        assert (cfg.train.lr, cfg.train.beta2, cfg.vstar.beta1, cfg.reference.n_samples) == (1e-6, 1e-3, 0.5, 8), path
        assert (cfg.train.rollout_batch_size, cfg.train.minibatch_size, cfg.train.weight_decay) == (256, 128, 0.01), path
        assert cfg.model.path.startswith("Qwen/Qwen2.5-")


@pytest.mark.parametrize("given, engine", [("hf", "transformers"), ("transformers", "transformers"), ("vllm", "vllm"), ("auto", "auto")])
def test_generation_engine_names(given, engine):
    assert load_config(overrides=[f"generation.engine={given}"]).generation.engine == engine


def test_engine_selectable_per_stage():
    gen = load_config(overrides=["generation.engine=vllm", "generation.stage_engines.train_online=hf"]).generation
    assert gen.engine_for_stage("train_online") == "transformers"
    assert gen.engine_for_stage("sample_reference") == "vllm"
    with pytest.raises(ConfigError, match="stage_engines"):
        load_config(overrides=["generation.stage_engines.preprocess=vllm"])


def _prefect_form():
    """The `apo` flow's parameter schema as Prefect stores it for a deployment's form."""
    from prefect.utilities.callables import parameter_schema

    from flows.apo import apo

    return parameter_schema(apo.fn).model_dump(mode="json", by_alias=True)


def test_the_prefect_form_lists_what_to_run_before_where_it_runs():
    schema = _prefect_form()
    config = schema["definitions"]["ApoConfig"]["properties"]
    assert list(config) == ["run_id", "data", "reward", "model", "generation", "reference", "vstar", "train", "eval",
                            "registry", "artifact_root", "storage", "tracking", "execution", "orchestration"]


def test_every_description_survives_markdown():
    """Prefect's UI renders field descriptions as markdown, where <placeholder> is an HTML tag and vanishes."""
    import re

    descriptions = []

    def collect(node):
        if isinstance(node, dict):
            if isinstance(node.get("description"), str):
                descriptions.append(node["description"])
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(_prefect_form())
    assert len(descriptions) > 100
    outside_code = [re.sub(r"`[^`]*`", "", text) for text in descriptions]
    assert [t for t in outside_code if re.search(r"</?[A-Za-z][^>]*>", t)] == []


def test_every_registry_is_the_one_the_settings_accept():
    """Each variant list lives once: the settings accept exactly the registered names, and an
    unknown name lists the valid ones."""
    from typing import get_args

    from apo_core.config import ENGINE_NAMES, DataConfig, GenerationConfig
    from apo_core.data import BUILTIN, DATA_SETS, reward_of
    from apo_core.engines import ENGINES
    from apo_core.rewards import REWARDS
    from flows.cli import main

    assert set(ENGINES) == set(ENGINE_NAMES)
    assert set(get_args(GenerationConfig.model_fields["engine"].annotation)) == {"auto", *ENGINES}
    assert set(get_args(DataConfig.model_fields["name"].annotation)) == set(DATA_SETS) == {"embedded", "custom", *BUILTIN}
    assert {reward_of(name) for name in DATA_SETS} <= set(REWARDS)
    with pytest.raises(ValueError, match="unknown data set 'nope'; valid: embedded, custom, gsm8k, math, math500, amc23, aime24"):
        reward_of("nope")
    with pytest.raises(ConfigError, match="benchmark 'nope' unknown; valid: gsm8k, math, math500, amc23, aime24"):
        load_config(overrides=["eval.benchmarks=[nope]"])
    with pytest.raises(SystemExit):  # argparse lists the choices, from the same registry
        main(["evaluate", "--model", "embedded", "--benchmark", "nope"])
