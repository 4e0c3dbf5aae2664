"""The model registry step (tasks/register.py): a new version per run, the `champion` alias only
for a model that beats the current champion, the decision and both scores recorded. Mostly on
fabricated stage results (no training); one real pipeline run on a SQLite store, and the same
decision over HTTP against the `mlflow_server` fixture."""

import json

import pytest

from tasks.config import ConfigError, load_config
from tasks import storage
from tasks.register import CHAMPION, decide, register_model
from tasks.stage import RunContext, StageResult
from tasks.tracking import Tracker


def fabricated_run(root, tracking_uri, run_id, scores, eval_sets=None, **registry):
    """A pipeline run that got as far as evaluate: its parent MLflow run, a model folder in the
    artifact root and evaluate's metrics; `scores`: benchmark -> trained accuracy; `eval_sets`:
    benchmark -> digest of its prompts (eval_sets.json), None: not recorded."""
    overrides = [f"run_id={run_id}", f"artifact_root={root}", f"tracking.mlflow_tracking_uri={tracking_uri}",
                 "registry.enabled=true", "registry.model_name=arith"]
    overrides += [f"registry.{k}={v}" for k, v in registry.items()]
    extra = [b for b in scores if b != "heldout"]
    if extra:
        overrides.append(f"eval.benchmarks=[{', '.join(f'{b}=/data/{b}.jsonl' for b in extra)}]")
    cfg = load_config(overrides=overrides)
    ctx = RunContext(config=cfg, tracking_uri=tracking_uri, parent_run_id=Tracker.for_config(cfg).parent_run(cfg))
    model = storage.join(ctx.stage_uri("train_online"), "model")
    storage.write_bytes(storage.join(model, "model.safetensors"), b"weights of " + run_id.encode())
    trained = StageResult(stage="train_online", uri=ctx.stage_uri("train_online"), status="ran", fingerprint=f"t-{run_id}",
                          seconds=1.0, peak_rss_mb=1.0, outputs={"model": model})
    metrics = {"eval/reference_accuracy": 0.25}
    metrics.update({"eval/trained_accuracy" if b == "heldout" else f"eval/trained_{b}_accuracy": s for b, s in scores.items()})
    outputs = {}
    if eval_sets is not None:
        outputs["eval_sets"] = storage.join(ctx.stage_uri("evaluate"), "eval_sets.json")
        storage.write_json(eval_sets, outputs["eval_sets"])
    evaluated = StageResult(stage="evaluate", uri=ctx.stage_uri("evaluate"), status="ran", fingerprint=f"e-{run_id}",
                            seconds=1.0, peak_rss_mb=1.0, metrics=metrics, outputs=outputs)
    return ctx, trained, evaluated


def register(root, tracking_uri, run_id, scores, eval_sets=None, **registry):
    ctx, trained, evaluated = fabricated_run(root, tracking_uri, run_id, scores, eval_sets, **registry)
    return ctx, register_model.fn(ctx, trained, evaluated)


def champion_version(tracking_uri, name="arith"):
    from mlflow.tracking import MlflowClient

    return str(MlflowClient(tracking_uri).get_model_version_by_alias(name, CHAMPION).version)


@pytest.fixture
def store(tmp_path):
    return tmp_path / "art", f"sqlite:///{tmp_path}/mlflow.db"


def test_decide_is_strict_and_honours_min_improvement():
    assert decide(0.1, None, 0.0) == "first"
    assert decide(0.6, 0.5, 0.0) == "promoted"
    assert decide(0.5, 0.5, 0.0) == "kept"  # a tie leaves the alias
    assert decide(0.4, 0.5, 0.0) == "kept"
    assert decide(0.55, 0.5, 0.1) == "kept" and decide(0.65, 0.5, 0.1) == "promoted"


