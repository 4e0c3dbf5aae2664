"""Stage `sample_reference`: N scored reference samples per training prompt (samples.parquet),
drawn once per prompt ever: through the reference-sample store (tasks/reference_store.py).

The stage looks every training prompt up in the store, cuts the samples it lacks into shards of
`reference.shard_size` prompts, samples each shard in one engine pass and publishes it to the store
as one entry; then it reads its N samples per prompt back from the store into samples.parquet.
Locally the stage samples the shards itself; under `execution: work-pool` the flow hands in a
`fan_out` that spreads them over several flow runs (each calling `sample_reference_shard` on the
plan this stage wrote). A rerun, a resumed crash, another run id over the same prompts, or a larger
N all sample only what the store lacks.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from .config import ApoConfig
from apo_core.data import PromptRecord
from apo_core.engines import resolve_engine_name
from apo_core.modeling import pick_device
from apo_core.rewards import get_reward, reward_stats, reward_version
from apo_core.rollouts import sample_reference as sample

from . import storage
from .faults import failpoint
from .loading import engine_for, load_model, model_files, read_prompts, recorded_engine
from .review import Progress, records_dataset
from .reference_store import ReferenceStore, SampleContext, is_tokenizer_file, is_weight_file
from .stage import RunContext, StageIO, StageResult, fingerprint, run_stage, sampling_parts, verifier_metrics

STAGE = "sample_reference"
PLAN = "plan.parquet"  # the shards a fanned-out stage 1 hands its shard runs: shard, prompt_id, sample_idx

# fan_out(groups, io): run each group of shard indices (as a flow run) and return when all are done;
# raises naming the groups that failed.
FanOut = Callable[[list[list[int]], StageIO], None]
# A shard of work: training prompts and, per prompt, the sample indices still to draw.
Shard = list[tuple[PromptRecord, list[int]]]


def sample_context(cfg: ApoConfig) -> SampleContext:
    """What besides the prompt decides this run's reference samples (the store's key)."""
    ref, folder = cfg.reference, model_files(cfg.model.path)
    engine = resolve_engine_name(cfg.generation.engine_for_stage(STAGE), pick_device(cfg.model.device), recorded_engine(STAGE))
    stops = cfg.generation.stop_token_ids
    return SampleContext(
        model=storage.folder_digest(folder, is_weight_file), tokenizer=storage.folder_digest(folder, is_tokenizer_file),
        dtype=cfg.model.dtype, engine=engine, reward=reward_version(cfg.reward_name), temperature=ref.temperature,
        top_p=ref.top_p, max_new_tokens=ref.max_new_tokens, stop_token_ids=tuple(stops) if stops else None, seed=ref.seed)


def stage_fingerprint(cfg: ApoConfig, prep: StageResult) -> str:
    # reference.shards only spreads the same shards over flow runs, and the store is where samples
    # are kept: neither changes the samples. The context covers the weights' and tokenizer's content.
    return fingerprint(cfg.model.model_dump(), cfg.reference.model_dump(exclude={"shards", "store"}), cfg.reward_name,
                       prep.fingerprint, *sampling_parts(cfg), sample_context(cfg).digest())


def open_store(cfg: ApoConfig) -> ReferenceStore:
    return ReferenceStore(cfg.reference.store_uri(cfg.artifact_root), sample_context(cfg), cfg.run_id or "")


def missing_shards(records: Sequence[PromptRecord], keys: dict[str, str], have: dict[str, set[int]], n: int,
                   shard_size: int) -> list[Shard]:
    """The samples 0..n-1 of `records` not in `have` (key -> stored indices), `shard_size` prompts a shard.

    >>> recs = [PromptRecord(str(i), f"{i}+1=?", str(i + 1), "train") for i in range(3)]
    >>> shards = missing_shards(recs, {r.prompt_id: r.prompt_id for r in recs}, {"0": {0, 1}, "1": {0}}, 2, 1)
    >>> [[(r.prompt_id, idx) for r, idx in shard] for shard in shards]
    [[('1', [1])], [('2', [0, 1])]]
    """
    todo = [(r, sorted(set(range(n)) - have.get(keys[r.prompt_id], set()))) for r in records]
    todo = [(r, idx) for r, idx in todo if idx]
    return [todo[i : i + shard_size] for i in range(0, len(todo), shard_size)]


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


def sample_shards(cfg: ApoConfig, store: ReferenceStore, shards: Sequence[Shard], which: Sequence[int],
                  have: dict[str, set[int]], log: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
    """Sample the shards `which` and publish each to the store as one entry; samples already in
    `have` (key -> stored indices, from one lookup: an earlier try published them) are not drawn again."""
    ref = cfg.reference
    engine, reward = None, get_reward(cfg.reward_name)
    done = {"shards_sampled": 0.0, "samples_drawn": 0.0, "seconds": 0.0, "tokens": 0.0}
    for s in which:
        keys = {r.prompt_id: store.context.key(r.prompt, r.answer) for r, _ in shards[s]}
        work = [(r, [i for i in idx if i not in have.get(keys[r.prompt_id], set())]) for r, idx in shards[s]]
        work = [(r, idx) for r, idx in work if idx]
        if not work:
            continue
        if engine is None:
            model, tokenizer = load_model(cfg)
            engine = engine_for(cfg, STAGE, model, tokenizer)
        t0 = time.perf_counter()
        rows = sample(engine, [r for r, _ in work], reward, n_samples=ref.n_samples, temperature=ref.temperature,
                      top_p=ref.top_p, max_new_tokens=ref.max_new_tokens, seed=ref.seed, indices=[idx for _, idx in work])
        failpoint("sample_reference.mid_shard")
        store.publish(pl.DataFrame(rows).with_columns(pl.col("prompt_id").replace_strict(keys).alias("key")))
        failpoint("sample_reference.after_shard")
        seconds, tokens = time.perf_counter() - t0, sum(r["n_tokens"] for r in rows)
        done["shards_sampled"] += 1
        done["samples_drawn"] += len(rows)
        done["seconds"] += seconds
        done["tokens"] += tokens
        print(f"[{STAGE}] shard {s + 1}/{len(shards)}: {len(rows)} samples in {seconds:.1f}s")
        if log is not None:
            log(s, {"reference/shard_seconds": seconds, "reference/shard_tokens_per_s": tokens / max(seconds, 1e-9)})
    return done


def samples_table(records: Sequence[PromptRecord], keys: dict[str, str], stored: pl.DataFrame, n: int) -> pl.DataFrame:
    """samples.parquet: samples 0..n-1 of every record from the store's rows, in the records' order."""
    order = pl.DataFrame({"prompt_id": [r.prompt_id for r in records], "key": [keys[r.prompt_id] for r in records]})
    table = (order.with_row_index("_order").join(stored.filter(pl.col("sample_idx") < n), on="key", how="left")
             .sort(["_order", "sample_idx"]).drop("_order", "key"))
    return table.select("prompt_id", "sample_idx", "seed", "response", "reward", "n_tokens", "finish_reason")


def write_plan(uri: str, shards: Sequence[Shard]) -> None:
    rows = [{"shard": s, "prompt_id": r.prompt_id, "sample_idx": i} for s, shard in enumerate(shards) for r, idx in shard for i in idx]
    storage.write_parquet(pl.DataFrame(rows, schema={"shard": pl.Int64, "prompt_id": pl.String, "sample_idx": pl.Int64}), uri)


def read_plan(uri: str, records: Sequence[PromptRecord]) -> list[Shard]:
    by_id = {r.prompt_id: r for r in records}
    plan = storage.read_parquet(uri)
    shards: list[Shard] = []
    for (s,), part in plan.group_by(["shard"], maintain_order=True):
        idx_of = part.group_by("prompt_id", maintain_order=True).agg(pl.col("sample_idx"))
        shards.append([(by_id[pid], list(idx)) for pid, idx in idx_of.iter_rows()])
    return shards


@task(name="sample_reference", cache_policy=NO_CACHE)
def sample_reference(ctx: RunContext, prep: StageResult, fan_out: FanOut | None = None) -> StageResult:
    """The stage. `fan_out` None: every missing shard is sampled here; else it is handed the
    missing shards in `reference.shards` groups and must return once they are in the store."""
    cfg, ref = ctx.config, ctx.config.reference

    def body(io: StageIO):
        verifier_before = reward_stats(cfg.reward_name)
        records = read_prompts(prep, "train")
        io.log_datasets([records_dataset("train", records, prep.outputs["prompts"], "training")])
        store = open_store(cfg)
        keys = {r.prompt_id: store.context.key(r.prompt, r.answer) for r in records}
        metrics: dict[str, float] = {"reference/shards": 0.0, "reference/sampled": 0.0}
        drawn: dict[str, float] = {}
        with store.reading(cfg.model.path):
            for _ in range(3):  # again only when an entry failed its check (quarantined, so it is sampled again)
                found = store.lookup(keys.values())
                shards = missing_shards(records, keys, found.indices(), ref.n_samples, ref.shard_size)
                if shards:
                    metrics["reference/sampled"] += sum(len(idx) for shard in shards for _, idx in shard)
                    metrics["reference/shards"] += len(shards)
                    sample_missing(store, shards, io, metrics, drawn)
                    found = store.lookup(keys.values())
                    lost = missing_shards(records, keys, found.indices(), ref.n_samples, len(records))
                    if lost:
                        raise RuntimeError(f"{STAGE}: {sum(len(idx) for _, idx in lost[0])} samples are not in the reference store "
                                           f"at {store.folder} after the shards that draw them completed")
                stored, damaged = store.read(found)
                if not damaged:
                    break
            else:
                raise RuntimeError(f"{STAGE}: entries of the reference store at {store.folder} kept failing their checks")
        total = float(len(records) * ref.n_samples)
        metrics["reference/reused"] = total - metrics["reference/sampled"]
        if drawn.get("seconds"):
            metrics["reference/tokens_per_s"] = drawn["tokens"] / max(drawn["seconds"], 1e-9)
        if fan_out is None:  # fanned-out shards log their verifier counts into this stage's MLflow run themselves
            metrics.update(verifier_metrics(cfg.reward_name, verifier_before))
        print(f"[{STAGE}] {int(metrics['reference/reused'])} of {int(total)} samples from the store, "
              f"{int(metrics['reference/sampled'])} sampled ({store.folder})")
        df = samples_table(records, keys, stored, ref.n_samples)
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

    def sample_missing(store: ReferenceStore, shards: list[Shard], io: StageIO, metrics: dict[str, float],
                       drawn: dict[str, float]) -> None:
        if fan_out is None:
            progress = Progress(f"{STAGE}: {len(shards)} shard(s) of reference samples to draw")

            def log(s: int, m: dict[str, float]) -> None:
                io.log_metrics(m, step=s)
                progress.update(s + 1, len(shards))

            done = sample_shards(cfg, store, shards, range(len(shards)), {}, log=log)
            for k, v in done.items():
                drawn[k] = drawn.get(k, 0.0) + v
            return
        write_plan(io.path(PLAN), shards)
        groups = group_shards(list(range(len(shards))), ref.shards)
        if len(groups) < ref.shards:
            print(f"[{STAGE}] {len(shards)} shard(s) to sample, so {len(groups)} flow run(s), not reference.shards="
                  f"{ref.shards} (a smaller reference.shard_size makes more shards)")
        fan_out(groups, io)
        metrics["reference/shard_runs"] = metrics.get("reference/shard_runs", 0.0) + len(groups)

    return run_stage(ctx, STAGE, stage_fingerprint(cfg, prep), body)


@task(name="sample_reference_shard", cache_policy=NO_CACHE, retries=1)
def sample_reference_shard(ctx: RunContext, prep: StageResult, shard_ids: list[int], mlflow_run_id: str | None = None) -> dict[str, float]:
    """One fanned-out piece of stage 1: shards `shard_ids` of the plan the stage wrote, published to
    the store (samples already there are kept). Per-shard timings and verifier counts go to the
    stage's MLflow run (`mlflow_run_id`)."""
    cfg = ctx.config
    shards = read_plan(storage.join(ctx.stage_uri(STAGE), PLAN), read_prompts(prep, "train"))
    bad = [s for s in shard_ids if not 0 <= s < len(shards)]
    if bad or not shard_ids:
        raise ValueError(f"{STAGE}: shard ids {bad or shard_ids} out of range; this plan has shards 0..{len(shards) - 1}")
    tracker = ctx.tracker() if mlflow_run_id else None
    before = reward_stats(cfg.reward_name)

    progress = Progress(f"{STAGE}: shards {', '.join(str(s + 1) for s in shard_ids)} of {len(shards)}")

    def log(s: int, metrics: dict[str, float]) -> None:
        if tracker is not None:
            tracker.log_metrics(mlflow_run_id, metrics, step=s)
        progress.update(shard_ids.index(s) + 1, len(shard_ids))

    store = open_store(cfg)
    mine = {store.context.key(r.prompt, r.answer) for s in shard_ids for r, _ in shards[s]}
    done = sample_shards(cfg, store, shards, shard_ids, store.lookup(mine).indices(), log)  # one lookup for all of them
    counts = verifier_metrics(cfg.reward_name, before)
    if tracker is not None and any(counts.values()):
        tracker.log_metrics(mlflow_run_id, counts, step=shard_ids[0])
    return {**done, **counts}
