"""Stage `preprocess`: the prompt set as prompts.parquet (prompt_id, prompt, answer, split)."""

from __future__ import annotations

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from apo_core.data import build_prompt_set

from . import storage
from .stage import RunContext, StageIO, StageResult, fingerprint, run_stage


@task(name="preprocess", cache_policy=NO_CACHE, retries=1)
def preprocess(ctx: RunContext) -> StageResult:
    cfg = ctx.config

    def body(io: StageIO):
        records = build_prompt_set(cfg.data)
        df = pl.DataFrame([r.to_row() for r in records], schema={"prompt_id": pl.String, "prompt": pl.String, "answer": pl.String, "split": pl.String})
        if df["prompt_id"].n_unique() != df.height:
            raise ValueError("preprocess: duplicate prompt_id in the prompt set")
        storage.write_parquet(df, io.path("prompts.parquet"))
        counts = {f"data/{s}": float(n) for s, n in df.group_by("split").len().iter_rows()}
        io.log_metrics(counts)
        return counts, {"prompts": io.path("prompts.parquet")}

    return run_stage(ctx, "preprocess", fingerprint(cfg.data.model_dump()), body)