def test_champion_moves_only_for_a_better_model(store):
    from mlflow.tracking import MlflowClient

    root, uri = store
    ctx1, first = register(root, uri, "r1", {"heldout": 0.5})
    assert (first["version"], first["decision"], first["champion_score"]) == ("1", "first", None)
    assert champion_version(uri) == "1"

    # scheduled retraining that comes out worse: registered, but the alias stays on version 1
    ctx2, worse = register(root, uri, "r2", {"heldout": 0.375})
    assert (worse["version"], worse["decision"], worse["champion_version"]) == ("2", "kept", "1")
    assert (worse["score"], worse["champion_score"]) == (0.375, 0.5)
    assert champion_version(uri) == "1"
    client = MlflowClient(uri)
    parent = client.get_run(ctx2.parent_run_id).data
    assert parent.tags["apo.registry.decision"] == "kept" and parent.tags["apo.registry.version"] == "2"
    assert parent.tags["apo.registry.champion_version"] == "1"
    assert parent.metrics["registry/score"] == 0.375 and parent.metrics["registry/champion_score"] == 0.5
    assert parent.metrics["registry/promoted"] == 0.0
    assert storage.read_json(storage.join(ctx2.run_uri, "registry.json")) == worse

    _, tie = register(root, uri, "r3", {"heldout": 0.5})
    assert tie["decision"] == "kept" and champion_version(uri) == "1"

    ctx4, better = register(root, uri, "r4", {"heldout": 0.625})
    assert (better["version"], better["decision"], better["previous_champion_version"]) == ("4", "promoted", "1")
    assert champion_version(uri) == "4"
    assert client.get_run(ctx4.parent_run_id).data.metrics["registry/promoted"] == 1.0

    # every version: the parent run as its run, its folder in the artifact root as source, its score as a tag
    for version, ctx, score in (("1", ctx1, 0.5), ("2", ctx2, 0.375), ("4", ctx4, 0.625)):
        mv = client.get_model_version("arith", version)
        assert mv.run_id == ctx.parent_run_id
        assert mv.source == (root / ctx.config.run_id / "train_online" / "model").resolve().as_uri()
        assert float(mv.tags["apo.score.heldout"]) == score
    # no second upload: the registry holds pointers, nothing under MLflow's artifact store
    assert not list((root / "mlartifacts").rglob("model.safetensors"))


def test_min_improvement_is_required_to_move_the_alias(store):
    root, uri = store
    register(root, uri, "a", {"heldout": 0.5}, min_improvement=0.1)
    _, small = register(root, uri, "b", {"heldout": 0.55}, min_improvement=0.1)
    assert small["decision"] == "kept" and champion_version(uri) == "1"
    _, big = register(root, uri, "c", {"heldout": 0.7}, min_improvement=0.1)
    assert big["decision"] == "promoted" and champion_version(uri) == "3"


def test_the_configured_benchmark_decides(store):
    root, uri = store
    register(root, uri, "a", {"heldout": 0.9, "math500": 0.25}, benchmark="math500")
    # better on its own held-out split, worse on math500: not promoted
    _, worse = register(root, uri, "b", {"heldout": 0.95, "math500": 0.2}, benchmark="math500")
    assert (worse["decision"], worse["score"], worse["champion_score"]) == ("kept", 0.2, 0.25)
    _, better = register(root, uri, "c", {"heldout": 0.1, "math500": 0.3}, benchmark="math500")
    assert better["decision"] == "promoted" and champion_version(uri) == "3"


def test_a_retrain_evaluated_on_other_prompts_does_not_move_the_alias(store, capsys):
    from mlflow.tracking import MlflowClient

    root, uri = store
    register(root, uri, "a", {"heldout": 0.5}, eval_sets={"heldout": "set-1"})
    _, other = register(root, uri, "b", {"heldout": 0.9}, eval_sets={"heldout": "set-2"})
    assert (other["decision"], other["reason"], other["eval_set"]) == ("kept", "other evaluation set", "set-2")
    assert champion_version(uri) == "1" and "evaluated on other prompts" in capsys.readouterr().out
    assert MlflowClient(uri).get_model_version("arith", "2").tags["apo.eval_set.heldout"] == "set-2"
    _, same = register(root, uri, "c", {"heldout": 0.9}, eval_sets={"heldout": "set-1"})
    assert same["decision"] == "promoted" and champion_version(uri) == "3"


def test_a_benchmark_that_is_not_evaluated_fails_at_load():
    with pytest.raises(ConfigError, match=r"registry.benchmark 'math500' is not evaluated; valid: heldout"):
        load_config(overrides=["registry.enabled=true", "registry.benchmark=math500"])


def test_a_local_model_source_with_a_tracking_server_fails_at_load():
    with pytest.raises(ConfigError, match=r"registry.enabled with an MLflow server needs an artifact_root .*s3://"):
        load_config(overrides=["registry.enabled=true", "tracking.mlflow_tracking_uri=http://127.0.0.1:5000", "artifact_root=/data/apo"])
    load_config(overrides=["registry.enabled=true", "tracking.mlflow_tracking_uri=http://127.0.0.1:5000", "artifact_root=s3://b/apo"])


def test_rerunning_a_run_reuses_its_version(store):
    root, uri = store
    ctx, trained, evaluated = fabricated_run(root, uri, "r1", {"heldout": 0.5})
    first = register_model.fn(ctx, trained, evaluated)
    again = register_model.fn(ctx, trained, evaluated)
    assert again == first
    from mlflow.tracking import MlflowClient

    assert [str(v.version) for v in MlflowClient(uri).search_model_versions("name = 'arith'")] == ["1"]


