"""Stage `evaluate`: greedy held-out accuracy of the trained model (and the reference)."""

from __future__ import annotations

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from apo_core.rewards import get_reward
from apo_core.rollouts import evaluate as evaluate_model

from . import storage
from .common import engine_for, load_model, read_prompts
from .stage import RunContext, StageIO, StageResult, fingerprint, run_stage


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(ctx: RunContext, prep: StageResult, trained: StageResult) -> StageResult:
    cfg = ctx.config

    def body(io: StageIO):
        records = read_prompts(prep, "test")
        models = {"trained": trained.outputs["model"]}
        if cfg.eval.evaluate_reference:
            models = {"reference": cfg.model.path, **models}
        frames, metrics = [], {}
        for name, path in models.items():
            model, tokenizer = load_model(cfg, path)
            rows, m = evaluate_model(engine_for(cfg, model, tokenizer), records, get_reward(cfg.reward_name),
                                     max_new_tokens=cfg.eval.max_new_tokens)
            frames.append(pl.DataFrame(rows).with_columns(model=pl.lit(name)))
            metrics.update({f"eval/{name}_{k}": v for k, v in m.items()})
            print(f"[evaluate] {name}: greedy accuracy {m['accuracy']:.3f} on {len(rows)} held-out prompts")
        results = pl.concat(frames)
        storage.write_parquet(results, io.path("results.parquet"))
        storage.write_json(metrics, io.path("accuracy.json"))
        io.log_metrics(metrics)
        io.tracker.log_table(io.mlflow_run_id, results.head(200).to_dicts(), "eval_results.json")
        return metrics, {"results": io.path("results.parquet"), "accuracy": io.path("accuracy.json")}

    fp = fingerprint(cfg.eval.model_dump(), cfg.reward_name, trained.fingerprint, prep.fingerprint)
    return run_stage(ctx, "evaluate", fp, body)
