"""Stage `sample_reference`: N scored reference samples per training prompt (samples.parquet)."""

from __future__ import annotations

import time

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from apo_core.rewards import get_reward, reward_stats
from apo_core.rollouts import sample_reference as sample

from . import storage
from .common import engine_for, load_model, read_prompts, verifier_metrics
from .stage import RunContext, StageIO, StageResult, fingerprint, run_stage


@task(name="sample_reference", cache_policy=NO_CACHE)
def sample_reference(ctx: RunContext, prep: StageResult) -> StageResult:
    cfg = ctx.config

    def body(io: StageIO):
        verifier_before = reward_stats(cfg.reward_name)
        records = read_prompts(prep, "train")
        model, tokenizer = load_model(cfg)
        engine = engine_for(cfg, model, tokenizer)
        start = time.perf_counter()
        rows = sample(
            engine, records, get_reward(cfg.reward_name),
            n_samples=cfg.reference.n_samples, temperature=cfg.reference.temperature, top_p=cfg.reference.top_p,
            max_new_tokens=cfg.reference.max_new_tokens, seed=cfg.reference.seed,
            progress=lambda i, n: print(f"[sample_reference] sample index {i}/{n} done ({time.perf_counter() - start:.1f}s)"),
        )
        seconds = time.perf_counter() - start
        df = pl.DataFrame(rows)
        storage.write_parquet(df, io.path("samples.parquet"))
        n_tokens = int(df["n_tokens"].sum())
        metrics = {
            "reference/reward_mean": float(df["reward"].mean()),
            "reference/samples": float(df.height),
            "reference/response_tokens_mean": float(df["n_tokens"].mean()),
            "reference/truncated_frac": float((df["finish_reason"] == "length").mean()),
            "reference/tokens_per_s": n_tokens / max(seconds, 1e-9),
        }
        metrics.update(verifier_metrics(cfg.reward_name, verifier_before))
        io.log_metrics(metrics)
        io.tracker.log_table(io.mlflow_run_id, df.head(64).to_dicts(), "reference_samples.json")
        return metrics, {"samples": io.path("samples.parquet")}

    fp = fingerprint(cfg.model.model_dump(), cfg.reference.model_dump(), cfg.reward_name, prep.fingerprint)
    return run_stage(ctx, "sample_reference", fp, body)
