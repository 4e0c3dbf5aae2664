"""apo against the peers users would pick instead: TRL's GRPOTrainer and its A2POTrainer.

    make bench-env                                                   # bench/.venv-peers: apo + trl 1.16
    bench/.venv-peers/bin/python bench/peers.py                      # full run -> results/peers.json + peers.png
    OMP_NUM_THREADS=1 bench/.venv-peers/bin/python bench/peers.py --quick --threads 1   # mechanics, ~2 min
    .venv/bin/python bench/peers.py --quick --methods apo            # apo only: the product venv suffices

Three methods on the embedded task (apo_core.embedded; the shipped reference model; the embedded
verifier), the same training prompts, the same held-out set, the same thread count:

- `apo`: A*-PO as the product runs it. `paper` runs the real Prefect flow (`flows.apo.apo`) and
  times its stages minus `evaluate` (stage 1 included); `race` and `memory` run the same stage
  cores in-process (rollouts.sample_reference + aggregate_vstar, then OnlineTrainer steps) so that
  the held-out set can be scored between steps.
- `trl_grpo`: TRL GRPOTrainer, 8 generations per prompt.
- `trl_a2po`: TRL experimental A2POTrainer (the same algorithm): num_value_samples = N,
  beta1 = 0.5, beta2 from the sweep, filter_all_incorrect off (apo's default).

Modes (keys of the JSON): `paper` (same prompts, same passes over them: wall_s, final_accuracy,
peak_rss_mb, kl, generated_tokens), `race` (held-out accuracy against wall-clock time, scored
every `eval_every_s`, per seed; time_to_target_s = first time at reference + 10 points, mean over
seeds), `memory` (a random Qwen2.5-0.5B-shaped model, a few steps at the same prompts per step,
each method at its documented defaults: peak_rss_mb), `overhead` (the share of an `apo run`'s
wall time outside stage compute, from its summary.json), `scaling` (stage 1's seconds at four sizes
of prompts x N; stage 2's seconds per step after a stage 1 of each N) and `gpu` (bench/gpu.sh:
stage-2 step time and peak GPU memory, apo vs TRL GRPO, on a random Qwen2.5-1.5B-shaped model).

Fairness rules. Every method runs in its own child process (this script with --child); its peak
RSS is the child's own VmHWM (`peak_rss_mb`) and, polled by the parent with psutil, its whole
process tree (`peak_rss_tree_mb`: the Prefect server of the flow shows there). Evaluation is the
same function for all (`heldout_accuracy`: greedy, apo's TransformersEngine, the embedded
verifier), always run with the method's clock paused: for TRL by a TrainerCallback at step ends.
KL is measured alike after training (`policy_kl`: mean over response tokens of log pi - log pi_ref
on one sampled response per held-out prompt). Tokens generated count completion tokens (EOS
included) of every sample drawn, stage 1 included. TRL runs in fp32 like apo (its bf16 default
is off: no bf16 units on the CI CPU) and, in `paper` and `race`, without gradient checkpointing
(apo has none); `memory` keeps TRL's documented defaults (gradient checkpointing on) except bf16.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata, util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/peers.py` from anywhere: apo_core, tasks, flows importable
    sys.path.insert(0, str(ROOT))

METHODS = ("apo", "trl_grpo", "trl_a2po")
MODES = ("paper", "race", "memory", "overhead", "scaling", "gpu")
GRPO_GENERATIONS = 8
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768)
QWEN25_15B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768)
TINY_SHAPE = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)

SIZES = {
    # sized for about an hour on 2 cores (a TRL GRPO step of 64 prompts x 8 generations takes ~7 s there)
    "full": dict(train=512, test=500, n_ref=8, max_new_tokens=64, prompts_per_step=64, passes=4,
                 race_budget_s=150.0, eval_every_s=15.0, seeds=[0, 1, 2],
                 lr={"apo": [1e-4, 3e-4], "trl_grpo": [1e-4, 3e-4], "trl_a2po": [1e-4, 3e-4]}, beta2=[1e-3, 0.1],
                 memory=dict(shape=QWEN25_05B, steps=2, prompts_per_step=8, max_new_tokens=16),
                 overhead=dict(train=1024, test=500),
                 scaling=dict(stage1=[[128, 8], [256, 8], [512, 4], [512, 8]], stage2_n=[2, 8, 32], prompts=128, warmup=1, steps=3)),
    "quick": dict(train=16, test=16, n_ref=2, max_new_tokens=48, prompts_per_step=8, passes=1,
                  race_budget_s=6.0, eval_every_s=3.0, seeds=[0],
                  lr={"apo": [1e-4], "trl_grpo": [1e-4], "trl_a2po": [1e-4]}, beta2=[0.1],
                  memory=dict(shape=TINY_SHAPE, steps=2, prompts_per_step=4, max_new_tokens=8),
                  overhead=dict(train=16, test=8, steps=2),
                  scaling=dict(stage1=[[8, 1], [8, 2], [16, 2], [16, 4]], stage2_n=[1, 4], prompts=16, warmup=1, steps=1)),
}
# bench/gpu.sh: stage-2 step time and peak accelerator memory on a random Qwen2 (no weights can be
# downloaded on the lent GPU machine); `tiny` is the CPU check of the same code.
GPU_SIZES = {
    # 16 prompts x 256 tokens: apo's minibatch is one forward (its logits alone are 16 x 270 x 151936 fp32 = 2.6 GB);
    # GRPO takes the same 16 sequences per micro-batch, 8 micro-batches per step (8 generations per prompt).
    "1.5b": dict(shape=QWEN25_15B, prompts_per_step=16, max_new_tokens=256, warmup=1, steps=2),
    "tiny": dict(shape=TINY_SHAPE, prompts_per_step=4, max_new_tokens=8, warmup=1, steps=2),
}


# -- measurements shared by every method (child side) ----------------------------------------------
class Clock:
    """Wall clock of one method's training that evaluation pauses."""

    def __init__(self) -> None:
        self._start: float | None = None
        self._paused = 0.0

    def start(self) -> None:
        self._start = time.perf_counter()

    def elapsed(self) -> float:
        return 0.0 if self._start is None else time.perf_counter() - self._start - self._paused

    @contextlib.contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - t0


