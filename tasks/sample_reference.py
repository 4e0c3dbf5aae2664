"""Stage `sample_reference`: N scored reference samples per training prompt (samples.parquet).

The training prompts are cut into shards of `reference.shard_size`; each shard is one engine
pass and one Parquet part `shards/<fingerprint>/part-NNNNN.parquet`, written whole. Locally the
stage samples every missing shard itself. Under `execution: work-pool` the flow hands in a
`fan_out` that spreads the missing shards over several flow runs (each calling
`sample_reference_shard`); either way the stage then assembles samples.parquet from the parts,
so a local run and a fanned-out run write, reuse and resume the same files.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from .config import ApoConfig
from apo_core.data import PromptRecord
from apo_core.rewards import get_reward, reward_stats
from apo_core.rollouts import sample_reference as sample

from . import storage
from .faults import failpoint
from .loading import engine_for, load_model, read_prompts
from .stage import RunContext, StageIO, StageResult, fingerprint, run_stage, sampling_parts, verifier_metrics

STAGE = "sample_reference"

# fan_out(groups, io): run each group of shard indices (as a flow run) and return when all are done;
# raises naming the groups that failed.
FanOut = Callable[[list[list[int]], StageIO], None]


def stage_fingerprint(cfg: ApoConfig, prep: StageResult) -> str:
    # reference.shards only spreads the same shards over flow runs: the samples do not depend on it.
    return fingerprint(cfg.model.model_dump(), cfg.reference.model_dump(exclude={"shards"}), cfg.reward_name, prep.fingerprint,
                       *sampling_parts(cfg))


def shard_plan(ctx: RunContext, prep: StageResult) -> tuple[list[list[PromptRecord]], list[str]]:
    """(shards of `reference.shard_size` training prompts, the Parquet part URI of each)."""
    size = ctx.config.reference.shard_size
    records = read_prompts(prep, "train")
    shards = [records[i : i + size] for i in range(0, len(records), size)]
    # Parts are keyed by the stage fingerprint and written whole, so a rerun after a crash
    # keeps every finished shard of the same config and redoes only the rest.
    folder = storage.join(ctx.stage_uri(STAGE), "shards", stage_fingerprint(ctx.config, prep)[:16])
    return shards, [storage.join(folder, f"part-{s:05d}.parquet") for s in range(len(shards))]


def group_shards(indices: Sequence[int], runs: int) -> list[list[int]]:
    """`indices` in at most `runs` contiguous groups whose sizes differ by at most one.

    >>> group_shards([0, 1, 2, 3, 4], 2)
    [[0, 1, 2], [3, 4]]
    >>> group_shards([3], 4)
    [[3]]
    """
    runs = max(1, min(runs, len(indices)))
    base, extra = divmod(len(indices), runs)
    groups, start = [], 0
    for g in range(runs):
        end = start + base + (g < extra)
        groups.append(list(indices[start:end]))
        start = end
    return [g for g in groups if g]


def sample_shards(cfg: ApoConfig, shards: Sequence[Sequence[PromptRecord]], parts: Sequence[str], which: Sequence[int],
                  log: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
    """Sample the shards `which` whose part does not exist yet and write each part whole.
    Shard s draws its sample i with seed + s * N + i, whichever process samples it."""
    ref = cfg.reference
    engine, reward = None, get_reward(cfg.reward_name)
    done = {"shards_sampled": 0.0, "shards_reused": 0.0, "seconds": 0.0, "tokens": 0.0}
    for s in which:
        if storage.exists(parts[s]):
            done["shards_reused"] += 1
            continue
        if engine is None:
            model, tokenizer = load_model(cfg)
            engine = engine_for(cfg, STAGE, model, tokenizer)
        t0 = time.perf_counter()
        rows = sample(engine, shards[s], reward, n_samples=ref.n_samples, temperature=ref.temperature,
                      top_p=ref.top_p, max_new_tokens=ref.max_new_tokens, seed=ref.seed + s * ref.n_samples)
        failpoint("sample_reference.mid_shard")
        storage.write_parquet(pl.DataFrame(rows), parts[s])
        failpoint("sample_reference.after_shard")
        seconds, tokens = time.perf_counter() - t0, sum(r["n_tokens"] for r in rows)
        done["shards_sampled"] += 1
        done["seconds"] += seconds
        done["tokens"] += tokens
        print(f"[{STAGE}] shard {s + 1}/{len(shards)}: {len(rows)} samples in {seconds:.1f}s")
        if log is not None:
            log(s, {"reference/shard_seconds": seconds, "reference/shard_tokens_per_s": tokens / max(seconds, 1e-9)})
    return done


@task(name="sample_reference", cache_policy=NO_CACHE)
def sample_reference(ctx: RunContext, prep: StageResult, fan_out: FanOut | None = None) -> StageResult:
    """The stage. `fan_out` None: every missing shard is sampled here; else it is handed the
    missing shards in `reference.shards` groups and must return once their parts exist."""
    cfg, ref = ctx.config, ctx.config.reference

    def body(io: StageIO):
        verifier_before = reward_stats(cfg.reward_name)
        shards, parts = shard_plan(ctx, prep)
        missing = [s for s, part in enumerate(parts) if not storage.exists(part)]
        metrics: dict[str, float] = {"reference/shards": float(len(shards)), "reference/shards_reused": float(len(parts) - len(missing))}
        if missing and fan_out is not None:
            groups = group_shards(missing, ref.shards)
            if len(groups) < ref.shards:
                print(f"[{STAGE}] {len(missing)} shard(s) to sample, so {len(groups)} flow run(s), not reference.shards="
                      f"{ref.shards} (a smaller reference.shard_size makes more shards)")
            fan_out(groups, io)
            metrics["reference/shard_runs"] = float(len(groups))
            lost = [s for s in missing if not storage.exists(parts[s])]
            if lost:
                raise RuntimeError(f"{STAGE}: the shard runs completed but shard(s) {lost} wrote no part under {io.path('shards')}")
        elif missing:
            done = sample_shards(cfg, shards, parts, missing, log=lambda s, m: io.log_metrics(m, step=s))
            metrics["reference/tokens_per_s"] = done["tokens"] / max(done["seconds"], 1e-9)
        if fan_out is None:  # fanned-out shards log their verifier counts into this stage's MLflow run themselves
            metrics.update(verifier_metrics(cfg.reward_name, verifier_before))
        if len(parts) > len(missing):
            print(f"[{STAGE}] reused {len(parts) - len(missing)}/{len(parts)} finished shards")
        df = pl.concat([storage.read_parquet(part) for part in parts])
        storage.write_parquet(df, io.path("samples.parquet"))
        metrics.update({
            "reference/reward_mean": float(df["reward"].mean()),
            "reference/samples": float(df.height),
            "reference/response_tokens_mean": float(df["n_tokens"].mean()),
            "reference/truncated_frac": float((df["finish_reason"] == "length").mean()),
        })
        io.log_metrics(metrics)
        io.tracker.log_table(io.mlflow_run_id, df.head(64).to_dicts(), "reference_samples.json")
        return metrics, {"samples": io.path("samples.parquet")}

    return run_stage(ctx, STAGE, stage_fingerprint(cfg, prep), body)


@task(name="sample_reference_shard", cache_policy=NO_CACHE, retries=1)
def sample_reference_shard(ctx: RunContext, prep: StageResult, shard_ids: list[int], mlflow_run_id: str | None = None) -> dict[str, float]:
    """One fanned-out piece of stage 1: the parts of shards `shard_ids` (existing ones are kept).
    Per-shard timings and verifier counts go to the stage's MLflow run (`mlflow_run_id`)."""
    cfg = ctx.config
    shards, parts = shard_plan(ctx, prep)
    bad = [s for s in shard_ids if not 0 <= s < len(shards)]
    if bad or not shard_ids:
        raise ValueError(f"{STAGE}: shard ids {bad or shard_ids} out of range; this plan has shards 0..{len(shards) - 1}")
    tracker = ctx.tracker() if mlflow_run_id else None
    before = reward_stats(cfg.reward_name)

    def log(s: int, metrics: dict[str, float]) -> None:
        if tracker is not None:
            tracker.log_metrics(mlflow_run_id, metrics, step=s)

    done = sample_shards(cfg, shards, parts, shard_ids, log)
    counts = verifier_metrics(cfg.reward_name, before)
    if tracker is not None and any(counts.values()):
        tracker.log_metrics(mlflow_run_id, counts, step=shard_ids[0])
    return {**done, **counts}
