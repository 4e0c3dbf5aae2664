"""Stage `aggregate_vstar`: V* per prompt from the raw reference rewards, plus the filter.

Only this stage depends on beta1, so a new beta1 re-runs it without new samples.
"""

from __future__ import annotations

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from apo_core.rollouts import aggregate_vstar as aggregate, is_kept

from . import storage
from .review import table_dataset
from .stage import RunContext, StageIO, StageResult, fingerprint, run_stage


@task(name="aggregate_vstar", cache_policy=NO_CACHE, retries=1)
def aggregate_vstar(ctx: RunContext, samples: StageResult) -> StageResult:
    cfg = ctx.config

    def body(io: StageIO):
        raw = storage.read_parquet(samples.outputs["samples"])
        io.log_datasets([table_dataset("reference_samples", samples.outputs["samples"], "reference")])
        rows = aggregate(raw["prompt_id"].to_list(), raw["reward"].to_list(), cfg.vstar.beta1)
        # kept: what stage 2 trains on
        df = pl.DataFrame([{**row, "kept": is_kept(row, cfg.vstar.filter_all_zero)} for row in rows])
        storage.write_parquet(df, io.path("vstar.parquet"))
        filtered = int((~df["kept"]).sum())
        metrics = {
            "vstar/mean": float(df["vstar"].mean()),
            "vstar/mean_reward": float(df["mean_reward"].mean()),
            "vstar/pass_at_n": float(df["pass_at_n"].mean()),
            "vstar/all_zero_frac": float((df["pass_at_n"] == 0).mean()),
            "vstar/prompts": float(df.height),
            "vstar/filtered_out": float(filtered),
            "vstar/kept": float(df.height - filtered),
        }
        print(f"[aggregate_vstar] V* mean {metrics['vstar/mean']:.3f}; filter "
              f"{'on' if cfg.vstar.filter_all_zero else 'off'}: {filtered} of {df.height} prompts dropped")
        io.log_metrics(metrics)
        return metrics, {"vstar": io.path("vstar.parquet")}

    return run_stage(ctx, "aggregate_vstar", fingerprint(cfg.vstar.model_dump(), samples.fingerprint), body)