def task_records(train: int, test: int):
    """(training, held-out) prompt records of the embedded task, exactly as preprocess makes them."""
    from apo_core.config import DataConfig
    from apo_core.data import embedded_prompt_set

    records = embedded_prompt_set(DataConfig(train_size=train, test_size=test))
    return [r for r in records if r.split == "train"], [r for r in records if r.split == "test"]


def heldout_accuracy(model, tokenizer, records, max_new_tokens: int) -> float:
    """Greedy held-out accuracy: the one evaluation every method is scored with."""
    from apo_core.engines import TransformersEngine
    from apo_core.rewards import get_reward
    from apo_core.rollouts import evaluate

    engine = TransformersEngine(model, tokenizer, batch_size=512, autocast_bf16=False)
    _, metrics = evaluate(engine, records, get_reward("embedded"), max_new_tokens=max_new_tokens)
    return float(metrics["accuracy"])


def policy_kl(model, reference, tokenizer, records, max_new_tokens: int, seed: int = 0) -> float:
    """Mean over response tokens of log pi - log pi_ref, on one response per held-out prompt
    sampled from the policy at temperature 1 (the paper's logged KL)."""
    import torch

    from apo_core.engines import TransformersEngine
    from apo_core.modeling import collate, response_logprobs
    from apo_core.objectives import masked_mean

    engine = TransformersEngine(model, tokenizer, batch_size=512, autocast_bf16=False)
    prompts = [r.prompt for r in records]
    completions = engine.generate(prompts, temperature=1.0, max_new_tokens=max_new_tokens, seed=seed)
    batch = collate(engine.prompt_token_ids(prompts), [c.token_ids for c in completions], tokenizer.pad_token_id)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        diff = response_logprobs(model, batch) - response_logprobs(reference, batch)
    model.train(was_training)
    return float(masked_mean(diff, batch.response_mask))


class Scorer:
    """Scores the held-out set with the clock paused: at t = 0 (the reference), every
    `every_s` of training time (None: only at the end), and at the end; says when time is up."""

    def __init__(self, clock: Clock, model_fn, tokenizer, records, max_new_tokens: int,
                 every_s: float | None, budget_s: float | None):
        self.clock, self.model_fn, self.tokenizer, self.records = clock, model_fn, tokenizer, records
        self.max_new_tokens, self.every_s, self.budget_s = max_new_tokens, every_s, budget_s
        self.points: list[dict] = []
        self.eval_seconds = 0.0
        self._next = every_s

    def score(self, step: int) -> float:
        t0 = time.perf_counter()
        with self.clock.paused():
            acc = heldout_accuracy(self.model_fn(), self.tokenizer, self.records, self.max_new_tokens)
        self.eval_seconds += time.perf_counter() - t0
        self.points.append({"t_s": round(self.clock.elapsed(), 3), "step": step, "accuracy": acc})
        return acc

    def start(self) -> float:
        """The reference's accuracy, then the clock starts."""
        acc = self.score(0)
        self.clock.start()
        return acc

    def after_step(self, step: int) -> bool:
        """Score if an interval has passed; True when the time budget is spent."""
        if self._next is not None and self.clock.elapsed() >= self._next:
            self.score(step)
            while self._next <= self.clock.elapsed():
                self._next += self.every_s
        return self.budget_s is not None and self.clock.elapsed() >= self.budget_s

    def finish(self, step: int) -> float:
        if not self.points or self.points[-1]["step"] != step or len(self.points) == 1:
            self.score(step)
        return self.points[-1]["accuracy"]