def test_registry_disabled_registers_nothing(store):
    from mlflow.tracking import MlflowClient

    root, uri = store
    ctx, trained, evaluated = fabricated_run(root, uri, "not-registered", {"heldout": 0.5})
    ctx = ctx.model_copy(update={"config": ctx.config.model_copy(update={"registry": ctx.config.registry.model_copy(update={"enabled": False})})})
    assert register_model.fn(ctx, trained, evaluated) is None
    assert MlflowClient(uri).search_registered_models() == []
    assert not storage.exists(storage.join(ctx.run_uri, "registry.json"))
    assert not any(k.startswith("apo.registry.") for k in MlflowClient(uri).get_run(ctx.parent_run_id).data.tags)


def test_champion_decision_over_http(mlflow_server):
    """The same decisions against a real MLflow server, the model folders in the S3 bucket."""
    import s3fs
    from mlflow.tracking import MlflowClient

    root = "s3://apo-test/registry-http"
    _, first = register(root, mlflow_server, "h1", {"heldout": 0.5}, model_name="arith-http")
    _, worse = register(root, mlflow_server, "h2", {"heldout": 0.25}, model_name="arith-http")
    assert (first["decision"], worse["decision"], worse["champion_score"]) == ("first", "kept", 0.5)
    client = MlflowClient(mlflow_server)
    champion = client.get_model_version_by_alias("arith-http", CHAMPION)
    assert str(champion.version) == "1" and champion.source == "s3://apo-test/registry-http/h1/train_online/model"
    assert client.get_model_version("arith-http", "2").tags["apo.registry.decision"] == "kept"
    _, better = register(root, mlflow_server, "h3", {"heldout": 0.75}, model_name="arith-http")
    assert better["decision"] == "promoted" and str(client.get_model_version_by_alias("arith-http", CHAMPION).version) == "3"
    record = json.loads(s3fs.S3FileSystem().cat_file("apo-test/registry-http/h2/registry.json"))
    assert record["decision"] == "kept" and record["champion_version"] == "1"


def test_pipeline_registers_and_a_worse_retrain_keeps_the_champion(prefect_api, tiny_model_dir, tmp_path):
    """The real flow on the tiny random model: the first run becomes champion; a retraining run
    scoring no better (a tie or worse) is registered and leaves the alias on version 1."""
    from mlflow.tracking import MlflowClient

    from flows.apo import apo
    from tests.test_flow import tiny_config

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    opts = {"tracking.mlflow_tracking_uri": uri, "registry.enabled": "true", "registry.model_name": "tiny", "train.steps": 1}
    first = apo(config=tiny_config(tmp_path, tiny_model_dir, **{"run_id": "nightly-1", **opts}))
    reg = first["registry"]
    assert (reg["version"], reg["decision"], reg["score"]) == ("1", "first", first["trained_accuracy"])
    on_disk = json.loads((tmp_path / "nightly-1" / "summary.json").read_text())
    assert on_disk["registry"] == reg
    client = MlflowClient(uri)
    mv = client.get_model_version_by_alias("tiny", CHAMPION)
    assert str(mv.version) == "1" and mv.run_id == first["mlflow_run_id"]
    # from the run's logged model (its one MLflow copy of the weights, immutable), not the mutable folder
    (output,) = client.get_run(first["mlflow_stage_runs"]["train_online"]).outputs.model_outputs
    assert mv.source == f"models:/{output.model_id}"  # (the SQL registry store keeps no model_id column)
    assert (tmp_path / "nightly-1" / "train_online" / "model" / "model.safetensors").exists()

    # the retrain is forced to score lower on the champion's tag: the champion's recorded score
    # is what the comparison reads, so raising it makes any new model "worse" without training to order
    client.set_model_version_tag("tiny", "1", "apo.score.heldout", "1.0")
    second = apo(config=tiny_config(tmp_path, tiny_model_dir, **{"run_id": "nightly-2", **opts}))
    reg2 = second["registry"]
    assert (reg2["version"], reg2["decision"], reg2["champion_version"]) == ("2", "kept", "1")
    assert reg2["champion_score"] == 1.0 and reg2["score"] == second["trained_accuracy"]
    assert str(client.get_model_version_by_alias("tiny", CHAMPION).version) == "1"
    parent = client.get_run(second["mlflow_run_id"]).data
    assert parent.tags["apo.registry.decision"] == "kept"
    assert parent.metrics["registry/champion_score"] == 1.0
