"""One run of one method, in its own child process (`child_main`), and the parent's side of it
(`run_child`: a fresh interpreter, its peak RSS polled over its process tree)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from .memory import memory_phase, rss_mb
from .scoring import Clock, Scorer, heldout_accuracy, policy_kl, task_records
from .settings import APO_BETA1, GRPO_GENERATIONS, PEERS_SCRIPT, ROOT, rollout_steps


def setup_child(threads: int, seed: int) -> None:
    """A child's torch threads and seed, and transformers' logging quietened."""
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _load(path: str):
    from apo_core.modeling import load_model_and_tokenizer

    return load_model_and_tokenizer(path, "float32", "cpu")


# -- apo ----------------------------------------------------------------------------------------------
def run_apo_core(spec: dict) -> dict:
    """apo's stage cores in this process: stage 1 (N reference samples -> V*) on the clock, then
    OnlineTrainer rollout steps, scored between steps with the clock paused."""
    from apo_core.config import TrainConfig
    from apo_core.engines import TransformersEngine
    from apo_core.modeling import reference_of
    from apo_core.rewards import get_reward
    from apo_core.rollouts import aggregate_vstar, sample_reference, training_prompts
    from apo_core.trainer import OnlineTrainer

    model, tok = _load(spec["model"])
    train, test = task_records(spec["train"], spec["test"], tok, spec.get("template", "auto"))
    profiling = spec["mode"] == "memory"
    phases = [memory_phase("policy loaded", model)] if profiling else []
    reward = get_reward("embedded")
    engine = TransformersEngine(model, tok, batch_size=512, autocast_bf16=False)
    P, mnt = spec["prompts_per_step"], spec["max_new_tokens"]
    steps = spec.get("steps") or rollout_steps(spec["passes"], len(train), P)  # race: unbounded, the budget stops it
    clock = Clock()
    curve = spec["mode"] == "curve"  # budget_s: the trainer's own time_budget_s stops it, not the scorer
    exact_reference = _load(spec["model"])[0] if curve else None  # the KL of every point: against fp32 pi_ref, as for TRL
    scorer = Scorer(clock, lambda: model, tok, test, mnt, spec.get("eval_every_s"), None if curve else spec.get("budget_s"),
                    reference=exact_reference, kl_records=spec.get("kl_records", 512), seed=spec["seed"],
                    at_s=spec.get("eval_at_s", ()))
    reference_accuracy = scorer.start() if spec["score"] else (clock.start() or None)
    rows = sample_reference(engine, train, reward, n_samples=spec["n_ref"], temperature=1.0, top_p=1.0,
                            max_new_tokens=mnt, seed=1234 + spec["seed"])
    table = aggregate_vstar([r["prompt_id"] for r in rows], [r["reward"] for r in rows], APO_BETA1)
    # vstar.filter_all_zero: drop the prompts none of whose N reference samples was right (V* = 0)
    prompts = training_prompts(train, table, filter_all_zero=bool(spec.get("filter")))
    stage1_s = clock.elapsed()
    if profiling:
        phases.append(memory_phase("stage 1 sampled", model))
    # apo's documented defaults, with the benchmark's prompts per step, lr, beta2 and lengths (and any
    # other TrainConfig field in spec["train_config"]: --apo-set, bench/apo_seeds.py --set)
    cfg = TrainConfig(**{"steps": steps, "rollout_batch_size": P, "minibatch_size": spec.get("minibatch") or P, "lr": spec["lr"],
                         "beta2": spec["beta2"], "max_new_tokens": mnt, "seed": spec["seed"],
                         **({"checkpoint_every": 10**9} if curve else {}), **spec.get("train_config", {})})
    trainer = OnlineTrainer(model, reference_of(model, cfg.reference_dtype), tok, engine, reward, cfg)
    model.train()
    if profiling:
        phases.append(memory_phase("trainer built", model, trainer.ref_policy, trainer.optimizer))
    tokens = sum(r["n_tokens"] for r in rows)
    if curve:  # the product's loop: train() ends itself when time_budget_s is spent (and checkpoints that step)
        counted = [0.0]

        def on_step(step: int, metrics: dict, _samples) -> None:
            counted[0] += metrics["rollout/response_tokens_mean"] * P
            scorer.after_step(step)  # the clock, and the trainer's, are paused while it scores

        # what is left of the budget once stage 1 and the trainer's set-up are paid goes to train()
        trainer.cfg = trainer.cfg.model_copy(update={"time_budget_s": max(1e-3, spec["budget_s"] - clock.elapsed())})
        with tempfile.TemporaryDirectory(prefix="apo-peers-ckpt-") as ckpt:
            trainer.train(prompts, Path(ckpt), on_step=on_step)
        tokens += counted[0]
    stop = curve
    while trainer.step < steps and not stop:
        metrics, _ = trainer.train_step(trainer.batch_for_step(prompts, trainer.step))
        tokens += metrics["rollout/response_tokens_mean"] * P
        stop = scorer.after_step(trainer.step) if spec["score"] else False
        if profiling:
            phases.append(memory_phase(f"step {trainer.step}", model, trainer.ref_policy, trainer.optimizer))
    wall = clock.elapsed()
    out = {"wall_s": wall, "stage1_s": stage1_s, "steps": trainer.step, "generated_tokens": int(round(tokens)),
           "train_prompts": len(prompts), "minibatch_size": cfg.minibatch_size}
    if profiling:
        out["phases"] = phases
        out["memory_plan"] = dict(trainer.memory)  # the "auto" switches as resolved for this model
        out["params"] = sum(p.numel() for p in model.parameters())
    if spec["score"]:
        out.update(final_accuracy=scorer.finish(trainer.step), reference_accuracy=reference_accuracy,
                   curve=scorer.points, eval_s=scorer.eval_seconds,
                   kl=scorer.points[-1]["kl"] if curve else policy_kl(model, trainer.ref_policy, tok, test, mnt, seed=spec["seed"]))
    return out


def pipeline_overhead(summary: dict, wall_s: float) -> dict:
    """Share of a pipeline run's wall time spent outside stage compute (Prefect, start-up, the
    run's MLflow parent and summary), from its summary.json and the measured wall time.

    >>> pipeline_overhead({"stage_seconds": {"preprocess": 1.0, "train_online": 8.0}}, 10.0)["overhead_frac"]
    0.1
    """
    stages = float(sum(summary["stage_seconds"].values()))
    if wall_s <= 0:
        raise ValueError(f"wall_s must be > 0, got {wall_s}")
    return {"wall_s": round(wall_s, 3), "stage_seconds_total": round(stages, 3),
            "outside_stages_s": round(wall_s - stages, 3), "overhead_frac": round((wall_s - stages) / wall_s, 4),
            "stage_seconds": summary["stage_seconds"]}


def _prefect_env(home: Path) -> None:
    os.environ["PREFECT_HOME"] = str(home)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{home}/prefect.db"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _pipeline_overrides(spec: dict, root: Path, run_id: str, steps: int) -> list[str]:
    P, mnt = spec["prompts_per_step"], spec["max_new_tokens"]
    sets = {"run_id": run_id, "artifact_root": str(root), "data.train_size": spec["train"], "data.test_size": spec["test"],
            "reference.n_samples": spec["n_ref"], "reference.max_new_tokens": mnt, "reference.seed": 1234 + spec["seed"],
            "train.max_new_tokens": mnt, "eval.max_new_tokens": mnt, "train.steps": steps,
            "train.rollout_batch_size": P, "train.minibatch_size": spec.get("minibatch") or P, "train.lr": spec["lr"], "train.beta2": spec["beta2"],
            "train.seed": spec["seed"], "generation.engine": "transformers", "generation.autocast_bf16": False,
            "model.num_threads": spec["threads"], "eval.evaluate_reference": False,
            "vstar.filter_all_zero": bool(spec.get("filter")),
            **{f"train.{k}": v for k, v in spec.get("train_config", {}).items()}}
    return [f"{k}={v}" for k, v in sets.items()]


def run_apo_pipeline(spec: dict) -> dict:
    """apo's full pipeline (the Prefect flow, Parquet, MLflow, checkpoints); the clock is the sum
    of its stage times without `evaluate`, and the trained model is then scored like the others."""
    import polars as pl

    work = Path(tempfile.mkdtemp(prefix="apo-peers-flow-"))
    _prefect_env(work / "prefect")
    try:
        from tasks.config import load_config
        from flows.apo import apo

        train, test = task_records(spec["train"], spec["test"])
        steps = rollout_steps(spec["passes"], len(train), spec["prompts_per_step"])
        cfg = load_config(overrides=_pipeline_overrides(spec, work / "artifacts", "peers", steps))
        t0 = time.perf_counter()
        summary = apo(config=cfg)
        flow_wall = time.perf_counter() - t0
        run = work / "artifacts" / "peers"
        seconds = summary["stage_seconds"]
        samples = pl.read_parquet(run / "sample_reference" / "samples.parquet")
        history = pl.read_parquet(run / "train_online" / "metrics.parquet")
        tokens = int(samples["n_tokens"].sum()) + int(round(float((history["rollout/response_tokens_mean"] * spec["prompts_per_step"]).sum())))
        model, tok = _load(str(run / "train_online" / "model"))
        reference, _ = _load(spec["model"])
        mnt = spec["max_new_tokens"]
        return {
            "wall_s": sum(v for k, v in seconds.items() if k != "evaluate"), "stage_seconds": seconds,
            "steps": steps, "generated_tokens": tokens,
            "final_accuracy": heldout_accuracy(model, tok, test, mnt),
            "reference_accuracy": heldout_accuracy(reference, tok, test, mnt),
            "kl": policy_kl(model, reference, tok, test, mnt, seed=spec["seed"]),
            "pipeline": pipeline_overhead(summary, flow_wall),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- TRL ----------------------------------------------------------------------------------------------
def run_trl(spec: dict) -> dict:
    """TRL GRPOTrainer (8 generations per prompt) or A2POTrainer on the same data, scored by a
    TrainerCallback at step ends with the clock paused."""
    from datasets import Dataset
    from transformers import TrainerCallback

    from apo_core.rewards import gsm8k_reward

    model, tok = _load(spec["model"])
    train, test = task_records(spec["train"], spec["test"], tok, spec.get("template", "auto"))
    reference, _ = _load(spec["model"]) if spec["score"] else (None, None)
    P, mnt = spec["prompts_per_step"], spec["max_new_tokens"]
    counted = {"tokens": 0}

    def embedded_reward(prompts, completions, answer, **kwargs):
        ids = kwargs.get("completion_ids")
        if ids is not None:
            counted["tokens"] += sum(len(x) for x in ids)
        else:  # A2PO passes text only: byte tokens plus the EOS of a finished answer
            counted["tokens"] += sum(len(tok(c, add_special_tokens=False)["input_ids"]) + 1 for c in completions)
        return gsm8k_reward(completions, answer)

    clock = Clock()
    curve = spec["mode"] == "curve"
    scorer = Scorer(clock, lambda: model, tok, test, mnt, spec.get("eval_every_s"), spec.get("budget_s"),
                    reference=reference if curve else None, kl_records=spec.get("kl_records", 512), seed=spec["seed"],
                    at_s=spec.get("eval_at_s", ()))

    class Clocked(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if spec["score"] and scorer.after_step(state.global_step):
                control.should_training_stop = True
            if spec.get("steps") and state.global_step >= spec["steps"]:
                control.should_training_stop = True
            return control

    out_dir = tempfile.mkdtemp(prefix="apo-peers-trl-")
    racing = spec.get("budget_s") is not None
    common = dict(
        output_dir=out_dir, learning_rate=spec["lr"], seed=spec["seed"], data_seed=spec["seed"],
        num_train_epochs=1000 if racing or spec.get("steps") else spec["passes"],
        max_completion_length=mnt, temperature=1.0, top_p=1.0, bf16=False, use_cpu=True,
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
    )
    if spec["mode"] != "memory":  # apo's settings; memory keeps each trainer's documented defaults
        common.update(gradient_checkpointing=False, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01,
                      max_grad_norm=1.0)
    dataset = Dataset.from_list([{"prompt": r.prompt, "answer": r.answer} for r in train])
    if spec["method"] == "trl_grpo":
        from trl import GRPOConfig, GRPOTrainer

        # one optimizer step per P prompts x G generations: one micro-batch in paper/race (fastest here on the
        # tiny model), micro-batches of P (TRL's default 8 at P = 8) x G accumulation steps in memory
        G = spec.get("generations") or GRPO_GENERATIONS
        micro = dict(per_device_train_batch_size=P * G) if spec["mode"] != "memory" else \
            dict(per_device_train_batch_size=P, gradient_accumulation_steps=G)
        args = GRPOConfig(**common, num_generations=G, **micro)
        trainer = GRPOTrainer(model=model, reward_funcs=embedded_reward, args=args, train_dataset=dataset,
                              processing_class=tok, callbacks=[Clocked()])
    else:
        from trl.experimental.a2po import A2POConfig, A2POTrainer

        # filter off: apo's default (the memory mode's random model would otherwise keep no prompt)
        args = A2POConfig(**common, per_device_train_batch_size=P, num_value_samples=spec["n_ref"], beta1=APO_BETA1,
                          beta2=spec["beta2"], filter_all_incorrect=False)
        trainer = A2POTrainer(model=model, reward_funcs=embedded_reward, args=args, train_dataset=dataset,
                              processing_class=tok, callbacks=[Clocked()])
    model = trainer.model
    reference_accuracy = scorer.start() if spec["score"] else (clock.start() or None)
    trainer.train()  # A2PO's stage 1 runs inside train(): on the clock
    wall = clock.elapsed()
    step = trainer.state.global_step
    out = {"wall_s": wall, "steps": step, "generated_tokens": counted["tokens"]}
    if spec["score"]:
        out.update(final_accuracy=scorer.finish(step), reference_accuracy=reference_accuracy, curve=scorer.points,
                   eval_s=scorer.eval_seconds,
                   kl=scorer.points[-1]["kl"] if curve else policy_kl(model, reference, tok, test, mnt, seed=spec["seed"]))
    shutil.rmtree(out_dir, ignore_errors=True)
    return out


def run_gpu_step(spec: dict) -> dict:
    """Stage-2 seconds per step and peak memory of apo (OnlineTrainer) or TRL GRPOTrainer (8
    generations per prompt) on the model at spec["model"], with vLLM where it imports on CUDA
    (apo: its VLLMEngine; TRL: use_vllm, colocate), else transformers generate. Mean of `steps`
    steps after `warmup`; peak accelerator memory = torch's max_memory_allocated."""
    import importlib.util as iu

    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    vllm = cuda and iu.find_spec("vllm") is not None
    train, _ = task_records(max(64, spec["prompts_per_step"] * (spec["warmup"] + spec["steps"])), 1)
    P, mnt, total = spec["prompts_per_step"], spec["max_new_tokens"], spec["warmup"] + spec["steps"]
    from apo_core.modeling import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(spec["model"], "float32", device)
    ends: list[float] = []
    if spec["method"] == "apo":
        from apo_core.config import TrainConfig
        from apo_core.engines import make_engine
        from apo_core.modeling import reference_of
        from apo_core.rewards import get_reward
        from apo_core.rollouts import TrainPrompt
        from apo_core.trainer import OnlineTrainer

        kwargs = dict(gpu_memory_utilization=0.3, max_model_len=256 + mnt) if vllm else dict(batch_size=512, autocast_bf16=False)
        engine = make_engine("vllm" if vllm else "transformers", model, tok, **kwargs)
        cfg = TrainConfig(steps=total, rollout_batch_size=P, minibatch_size=P, max_new_tokens=mnt, lr=1e-6)
        trainer = OnlineTrainer(model, reference_of(model, cfg.reference_dtype), tok, engine, get_reward("embedded"), cfg)
        prompts = [TrainPrompt.of(r, 0.5) for r in train]  # no stage 1: any V* costs the step the same
        model.train()
        trainer._sync_engine()
        ends.append(time.perf_counter())  # step 1 starts here
        for _ in range(total):
            if cuda:
                torch.cuda.synchronize()
            trainer.train_step(trainer.batch_for_step(prompts, trainer.step))
            if cuda:
                torch.cuda.synchronize()
            ends.append(time.perf_counter())
        engine_name = engine.name
    else:
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import GRPOConfig, GRPOTrainer

        from apo_core.rewards import gsm8k_reward

        class StepEnds(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if cuda:
                    torch.cuda.synchronize()
                ends.append(time.perf_counter())
                control.should_training_stop = state.global_step >= total
                return control

        out_dir = tempfile.mkdtemp(prefix="apo-peers-gpu-")
        extra = dict(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.3) if vllm else {}
        if vllm:  # colocated vLLM expects a (one-process) torch.distributed launch
            for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29513")):
                os.environ.setdefault(key, value)
        # one optimizer step per P prompts x 8 generations, in micro-batches of P sequences (apo's forward size)
        args = GRPOConfig(output_dir=out_dir, num_generations=GRPO_GENERATIONS, per_device_train_batch_size=P,
                          gradient_accumulation_steps=GRPO_GENERATIONS,
                          max_completion_length=mnt, bf16=False, use_cpu=not cuda, logging_steps=1, save_strategy="no",
                          report_to=[], disable_tqdm=True, num_train_epochs=100, **extra)
        dataset = Dataset.from_list([{"prompt": r.prompt, "answer": r.answer} for r in train])
        trainer = GRPOTrainer(model=model, reward_funcs=lambda prompts, completions, answer, **kw: gsm8k_reward(completions, answer),
                              args=args, train_dataset=dataset, processing_class=tok, callbacks=[StepEnds()])
        ends.append(time.perf_counter())  # step 1 starts here
        trainer.train()  # its set-up falls into step 1, a warm-up step
        shutil.rmtree(out_dir, ignore_errors=True)
        engine_name = "vllm" if vllm else "transformers"
    durations = [b - a for a, b in zip(ends, ends[1:])]
    timed = durations[spec["warmup"]:]
    return {"device": torch.cuda.get_device_name() if cuda else "cpu", "engine": engine_name, "steps_timed": len(timed),
            "step_s": statistics.mean(timed) if timed else None,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def run_scaling(spec: dict) -> dict:
    """Stage 1's cost against prompts x N (apo's sample_reference at each size), and stage 2's
    seconds per step after a stage 1 of each N (the same prompts, a fresh copy of the reference)."""
    import copy

    from apo_core.config import TrainConfig
    from apo_core.engines import TransformersEngine
    from apo_core.modeling import reference_of
    from apo_core.rewards import get_reward
    from apo_core.rollouts import aggregate_vstar, sample_reference, training_prompts
    from apo_core.trainer import OnlineTrainer

    train, _ = task_records(max([spec["prompts"]] + [p for p, _ in spec["stage1"]]), 1)
    base_model, tok = _load(spec["model"])
    reward, mnt = get_reward("embedded"), spec["max_new_tokens"]
    stage1 = []
    for prompts, n in spec["stage1"]:
        engine = TransformersEngine(base_model, tok, batch_size=512, autocast_bf16=False)
        t0 = time.perf_counter()
        rows = sample_reference(engine, train[:prompts], reward, n_samples=n, temperature=1.0, top_p=1.0,
                                max_new_tokens=mnt, seed=1234)
        stage1.append({"prompts": prompts, "n": n, "samples": prompts * n, "seconds": time.perf_counter() - t0,
                       "tokens": sum(r["n_tokens"] for r in rows)})
    # least squares seconds = fixed + per_sample * samples; r2 says how linear it is
    xs, ys = [r["samples"] for r in stage1], [r["seconds"] for r in stage1]
    mean_x, mean_y = statistics.mean(xs), statistics.mean(ys)
    per_sample = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / max(1e-12, sum((x - mean_x) ** 2 for x in xs))
    fixed = mean_y - per_sample * mean_x
    r2 = 1 - sum((y - fixed - per_sample * x) ** 2 for x, y in zip(xs, ys)) / max(1e-12, sum((y - mean_y) ** 2 for y in ys))
    stage2 = []
    P = spec["prompts_per_step"]
    for n in spec["stage2_n"]:
        model = copy.deepcopy(base_model)
        engine = TransformersEngine(model, tok, batch_size=512, autocast_bf16=False)
        recs = train[: spec["prompts"]]
        rows = sample_reference(engine, recs, reward, n_samples=n, temperature=1.0, top_p=1.0, max_new_tokens=mnt, seed=1234)
        table = aggregate_vstar([r["prompt_id"] for r in rows], [r["reward"] for r in rows], APO_BETA1)
        prompts = training_prompts(recs, table, filter_all_zero=False)
        total = spec["warmup"] + spec["steps"]
        cfg = TrainConfig(steps=total, rollout_batch_size=P, minibatch_size=P, max_new_tokens=mnt, seed=0)
        trainer = OnlineTrainer(model, reference_of(model, cfg.reference_dtype), tok, engine, reward, cfg)
        model.train()
        times = []
        for _ in range(total):
            metrics, _ = trainer.train_step(trainer.batch_for_step(prompts, trainer.step))
            times.append(metrics["time/step_s"])
        stage2.append({"n": n, "step_s": statistics.mean(times[spec["warmup"]:]), "steps_timed": spec["steps"]})
    return {"stage1": stage1, "stage1_seconds_per_sample": per_sample, "stage1_fixed_s": fixed, "stage1_linear_r2": r2,
            "stage2": stage2}


def save_random_model(shape: dict, path: str) -> dict:
    """A randomly initialised Qwen2 of `shape` with the embedded byte tokenizer, saved at `path`."""
    from apo_core.modeling import load_tokenizer, save_random_qwen2

    return {"params": save_random_qwen2(path, shape, load_tokenizer("embedded"))}


def child_main(spec: dict) -> dict:
    """The run `spec` names, in this process (the child that run_child started), with its peak RSS."""
    setup_child(spec["threads"], spec.get("seed", 0))
    if spec["method"] == "save_model":
        out = save_random_model(spec["shape"], spec["path"])
    elif spec["mode"] == "gpu":
        out = run_gpu_step(spec)
    elif spec["mode"] == "scaling":
        out = run_scaling(spec)
    elif spec["method"] == "apo":
        out = run_apo_pipeline(spec) if spec["mode"] == "paper" else run_apo_core(spec)
    else:
        out = run_trl(spec)
    out["peak_rss_mb"] = rss_mb()
    return out


# -- parent side ----------------------------------------------------------------------------------------
def _tree_rss_mb(proc) -> float:
    import psutil

    total = 0
    with contextlib.suppress(psutil.Error):  # the child or one of its own may end between the calls
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
    return total / 2**20


def add_child_arguments(ap) -> None:
    """The hidden flags a bench script answers as a child of run_child: `--child SPEC --result PATH`."""
    import argparse

    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)


def answer_child(args, main: Callable[[dict], dict]) -> bool:
    """As a child (args.child set): run main(spec), write its result where the parent reads it; True."""
    if not args.child:
        return False
    Path(args.result).write_text(json.dumps(main(json.loads(args.child))))
    return True


def run_child(spec: dict, log_dir: Path, name: str, script: Path | None = None) -> dict:
    """child_main(spec) in a fresh interpreter (this one's), its output in <log_dir>/<name>.log;
    the parent polls the child's process tree for its peak RSS. `script`: another bench script
    that answers `--child SPEC --result PATH` the same way (default: bench/peers.py)."""
    import psutil

    script = Path(script or PEERS_SCRIPT).resolve()
    result, log = log_dir / f"{name}.json", log_dir / f"{name}.log"
    cmd = [sys.executable, str(script), "--child", json.dumps(spec), "--result", str(result)]
    print(f"  {name} ...", end=" ", flush=True)
    start, load = time.perf_counter(), os.getloadavg()
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    peak = [0.0]
    with log.open("w") as stream:
        child = subprocess.Popen(cmd, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT, env=env)
        proc = psutil.Process(child.pid)
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(0.05):
                peak[0] = max(peak[0], _tree_rss_mb(proc))

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        code = child.wait()
        stop.set()
        watcher.join()
    if code:
        tail = "".join(log.read_text().splitlines(True)[-30:])
        sys.exit(f"\n{script.stem}: child {name} failed (exit {code}); last lines of {log}:\n{tail}")
    wall = time.perf_counter() - start
    print(f"{wall:.0f}s", flush=True)
    out = {**json.loads(result.read_text()), "peak_rss_tree_mb": round(peak[0], 1), "child_wall_s": round(wall, 2),
           "loadavg_before": load, "spec": spec}
    result.write_text(json.dumps(out))  # with its spec: what `peers.py --reuse` checks before reusing it
    return out