def _rss_mb(field: str = "VmHWM") -> float:
    """Peak resident set of this process so far (VmHWM), or the current one (VmRSS), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _tensor_mb(tensors) -> float:
    """MB held by the distinct storages of `tensors` (tied or shared tensors counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is not None and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total / 2**20


def memory_phase(name: str, policy, reference=None, optimizer=None) -> dict:
    """One row of the memory mode's profile: the process's resident set now and at its peak, and
    what its tensors hold: the policy's weights, pi_ref's stored weights, AdamW's moments and the
    gradients alive at that moment."""
    row = {"phase": name, "rss_mb": round(_rss_mb("VmRSS"), 1), "peak_rss_mb": round(_rss_mb(), 1),
           "policy_mb": round(_tensor_mb(policy.parameters()), 1),
           "gradients_mb": round(_tensor_mb(p.grad for p in policy.parameters()), 1)}
    if reference is not None:
        row["reference_mb"] = round(_tensor_mb([*reference.parameters(), *reference.buffers()]), 1)
    if optimizer is not None:
        row["optimizer_state_mb"] = round(_tensor_mb(t for st in optimizer.state.values() for t in st.values()
                                                     if hasattr(t, "untyped_storage")), 1)
    return row


def parse_train_overrides(items: list[str], prog: str, flag: str) -> dict:
    """`FIELD=VALUE` items as TrainConfig overrides (JSON values; a bare word is a string). A
    malformed item or an unknown field exits with one line."""
    from apo_core.config import TrainConfig

    extra = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"{prog}: {flag} wants FIELD=VALUE, got {item!r}")
        try:
            extra[key] = json.loads(value)  # numbers, true/false, null
        except json.JSONDecodeError:
            extra[key] = value  # a bare word: reference_dtype=bfloat16
    unknown = sorted(set(extra) - set(TrainConfig.model_fields))
    if unknown:
        sys.exit(f"{prog}: {flag} {', '.join(unknown)}: not a TrainConfig field")
    return extra


def _setup(threads: int, seed: int) -> None:
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
    from apo_core.rollouts import aggregate_vstar, sample_reference
    from apo_core.trainer import OnlineTrainer, TrainPrompt

    train, test = task_records(spec["train"], spec["test"])
    model, tok = _load(spec["model"])
    profiling = spec["mode"] == "memory"
    phases = [memory_phase("policy loaded", model)] if profiling else []
    reward = get_reward("embedded")
    engine = TransformersEngine(model, tok, batch_size=512, autocast_bf16=False)
    P, mnt = spec["prompts_per_step"], spec["max_new_tokens"]
    steps = spec.get("steps") or rollout_steps(spec["passes"], len(train), P)  # race: unbounded, the budget stops it
    clock = Clock()
    scorer = Scorer(clock, lambda: model, tok, test, mnt, spec.get("eval_every_s"), spec.get("budget_s"))
    reference_accuracy = scorer.start() if spec["score"] else (clock.start() or None)
    rows = sample_reference(engine, train, reward, n_samples=spec["n_ref"], temperature=1.0, top_p=1.0,
                            max_new_tokens=mnt, seed=1234 + spec["seed"])
    table = aggregate_vstar([r["prompt_id"] for r in rows], [r["reward"] for r in rows], 0.5)
    v_of = {row["prompt_id"]: row["vstar"] for row in table}
    # vstar.filter_all_zero: drop the prompts none of whose N reference samples was right (V* = 0)
    kept = {row["prompt_id"] for row in table if row["pass_at_n"] > 0 or not spec.get("filter")}
    prompts = [TrainPrompt(r.prompt_id, r.prompt, r.answer, v_of[r.prompt_id]) for r in train if r.prompt_id in kept]
    stage1_s = clock.elapsed()
    if profiling:
        phases.append(memory_phase("stage 1 sampled", model))
    # apo's documented defaults, with the benchmark's prompts per step, lr, beta2 and lengths (and any
    # other TrainConfig field in spec["train_config"]: --apo-set, bench/apo_seeds.py --set)
    cfg = TrainConfig(**{"steps": steps, "rollout_batch_size": P, "minibatch_size": spec.get("minibatch") or P, "lr": spec["lr"],
                         "beta2": spec["beta2"], "max_new_tokens": mnt, "seed": spec["seed"], **spec.get("train_config", {})})
    trainer = OnlineTrainer(model, reference_of(model, cfg.reference_dtype), tok, engine, reward, cfg)
    model.train()
    if profiling:
        phases.append(memory_phase("trainer built", model, trainer.ref_policy, trainer.optimizer))
    tokens = sum(r["n_tokens"] for r in rows)
    stop = False
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
    if spec["score"]:
        out.update(final_accuracy=scorer.finish(trainer.step), reference_accuracy=reference_accuracy,
                   curve=scorer.points, eval_s=scorer.eval_seconds,
                   kl=policy_kl(model, trainer.ref_policy, tok, test, mnt, seed=spec["seed"]))
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
        from apo_core.config import load_config
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

    train, test = task_records(spec["train"], spec["test"])
    model, tok = _load(spec["model"])
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
    scorer = Scorer(clock, lambda: model, tok, test, mnt, spec.get("eval_every_s"), spec.get("budget_s"))

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
        args = A2POConfig(**common, per_device_train_batch_size=P, num_value_samples=spec["n_ref"], beta1=0.5,
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
                   eval_s=scorer.eval_seconds, kl=policy_kl(model, reference, tok, test, mnt, seed=spec["seed"]))
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
        from apo_core.trainer import OnlineTrainer, TrainPrompt

        kwargs = dict(gpu_memory_utilization=0.3, max_model_len=256 + mnt) if vllm else dict(batch_size=512, autocast_bf16=False)
        engine = make_engine("vllm" if vllm else "transformers", model, tok, **kwargs)
        cfg = TrainConfig(steps=total, rollout_batch_size=P, minibatch_size=P, max_new_tokens=mnt, lr=1e-6)
        trainer = OnlineTrainer(model, reference_of(model, cfg.reference_dtype), tok, engine, get_reward("embedded"), cfg)
        prompts = [TrainPrompt(r.prompt_id, r.prompt, r.answer, 0.5) for r in train]
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
    from apo_core.rollouts import aggregate_vstar, sample_reference
    from apo_core.trainer import OnlineTrainer, TrainPrompt

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
        v_of = {r["prompt_id"]: r["vstar"] for r in aggregate_vstar([r["prompt_id"] for r in rows], [r["reward"] for r in rows], 0.5)}
        prompts = [TrainPrompt(r.prompt_id, r.prompt, r.answer, v_of[r.prompt_id]) for r in recs]
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
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from apo_core.modeling import load_tokenizer

    tok = load_tokenizer("embedded")
    torch.manual_seed(0)
    cfg = Qwen2Config(**shape, tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.eos_token_id)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return {"params": sum(p.numel() for p in model.parameters())}


