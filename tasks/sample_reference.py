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
    cfg, ref = ctx.config, ctx.config.reference

    def body(io: StageIO):
        verifier_before = reward_stats(cfg.reward_name)
        records = read_prompts(prep, "train")
        shards = [records[i : i + ref.shard_size] for i in range(0, len(records), ref.shard_size)]
        # Parts are keyed by the stage fingerprint and written whole, so a rerun after a crash
        # keeps every finished shard of the same config and redoes only the rest.
        parts = [io.path("shards", io.fingerprint[:16], f"part-{s:05d}.parquet") for s in range(len(shards))]
        engine = None
        start, reused, gen_seconds, gen_tokens = time.perf_counter(), 0, 0.0, 0
        for s, (shard, part) in enumerate(zip(shards, parts)):
            if storage.exists(part):
                reused += 1
                continue
            if engine is None:
                model, tokenizer = load_model(cfg)
                engine = engine_for(cfg, "sample_reference", model, tokenizer)
            t0 = time.perf_counter()
            rows = sample(engine, shard, get_reward(cfg.reward_name), n_samples=ref.n_samples, temperature=ref.temperature,
                          top_p=ref.top_p, max_new_tokens=ref.max_new_tokens, seed=ref.seed + s * ref.n_samples)
            storage.write_parquet(pl.DataFrame(rows), part)
            gen_seconds += time.perf_counter() - t0
            gen_tokens += sum(r["n_tokens"] for r in rows)
            print(f"[sample_reference] shard {s + 1}/{len(shards)}: {len(rows)} samples ({time.perf_counter() - start:.1f}s)")
        if reused:
            print(f"[sample_reference] reused {reused}/{len(shards)} finished shards")
        df = pl.concat([storage.read_parquet(part) for part in parts])
        storage.write_parquet(df, io.path("samples.parquet"))
        metrics = {
            "reference/reward_mean": float(df["reward"].mean()),
            "reference/samples": float(df.height),
            "reference/response_tokens_mean": float(df["n_tokens"].mean()),
            "reference/truncated_frac": float((df["finish_reason"] == "length").mean()),
            "reference/shards": float(len(shards)),
            "reference/shards_reused": float(reused),
        }
        if gen_seconds:
            metrics["reference/tokens_per_s"] = gen_tokens / gen_seconds
        metrics.update(verifier_metrics(cfg.reward_name, verifier_before))
        io.log_metrics(metrics)
        io.tracker.log_table(io.mlflow_run_id, df.head(64).to_dicts(), "reference_samples.json")
        return metrics, {"samples": io.path("samples.parquet")}

    fp = fingerprint(cfg.model.model_dump(), ref.model_dump(), cfg.reward_name, prep.fingerprint)
    return run_stage(ctx, "sample_reference", fp, body)
