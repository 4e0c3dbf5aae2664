"""Stage `evaluate`: greedy held-out accuracy (and avg@K / pass@K) of the trained model and the
reference, on the run's held-out split and on the configured benchmarks."""

from __future__ import annotations

from typing import Mapping, Sequence

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from .config import ApoConfig
from apo_core.data import PromptRecord, data_version, reward_of
from apo_core.modeling import load_tokenizer
from apo_core.rewards import get_reward, reward_stats
from apo_core.rollouts import evaluate as evaluate_model

from . import storage
from .faults import failpoint
from .loading import engine_for, load_model, read_prompts
from .datasets import content_digests, load_benchmark
from .review import per_prompt_table, records_dataset
from .stage import RunContext, StageIO, StageResult, fingerprint, run_stage, verifier_metrics
from .tracking import DatasetRef


def evaluate_models(cfg: ApoConfig, models: Mapping[str, str], sets: Mapping[str, tuple[Sequence[PromptRecord], str]]):
    """Every model on every set. sets: name -> (records, reward name); the run's own held-out
    set is named "heldout" and its metrics keep the short names eval/<model>_accuracy.
    Returns (per-problem frame, metrics)."""
    frames, metrics = [], {}
    for model_name, path in models.items():
        model, tokenizer = load_model(cfg, path)
        engine = engine_for(cfg, "evaluate", model, tokenizer)
        for set_name, (records, reward) in sets.items():
            rows, m = evaluate_model(
                engine, records, get_reward(reward), max_new_tokens=cfg.eval.max_new_tokens, samples=cfg.eval.samples,
                temperature=cfg.eval.sample_temperature, top_p=cfg.eval.sample_top_p, seed=cfg.eval.seed,
            )
            frames.append(pl.DataFrame(rows).with_columns(model=pl.lit(model_name), benchmark=pl.lit(set_name)))
            prefix = f"eval/{model_name}_" if set_name == "heldout" else f"eval/{model_name}_{set_name}_"
            metrics.update({prefix + k: v for k, v in m.items()})
            extra = "".join(f", {k} {v:.3f}" for k, v in m.items() if "@" in k)
            print(f"[evaluate] {model_name} on {set_name}: greedy accuracy {m['accuracy']:.3f}{extra} ({len(rows)} problems)")
        failpoint("evaluate.after_model")
    return pl.concat(frames, how="diagonal"), metrics


def benchmark_sets(cfg: ApoConfig, tokenizer) -> tuple[dict[str, tuple[list[PromptRecord], str]], dict[str, str]]:
    """(name -> (records, reward name), name -> the file they were read from)."""
    sets, sources = {}, {}
    for entry in cfg.eval.benchmarks:
        name = entry.split("=", 1)[0]
        cleaned, uri = load_benchmark(entry, tokenizer, cfg.eval.benchmark_limit)
        sets[name], sources[name] = (cleaned.records, reward_of(name)), uri
    return sets, sources


def log_model_metrics(io: StageIO, metrics: Mapping[str, float], model_uri: str | None, datasets: Mapping[str, DatasetRef]) -> None:
    """The trained model's scores again, linked to its MLflow logged model and to the data set each
    is over (shown on the model's page); `model_uri` models:/<id>, None for a model from before logged models."""
    if not model_uri:
        return
    benchmarks = [f"eval/trained_{name}_" for name in datasets if name != "heldout"]
    for name, dataset in datasets.items():
        prefix = "eval/trained_" if name == "heldout" else f"eval/trained_{name}_"
        mine = {k: v for k, v in metrics.items() if k.startswith(prefix) and (name != "heldout" or not k.startswith(tuple(benchmarks)))}
        io.tracker.log_metrics(io.mlflow_run_id, mine, model_id=model_uri.removeprefix("models:/"), dataset=dataset)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(ctx: RunContext, prep: StageResult, trained: StageResult) -> StageResult:
    cfg = ctx.config

    def body(io: StageIO):
        verifier_before = reward_stats(cfg.reward_name)
        models = {"trained": trained.outputs["model"]}
        if cfg.eval.evaluate_reference:
            models = {"reference": cfg.model.path, **models}
        sets = {"heldout": (read_prompts(prep, "test"), cfg.reward_name)}
        sources = {"heldout": prep.outputs["prompts"]}
        if cfg.eval.benchmarks:
            more, more_sources = benchmark_sets(cfg, load_tokenizer(cfg.model.path))
            sets.update(more)
            sources.update(more_sources)
        # the run's held-out split is the data set `test` preprocess logged; benchmarks under their names
        datasets = {name: records_dataset("test" if name == "heldout" else name, records, sources[name], "evaluation")
                    for name, (records, _) in sets.items()}
        io.log_datasets(list(datasets.values()))
        results, metrics = evaluate_models(cfg, models, sets)
        log_model_metrics(io, metrics, trained.outputs.get("mlflow_model"), datasets)
        metrics.update(verifier_metrics(cfg.reward_name, verifier_before))
        storage.write_parquet(results, io.path("results.parquet"))
        storage.write_json(metrics, io.path("accuracy.json"))
        # which prompts each score is over: a champion is compared only on the same set
        storage.write_json({name: data_version(records) for name, (records, _) in sets.items()}, io.path("eval_sets.json"))
        io.log_metrics(metrics)
        # one row per prompt: the reference's and the trained model's greedy answers side by side
        io.tracker.log_table(io.mlflow_run_id, per_prompt_table(results).to_dicts(), "eval_results.json")
        return metrics, {"results": io.path("results.parquet"), "accuracy": io.path("accuracy.json"),
                         "eval_sets": io.path("eval_sets.json")}

    fp = fingerprint(cfg.eval.model_dump(), cfg.reward_name, trained.fingerprint, prep.fingerprint)
    inputs = content_digests({f"eval.benchmarks {name}": path for name, _, path in (e.partition("=") for e in cfg.eval.benchmarks)})
    return run_stage(ctx, "evaluate", fp, body, inputs)