def child_main(spec: dict) -> dict:
    _setup(spec["threads"], spec.get("seed", 0))
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
    out["peak_rss_mb"] = _rss_mb()
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


def run_child(spec: dict, log_dir: Path, name: str, script: Path | None = None) -> dict:
    """child_main(spec) in a fresh interpreter (this one's), its output in <log_dir>/<name>.log;
    the parent polls the child's process tree for its peak RSS. `script`: another bench script
    that answers `--child SPEC --result PATH` the same way (default: this one)."""
    import psutil

    script = Path(script or __file__).resolve()
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
    out = json.loads(result.read_text())
    wall = time.perf_counter() - start
    print(f"{wall:.0f}s", flush=True)
    return {**out, "peak_rss_tree_mb": round(peak[0], 1), "child_wall_s": round(wall, 2), "loadavg_before": load}


def time_to_target(curve: list[dict], target: float) -> float | None:
    """First training time at which held-out accuracy reached `target` (None: never).

    >>> time_to_target([{"t_s": 0, "accuracy": 0.3}, {"t_s": 5, "accuracy": 0.45}], 0.4)
    5
    """
    return next((p["t_s"] for p in curve if p["accuracy"] >= target - 1e-9), None)


def _sweep(method: str, lrs: dict, beta2s: list[float], minibatches: list[int] | None = None,
           filters: list[int] | None = None, generations: list[int] | None = None) -> list[dict]:
    """Sweep points: lr x beta2 (apo and A2PO) x apo's minibatch size (when given: optimizer
    steps per rollout step = prompts per step / minibatch) x apo's vstar.filter_all_zero (when
    given: 0 keeps every prompt, 1 drops those whose N reference rewards are all 0) x GRPO's
    generations per prompt (when given; otherwise GRPO_GENERATIONS)."""
    b2 = beta2s if method in ("apo", "trl_a2po") else [None]
    points = [{"lr": lr, "beta2": b} for lr in lrs[method] for b in b2]
    if method == "apo" and minibatches:
        points = [{**p, "minibatch": m} for p in points for m in minibatches]
    if method == "apo" and filters:
        points = [{**p, "filter": f} for p in points for f in filters]
    if method == "trl_grpo" and generations:
        points = [{**p, "generations": g} for p in points for g in generations]
    return points


def _tag(method: str, point: dict, seed: int | None = None) -> str:
    tag = f"{method}-lr{point['lr']:g}" + (f"-b2{point['beta2']:g}" if point["beta2"] is not None else "")
    tag += f"-mb{point['minibatch']}" if point.get("minibatch") else ""
    tag += "-filter" if point.get("filter") else ""
    tag += f"-g{point['generations']}" if point.get("generations") else ""
    return tag + (f"-s{seed}" if seed is not None else "")


def measure_paper(methods, s: dict, base: dict, log_dir: Path) -> dict:
    out = {}
    for method in methods:
        runs = []
        for point in _sweep(method, s["lr"], s["beta2"], s.get("minibatch_apo"), s.get("filter_apo"), s.get("grpo_generations")):
            spec = {**base, **point, "method": method, "mode": "paper", "seed": s["seeds"][0], "score": True,
                    "passes": s["passes"], "beta2": point["beta2"] or 0.0}
            runs.append({**point, **run_child(spec, log_dir, "paper-" + _tag(method, point))})
        best = max(runs, key=lambda r: (r["final_accuracy"], -r["wall_s"]))
        out[method] = {k: best[k] for k in ("wall_s", "final_accuracy", "peak_rss_mb", "kl", "generated_tokens",
                                            "reference_accuracy", "peak_rss_tree_mb", "lr", "beta2", "steps")}
        for key in ("minibatch", "filter", "generations"):
            if best.get(key):
                out[method][key] = best[key]
        if "pipeline" in best:
            out[method]["pipeline"] = best["pipeline"]
        out[method]["sweep"] = runs
    return out


