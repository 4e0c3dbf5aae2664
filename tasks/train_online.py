"""Stage `train_online`: A*-PO regression on the policy; checkpoints, step metrics, final model.

Checkpoints are resumable: a re-run of the same run id continues from the newest checkpoint
whose training config matches (train.steps may grow; changing anything else starts over). A
checkpoint carries the step history and sample table so far, so a resumed stage publishes the
same tables as an uninterrupted one; one trained against another V* table fails the stage.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from apo_core.rewards import get_reward, reward_stats
from .config import ApoConfig
from apo_core.distributed import gathered
from apo_core.modeling import add_lora, reference_of
from apo_core.rollouts import TrainPrompt, training_prompts
from apo_core.checkpoints import CheckpointMismatch, list_checkpoints, vstar_table_hash
from apo_core.trainer import OnlineTrainer, StopRequested

from . import storage, termination
from .loading import engine_for, load_model, read_prompts
from .faults import failpoint
from .preflight import check_vstar_belongs
from .review import Progress, records_dataset, table_dataset
from .stage import RunContext, StageIO, StageResult, fingerprint, run_stage, sampling_parts, verifier_metrics

# Fields that may change between a run and its resume without invalidating checkpoints, and of
# those the ones that never change what training computes (not in the stage's fingerprint either).
_NOT_RESULTS = {"grace_s"}
_RESUMABLE_CHANGES = {"steps", "time_budget_s", "checkpoint_every", "keep_checkpoints", *_NOT_RESULTS}
SAMPLES_PER_STEP = 4  # responses per step kept for the sample table


def _work_dir(io: StageIO, run_id: str) -> Path:
    """Local folder the trainer writes: the stage folder itself when the root is local."""
    if storage.is_local(io.uri):
        return storage.local_path(io.uri)
    return Path(tempfile.gettempdir()) / "apo" / run_id / "train_online"


def train_here(cfg: ApoConfig, prompts: list[TrainPrompt], work: Path, ckpt_dir: Path, resume_fp: str,
               checkpoints_uri: str | None, log_metrics=None) -> dict:
    """Train in this process (one rank of a DeepSpeed launch, or the whole job), resuming from the
    newest matching checkpoint; rank 0 writes the final weights to work/model (and work/adapter
    for LoRA). Returns {"steps", "history", "samples"}."""
    model, tokenizer = load_model(cfg)
    if cfg.train.lora:
        lora = cfg.train.lora
        model = add_lora(model, lora.rank, lora.alpha, lora.dropout, lora.target_modules, seed=cfg.train.seed)
    trainer = OnlineTrainer(model, reference_of(model, cfg.train.reference_dtype), tokenizer, engine_for(cfg, "train_online", model, tokenizer),
                            get_reward(cfg.reward_name), cfg.train)
    history: list[dict] = []
    samples: list[dict] = []
    unreadable: list[str] = []
    for ckpt in reversed(list_checkpoints(ckpt_dir)):
        meta = ckpt / "resume.json"
        if meta.exists() and json.loads(meta.read_text()).get("fingerprint") == resume_fp:
            try:  # every file is read before anything is restored, so a damaged checkpoint changes nothing
                ckpt_history = pl.read_parquet(ckpt / "metrics.parquet").to_dicts()
                ckpt_samples = pl.read_parquet(ckpt / "samples.parquet").to_dicts() if (ckpt / "samples.parquet").exists() else []
                trainer.load_checkpoint(ckpt, vstar_hash=vstar_table_hash(prompts))  # another V* table: fails here
            except CheckpointMismatch:
                raise
            except Exception as exc:  # truncated or damaged files: fall back to the previous checkpoint
                unreadable.append(f"{ckpt.name}: {type(exc).__name__}: {str(exc)[:200]}")
                print(f"[train_online] checkpoint {unreadable[-1]}; trying an older one")
                continue
            history, samples = ckpt_history, ckpt_samples
            print(f"[train_online] resumed from {ckpt.name} (step {trainer.step}/{cfg.train.steps})")
            break
    else:
        if unreadable:  # never train on from weights a failed load may have half-restored, nor silently from step 0
            raise RuntimeError(f"train_online: no readable checkpoint in {ckpt_dir} ({'; '.join(unreadable)}); "
                               "delete the folder to train from the start")
    lead = trainer.rank == 0

    def on_step(step: int, metrics: dict[str, float], step_samples: list[dict]) -> None:
        history.append({"step": step, **metrics})
        samples.extend(step_samples[:SAMPLES_PER_STEP])
        if log_metrics:
            log_metrics(metrics, step)
        failpoint("train_online.after_step")
        if lead:
            print(f"[train_online] step {step}/{cfg.train.steps} reward {metrics['rollout/reward_mean']:.3f} "
                  f"loss {metrics.get('train/loss', float('nan')):.4f} kl {metrics.get('train/kl', float('nan')):.4f} "
                  f"len {metrics['rollout/response_tokens_mean']:.0f} ({metrics['time/step_s']:.2f}s)")

    def before_publish(tmp: Path) -> None:
        pl.DataFrame(history).write_parquet(tmp / "metrics.parquet")
        pl.DataFrame(samples).write_parquet(tmp / "samples.parquet")
        (tmp / "resume.json").write_text(json.dumps({"fingerprint": resume_fp}))
        failpoint("train_online.checkpoint_unpublished")

    def on_checkpoint(path: Path) -> None:
        if lead and checkpoints_uri:
            storage.put_dir(path, storage.join(checkpoints_uri, path.name))
        failpoint("train_online.after_checkpoint")

    with storage.writing("a train_online checkpoint", ckpt_dir), termination.deferred() as since_sigterm:
        try:
            trainer.train(prompts, ckpt_dir, on_step=on_step, on_checkpoint=on_checkpoint, before_publish=before_publish,
                          stop_requested=since_sigterm)
        except StopRequested as exc:
            raise termination.Preempted(f"{exc}; rerun the same run id to resume") from None
    if trainer.step < cfg.train.steps and lead:
        print(f"[train_online] train.time_budget_s {cfg.train.time_budget_s:g}s: {trainer.train_seconds:.1f}s spent, no time for another step "
              f"after step {trainer.step}/{cfg.train.steps}: training ends here")
    with gathered(model), storage.writing("the trained model", work / "model"):  # full weights also under ZeRO-3 (collective)
        if lead:
            if cfg.train.lora:  # the adapter on its own, then the merged weights evaluation and engines load
                model.save_pretrained(work / "adapter")
                model = model.merge_and_unload()
            model.save_pretrained(work / "model")
            tokenizer.save_pretrained(work / "model")
    return {"steps": trainer.step, "history": history, "samples": samples}


def launch_ranks(cfg: ApoConfig, prompts: list[TrainPrompt], work: Path, ckpt_dir: Path, resume_fp: str,
                 checkpoints_uri: str | None) -> dict:
    """Run train_here on train.deepspeed.processes ranks (`torchrun --standalone`) and wait;
    a failed rank fails the stage with the end of its log."""
    work.mkdir(parents=True, exist_ok=True)
    spec = {"config": cfg.model_dump(mode="json"), "prompts": [p.__dict__ for p in prompts], "work": str(work),
            "ckpt_dir": str(ckpt_dir), "resume_fp": resume_fp, "checkpoints_uri": checkpoints_uri}
    (work / "ranks.json").write_text(json.dumps(spec))
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", f"--nproc_per_node={cfg.train.deepspeed.processes}",
           "-m", "tasks.train_online", str(work / "ranks.json")]
    print(f"[train_online] launching {cfg.train.deepspeed.processes} ranks: {' '.join(cmd)}")
    with open(work / "ranks.log", "w") as log, termination.deferred() as since_sigterm:
        ranks = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        forwarded = False
        while (code := ranks.poll()) is None:
            if not forwarded and since_sigterm() is not None:
                ranks.send_signal(signal.SIGTERM)  # torchrun passes it on: each rank stops after its step
                forwarded = True
            time.sleep(0.2)
    if forwarded:
        said = [line for line in (work / "ranks.log").read_text().splitlines() if "train_online stopped after step" in line]
        raise termination.Preempted(said[-1].split("apo: stopped: ", 1)[-1] if said else "train_online stopped by SIGTERM")
    if code:
        tail = (work / "ranks.log").read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"train_online: a DeepSpeed rank failed (exit {code}); log {work / 'ranks.log'}: " + " | ".join(tail))
    return json.loads((work / "ranks_result.json").read_text())


def _rank_main(spec_path: str) -> None:
    """Entry point of each rank (python -m tasks.train_online SPEC under torchrun)."""
    spec = json.loads(Path(spec_path).read_text())
    cfg = ApoConfig.model_validate(spec["config"])
    prompts = [TrainPrompt(**p) for p in spec["prompts"]]
    out = train_here(cfg, prompts, Path(spec["work"]), Path(spec["ckpt_dir"]), spec["resume_fp"], spec["checkpoints_uri"])
    if int(os.environ.get("RANK", 0)) == 0:
        (Path(spec["work"]) / "ranks_result.json").write_text(json.dumps(out))


@task(name="train_online", cache_policy=NO_CACHE)
def train_online(ctx: RunContext, prep: StageResult, vstar: StageResult) -> StageResult:
    cfg = ctx.config
    resume_fp = fingerprint(
        cfg.train.model_dump(exclude=_RESUMABLE_CHANGES), cfg.model.model_dump(), cfg.reward_name, vstar.fingerprint,
        *sampling_parts(cfg),
    )

    def body(io: StageIO):
        verifier_before = reward_stats(cfg.reward_name)
        table = storage.read_parquet(vstar.outputs["vstar"])
        train_records = read_prompts(prep, "train")
        check_vstar_belongs(table["prompt_id"].to_list(), [r.prompt_id for r in train_records], vstar.outputs["vstar"])
        try:
            prompts = training_prompts(train_records, table.to_dicts(), cfg.vstar.filter_all_zero)
        except ValueError as exc:
            raise ValueError(f"train_online: {exc}") from None
        work = _work_dir(io, cfg.run_id or "run")
        ckpt_dir = work / "checkpoints"
        if not storage.is_local(io.uri) and storage.exists(io.path("checkpoints")):
            ckpt_dir = storage.localize_dir(io.path("checkpoints"))
        remote_ckpts = None if storage.is_local(io.uri) else io.path("checkpoints")

        io.log_datasets([records_dataset("train", train_records, prep.outputs["prompts"], "training"),
                         table_dataset("reference_samples", storage.join(ctx.stage_uri("sample_reference"), "samples.parquet"), "reference"),
                         table_dataset("vstar", vstar.outputs["vstar"], "training")])
        progress = Progress(f"train_online: {cfg.train.steps} steps")

        def log_step(metrics: dict[str, float], step: int) -> None:
            io.log_metrics(metrics, step)
            progress.update(step, cfg.train.steps)

        if cfg.train.deepspeed is not None and "WORLD_SIZE" not in os.environ:
            out = launch_ranks(cfg, prompts, work, ckpt_dir, resume_fp, remote_ckpts)
            for row in out["history"]:  # the ranks do not talk to MLflow; their step metrics are logged here
                log_step({k: v for k, v in row.items() if k != "step"}, int(row["step"]))
        else:
            out = train_here(cfg, prompts, work, ckpt_dir, resume_fp, remote_ckpts, log_metrics=log_step)
        history, samples = out["history"], out["samples"]

        outputs = {"model": io.path("model"), "metrics": io.path("metrics.parquet")}
        if cfg.train.lora:
            storage.put_dir(work / "adapter", io.path("adapter"))
            outputs["adapter"] = io.path("adapter")
        storage.put_dir(work / "model", io.path("model"))
        storage.write_parquet(pl.DataFrame(history), io.path("metrics.parquet"))
        if samples:
            storage.write_parquet(pl.DataFrame(samples), io.path("samples.parquet"))
            io.tracker.log_table(io.mlflow_run_id, samples, "train_samples.json")
        # the MLflow copy of the weights is the logged model (transformers flavour), shown on both runs
        model_id = io.tracker.log_model(io.mlflow_run_id, work / "model", also_runs=[ctx.parent_run_id])
        outputs["mlflow_model"] = f"models:/{model_id}"
        last = history[-10:]
        metrics = {
            "train/steps": float(out["steps"]),
            "train/prompts": float(len(prompts)),
            "train/reward_mean_last10": sum(h["rollout/reward_mean"] for h in last) / max(1, len(last)),
            "train/kl_last": float(history[-1]["train/kl"]) if history else 0.0,
        }
        metrics.update(verifier_metrics(cfg.reward_name, verifier_before))
        return metrics, outputs

    fp = fingerprint(cfg.train.model_dump(exclude=_NOT_RESULTS), resume_fp)
    return run_stage(ctx, "train_online", fp, body)


if __name__ == "__main__":
    _rank_main(sys.argv[1])