def measure_race(methods, s: dict, base: dict, log_dir: Path, paper: dict | None = None) -> dict:
    """`paper` given: each method races at its best `paper` point only (its sweep is reported
    there); 3 seeds x every point would take hours at full size."""
    out = {}
    for method in methods:
        points = []
        sweep = _sweep(method, s["lr"], s["beta2"], s.get("minibatch_apo"), s.get("filter_apo"), s.get("grpo_generations"))
        if paper and method in paper:
            sweep = [{k: paper[method][k] for k in ("lr", "beta2", "minibatch", "filter", "generations") if k in paper[method]}]
        for point in sweep:
            seeds = []
            for seed in s["seeds"]:
                spec = {**base, **point, "method": method, "mode": "race", "seed": seed, "score": True, "steps": 10**9,
                        "beta2": point["beta2"] or 0.0, "budget_s": s["race_budget_s"], "eval_every_s": s["eval_every_s"]}
                r = run_child(spec, log_dir, "race-" + _tag(method, point, seed))
                r["time_to_target_s"] = time_to_target(r["curve"], r["reference_accuracy"] + 0.10)
                seeds.append({"seed": seed, **r})
            reached = [r["time_to_target_s"] for r in seeds if r["time_to_target_s"] is not None]
            points.append({**point, "seeds": seeds, "reached": len(reached),
                           "time_to_target_s": statistics.mean(reached) if len(reached) == len(seeds) else None,
                           "final_accuracy": statistics.mean(r["final_accuracy"] for r in seeds),
                           "peak_rss_mb": max(r["peak_rss_mb"] for r in seeds)})
        best = min(points, key=lambda p: (p["time_to_target_s"] is None, p["time_to_target_s"] or 0.0, -p["final_accuracy"]))
        out[method] = {"time_to_target_s": best["time_to_target_s"], "final_accuracy": best["final_accuracy"],
                       "peak_rss_mb": best["peak_rss_mb"], "lr": best["lr"], "beta2": best["beta2"],
                       "reached": best["reached"], "seeds": len(s["seeds"]),
                       "curve": [{"seed": r["seed"], "points": r["curve"]} for r in best["seeds"]], "sweep": points}
    return out


def measure_memory(methods, s: dict, base: dict, log_dir: Path) -> dict:
    m = s["memory"]
    model_dir = tempfile.mkdtemp(prefix="apo-peers-qwen2-")
    try:
        saved = run_child({"method": "save_model", "mode": "memory", "threads": base["threads"], "shape": m["shape"],
                           "path": model_dir}, log_dir, "memory-save-model")
        out = {"model": {"params": saved["params"], "shape": m["shape"]}}
        for method in methods:
            # the training prompts are exactly those of the measured steps (stage 1 samples each N times)
            spec = {**base, "model": model_dir, "method": method, "mode": "memory", "seed": 0, "score": False,
                    "train": m["steps"] * m["prompts_per_step"], "test": 1, "steps": m["steps"], "prompts_per_step": m["prompts_per_step"], "max_new_tokens": m["max_new_tokens"],
                    "lr": 1e-6, "beta2": 1e-3, "passes": 1}  # lr / beta2: the documented defaults of apo's paper config and TRL
            r = run_child(spec, log_dir, f"memory-{method}")
            out[method] = {k: r[k] for k in ("peak_rss_mb", "peak_rss_tree_mb", "wall_s", "steps", "phases", "memory_plan")
                           if k in r}
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    return out


def measure_gpu(methods, size: str, base: dict, log_dir: Path) -> dict:
    """Stage-2 step time and peak accelerator memory, apo vs TRL GRPO, on a random Qwen2 (bench/gpu.sh)."""
    g = GPU_SIZES[size]
    model_dir = tempfile.mkdtemp(prefix="apo-peers-gpu-model-")
    try:
        saved = run_child({"method": "save_model", "mode": "gpu", "threads": base["threads"], "shape": g["shape"],
                           "path": model_dir}, log_dir, "gpu-save-model")
        out = {"model": {"params": saved["params"], "shape": g["shape"]}, "size": size,
               **{k: g[k] for k in ("prompts_per_step", "max_new_tokens", "warmup", "steps")}}
        for method in [m for m in methods if m in ("apo", "trl_grpo")]:
            spec = {**base, **{k: g[k] for k in ("prompts_per_step", "max_new_tokens", "warmup", "steps")},
                    "model": model_dir, "method": method, "mode": "gpu", "seed": 0}
            r = run_child(spec, log_dir, f"gpu-{method}")
            out[method] = {k: r[k] for k in ("step_s", "steps_timed", "peak_gpu_mb", "peak_rss_mb", "peak_rss_tree_mb", "engine", "device")}
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    return out


def measure_overhead(s: dict, base: dict, log_dir: Path) -> dict:
    """`apo run` (what `make run` runs), timed from outside, against its own stage seconds."""
    o = s["overhead"]
    work = Path(tempfile.mkdtemp(prefix="apo-peers-overhead-"))
    try:
        cmd = [str(Path(sys.executable).parent / "apo"), "run", "--run-id", "overhead", "--set", f"artifact_root={work}",
               "--set", "generation.engine=auto", "--set", f"data.train_size={o['train']}", "--set", f"data.test_size={o['test']}"]
        if o.get("steps"):
            cmd += ["--set", f"train.steps={o['steps']}", "--set", "train.rollout_batch_size=8", "--set", "train.minibatch_size=8"]
        env = {**os.environ, "PREFECT_HOME": str(work / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{work}/prefect/prefect.db",
               "OMP_NUM_THREADS": str(base["threads"])}
        # `make venv` creates and migrates Prefect's database once; do the same here, timed apart
        t0 = time.perf_counter()
        subprocess.run([str(Path(sys.executable).parent / "prefect"), "server", "database", "upgrade", "-y"], env=env,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        setup_s = time.perf_counter() - t0
        print("  overhead (apo run) ...", end=" ", flush=True)
        t0 = time.perf_counter()
        with (log_dir / "overhead.log").open("w") as stream:
            code = subprocess.run(cmd, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT, env=env).returncode
        wall = time.perf_counter() - t0
        if code:
            sys.exit(f"\npeers: `apo run` failed (exit {code}); see {log_dir / 'overhead.log'}")
        print(f"{wall:.0f}s", flush=True)
        summary = json.loads((work / "overhead" / "summary.json").read_text())
        return {**pipeline_overhead(summary, wall), "command": " ".join(cmd[1:]), "prefect_db_setup_s": round(setup_s, 3)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def targets(results: dict) -> dict:
    """The issue's targets, each with its ratio and whether it is met (None where not measured)."""
    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b

    paper, race, memory = results.get("paper", {}), results.get("race", {}), results.get("memory", {})
    t = {}
    if "apo" in paper and "trl_grpo" in paper:
        r = ratio(paper["apo"]["wall_s"], paper["trl_grpo"]["wall_s"])
        gap = paper["apo"]["final_accuracy"] - paper["trl_grpo"]["final_accuracy"]
        t["paper_apo_over_grpo_wall"] = {"value": r, "target": "<= 0.5", "met": r is not None and r <= 0.5}
        t["paper_apo_minus_grpo_accuracy"] = {"value": gap, "target": ">= -0.02", "met": gap >= -0.02}
    peers = [memory[m]["peak_rss_mb"] for m in ("trl_grpo", "trl_a2po") if m in memory]
    if "apo" in memory and peers:
        r = ratio(memory["apo"]["peak_rss_mb"], min(peers))
        t["memory_apo_over_lower_peer_rss"] = {"value": r, "target": "<= 0.8", "met": r is not None and r <= 0.8}
    for peer, bound in (("trl_a2po", 0.7), ("trl_grpo", None)):
        if "apo" in race and peer in race:
            mine, theirs = race["apo"]["time_to_target_s"], race[peer]["time_to_target_s"]
            r = ratio(mine, theirs)
            entry = {"value": r, "target": f"<= {bound}" if bound else "reported"}
            if mine is not None and theirs is None:  # the peer never got there within the budget: an upper bound
                entry["value"], entry["upper_bound"] = None, mine / results["settings"]["race_budget_s"]
                entry["note"] = f"{peer} did not reach the target within the race budget in every seed"
                r = entry["upper_bound"]
            entry["met"] = (r is not None and r <= bound) if bound else None
            t[f"race_apo_over_{peer}_time_to_target"] = entry
    if "scaling" in results:
        sc = results["scaling"]
        t["stage1_linear_r2"] = {"value": sc["stage1_linear_r2"], "target": "reported (1 = linear in prompts x N)", "met": None}
        steps = [x["step_s"] for x in sc["stage2"]]
        t["stage2_step_s_max_over_min_across_n"] = {"value": max(steps) / min(steps), "target": "reported (1 = N-independent)", "met": None}
    gpu = results.get("gpu", {})
    if "apo" in gpu and "trl_grpo" in gpu:
        for key in ("step_s", "peak_gpu_mb"):
            t[f"gpu_apo_over_grpo_{key}"] = {"value": ratio(gpu["apo"][key], gpu["trl_grpo"][key]), "target": "reported", "met": None}
    if "overhead" in results:
        f = results["overhead"]["overhead_frac"]
        t["pipeline_overhead_frac"] = {"value": f, "target": "<= 0.10", "met": f <= 0.10}
    return t


def plot(race: dict, path: Path) -> None:
    """Held-out accuracy against training time, one colour per method (each seed a line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (method, r) in enumerate((m, race[m]) for m in METHODS if m in race):
        for j, run in enumerate(r["curve"]):
            xs, ys = [p["t_s"] for p in run["points"]], [100 * p["accuracy"] for p in run["points"]]
            ax.plot(xs, ys, marker="o", ms=3, color=f"C{i}", alpha=1.0 if j == 0 else 0.45,
                    label=f"{method} (lr {r['lr']:g}" + (f", beta2 {r['beta2']:g})" if r["beta2"] else ")") if j == 0 else None)
    ax.set_xlabel("training wall time, s (evaluation excluded; stage 1 included)")
    ax.set_ylabel("held-out greedy accuracy, %")
    ax.set_title("embedded task: apo vs TRL, best of each sweep")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine(threads: int) -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    versions = {}
    for p in ("torch", "transformers", "trl", "accelerate", "datasets", "polars", "prefect", "mlflow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[p] = metadata.version(p)
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "python": sys.executable, "versions": versions}


def base_spec(s: dict, threads: int) -> dict:
    """What every child of a size shares: the model, the threads, the data and the step shape."""
    return {"model": "embedded", "threads": threads, "train": s["train"], "test": s["test"], "n_ref": s["n_ref"],
            "max_new_tokens": s["max_new_tokens"], "prompts_per_step": s["prompts_per_step"]}


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def rollout_steps(passes: int, prompts: int, per_step: int) -> int:
    """Rollout steps for `passes` passes over `prompts` training prompts, `per_step` per step (the last partial)."""
    return -(-passes * prompts // per_step)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: the mechanics in a couple of minutes")
    ap.add_argument("--modes", default="paper,race,memory,overhead,scaling", help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of every method (the same for all)")
    for method in METHODS:
        ap.add_argument(f"--lr-{method.replace('_', '-')}", type=_floats, default=None,
                        help=f"learning rates swept for {method} (comma list)")
    ap.add_argument("--beta2", type=_floats, default=None, help="beta2 values swept for apo and trl_a2po (comma list)")
    ap.add_argument("--minibatch-apo", type=_ints, default=None,
                    help="apo's minibatch sizes swept (comma list; default: one update per rollout step)")
    ap.add_argument("--filter-apo", type=_ints, default=None,
                    help="apo's vstar.filter_all_zero values swept (comma list of 0/1; default: off)")
    ap.add_argument("--apo-set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a TrainConfig field for every apo run (repeatable; e.g. reference_dtype=model)")
    ap.add_argument("--grpo-generations", type=_ints, default=None,
                    help=f"generations per prompt swept for trl_grpo (comma list, each >= 2; default {GRPO_GENERATIONS})")
    ap.add_argument("--seeds", type=_ints, default=None, help="race seeds")
    ap.add_argument("--passes", type=int, default=None, help="paper: passes over the training prompts")
    ap.add_argument("--race-sweep", choices=("best", "all"), default="best",
                    help="race: only each method's best paper point (when paper runs too), or the whole sweep")
    ap.add_argument("--race-budget-s", type=float, default=None, help="race: training seconds per run")
    ap.add_argument("--eval-every-s", type=float, default=None, help="race: held-out scoring interval (training seconds)")
    ap.add_argument("--gpu-size", choices=sorted(GPU_SIZES), default="1.5b", help="gpu mode: the random model (tiny: CPU check)")
    ap.add_argument("--out", type=Path, default=None, help="JSON (default results/peers.json, --quick: results/peers-quick.json)")
    ap.add_argument("--merge", type=Path, nargs="*", default=[],
                    help="earlier peers JSONs whose modes this run does not measure are copied in (their run info under `parts`)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        result = child_main(json.loads(args.child))
        Path(args.result).write_text(json.dumps(result))
        return

    s = json.loads(json.dumps(SIZES["quick" if args.quick else "full"]))
    for method in METHODS:
        given = getattr(args, f"lr_{method}")
        if given:
            s["lr"][method] = given
    for key in ("beta2", "seeds", "passes", "race_budget_s", "eval_every_s", "minibatch_apo", "filter_apo",
                "grpo_generations"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    if any(g < 2 for g in s.get("grpo_generations") or []):  # one response has no group to normalise against
        sys.exit(f"peers: --grpo-generations must be at least 2 each, got {s['grpo_generations']}")
    modes = [m for m in args.modes.split(",") if m]
    methods = [m for m in args.methods.split(",") if m]
    for name, given, valid in (("mode", modes, MODES), ("method", methods, METHODS)):
        bad = [g for g in given if g not in valid]
        if bad or not given:
            sys.exit(f"peers: unknown {name} {bad or given}; valid: {', '.join(valid)}")
    if any(m.startswith("trl") for m in methods) and util.find_spec("trl") is None:
        sys.exit(f"peers: trl is not installed in {sys.executable}; run `make bench-env` and use "
                 "bench/.venv-peers/bin/python (or pass --methods apo)")
    out_path = args.out or ROOT / "bench" / "results" / ("peers-quick.json" if args.quick else "peers.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="apo-peers-logs-"))
    base = base_spec(s, args.threads)
    if args.apo_set:
        s["apo_train_config"] = base["train_config"] = parse_train_overrides(args.apo_set, "peers", "--apo-set")
    print(f"peers: modes {modes}, methods {methods}, {args.threads} threads; child logs in {log_dir}")
    started = time.time()
    results: dict = {}
    if "paper" in modes:
        results["paper"] = measure_paper(methods, s, base, log_dir)
    if "race" in modes:
        results["race"] = measure_race(methods, s, base, log_dir, results.get("paper") if args.race_sweep == "best" else None)
    if "memory" in modes:
        results["memory"] = measure_memory(methods, s, base, log_dir)
    if "overhead" in modes:
        results["overhead"] = measure_overhead(s, base, log_dir)
    if "scaling" in modes:
        results["scaling"] = run_child({**base, **s["scaling"], "method": "apo", "mode": "scaling", "seed": 0}, log_dir, "scaling")
    if "gpu" in modes:
        results["gpu"] = measure_gpu(methods, args.gpu_size, base, log_dir)
    results["settings"] = {"size": "quick" if args.quick else "full", "modes": modes, "methods": methods, **s,
                           "grpo_generations": s.get("grpo_generations") or [GRPO_GENERATIONS], "beta1": 0.5}
    for earlier in args.merge:
        part = json.loads(earlier.read_text())
        taken = [m for m in MODES if m in part and m not in results]
        results.update({m: part[m] for m in taken})
        results.setdefault("parts", []).append({"file": earlier.name, "modes": taken, "run": part.get("run"),
                                                "settings": part.get("settings")})
    results["targets"] = targets(results)
    results["machine"] = machine(args.threads)
    results["run"] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "wall_s": round(time.time() - started, 1), "command": " ".join([Path(sys.executable).name, *sys.argv]),
                      "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
                      "loadavg_end": os.getloadavg()}
    if "race" in results:
        png = out_path.with_suffix(".png")
        plot(results["race"], png)
        results["run"]["plot"] = str(png.relative_to(ROOT) if png.is_relative_to(ROOT) else png)
    out_path.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))
    print(f"wrote {out_path}")
    shutil.rmtree(log_dir, ignore_errors=True)


def report(r: dict) -> str:
    lines = []
    if "paper" in r:
        lines.append("paper: same prompts, same passes (wall = training clock, evaluation excluded)")
        for m, v in r["paper"].items():
            lines.append(f"  {m:9s} wall {v['wall_s']:7.1f} s  acc {100 * v['final_accuracy']:5.1f}% (ref {100 * v['reference_accuracy']:.1f}%)"
                         f"  kl {v['kl']:.4f}  tokens {v['generated_tokens']:>9d}  peak {v['peak_rss_mb']:6.0f} MB  lr {v['lr']:g}"
                         + (f"  generations {v['generations']}" if v.get("generations") else ""))
    if "race" in r:
        lines.append("race: time to reference + 10 points (mean over seeds)")
        for m, v in r["race"].items():
            ttt = "never" if v["time_to_target_s"] is None else f"{v['time_to_target_s']:.1f} s"
            lines.append(f"  {m:9s} {ttt:>9s} ({v['reached']}/{v['seeds']} seeds)  final acc {100 * v['final_accuracy']:5.1f}%  peak {v['peak_rss_mb']:6.0f} MB")
    if "memory" in r:
        lines.append(f"memory: random Qwen2 {r['memory']['model']['params'] / 1e6:.1f}M params")
        for m in METHODS:
            if m in r["memory"]:
                lines.append(f"  {m:9s} peak {r['memory'][m]['peak_rss_mb']:7.0f} MB (tree {r['memory'][m]['peak_rss_tree_mb']:.0f})")
        for ph in r["memory"].get("apo", {}).get("phases", []):  # apo's profile: where its memory is, phase by phase
            held = "  ".join(f"{k[:-3]} {ph[k]:.1f}" for k in ("policy_mb", "reference_mb", "optimizer_state_mb", "gradients_mb") if k in ph)
            lines.append(f"    apo {ph['phase']:16s} rss {ph['rss_mb']:7.0f}  peak {ph['peak_rss_mb']:7.0f} MB  ({held} MB)")
    if "scaling" in r:
        sc = r["scaling"]
        lines.append(f"scaling: stage 1 {1000 * sc['stage1_seconds_per_sample']:.2f} ms per sample + {sc['stage1_fixed_s']:.2f} s (linear fit r2 {sc['stage1_linear_r2']:.3f})")
        lines += [f"  stage 1 {x['prompts']:5d} prompts x N={x['n']:<3d} {x['seconds']:7.2f} s" for x in sc["stage1"]]
        lines += [f"  stage 2 after N={x['n']:<3d} {x['step_s']:.3f} s/step" for x in sc["stage2"]]
    if "gpu" in r:
        g = r["gpu"]
        lines.append(f"gpu: stage-2 step, random Qwen2 {g['model']['params'] / 1e6:.1f}M params, {g['prompts_per_step']} prompts/step, {g['max_new_tokens']} new tokens")
        for m in ("apo", "trl_grpo"):
            if m in g:
                v = g[m]
                mem = "n/a" if v["peak_gpu_mb"] is None else f"{v['peak_gpu_mb']:.0f} MB"
                step = "n/a" if v["step_s"] is None else f"{v['step_s']:.2f} s"
                lines.append(f"  {m:9s} {step}/step  peak GPU {mem}  peak RSS {v['peak_rss_mb']:.0f} MB  [{v['engine']} on {v['device']}]")
    if "overhead" in r:
        o = r["overhead"]
        lines.append(f"overhead: apo run {o['wall_s']:.1f} s, stages {o['stage_seconds_total']:.1f} s -> {100 * o['overhead_frac']:.1f}% outside stages")
    for k, v in r.get("targets", {}).items():
        shown = f"< {v['upper_bound']:.3f}" if v.get("upper_bound") is not None else "n/a" if v["value"] is None else f"{v['value']:.3f}"
        lines.append(f"target {k}: {shown} ({v['target']}): {'met' if v['met'] else 'NOT met' if v['met'] is False else 'reported'}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
