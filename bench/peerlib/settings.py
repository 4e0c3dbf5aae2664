"""What a peers run is made of: the methods and modes, the sizes of `--quick` and full runs, the
shapes of the random models, and the option parsers the bench scripts share."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from apo_core.config import VstarConfig

ROOT = Path(__file__).resolve().parents[2]
PEERS_SCRIPT = ROOT / "bench" / "peers.py"  # what a child process re-runs (`--child SPEC --result PATH`)

METHODS = ("apo", "trl_grpo", "trl_a2po")
MODES = ("paper", "equal_time", "race", "memory", "overhead", "scaling", "gpu")
COMPARE_MODES = ("equal_time", "race")  # one set of runs answers both (peerlib.compare)
# the JSON keys a mode writes where they are more than its own name (what --merge copies with it)
MODE_KEYS = {m: ("equal_time", "race", "time_to_grpo_accuracy", "kl_matched", "compare") for m in COMPARE_MODES}
GRPO_GENERATIONS = 8
APO_BETA1 = VstarConfig().beta1  # apo's default; A2PO and every V* here use it
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768)
QWEN25_15B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768)
TINY_SHAPE = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)

SIZES = {
    # sized for about an hour on 2 cores (a TRL GRPO step of 64 prompts x 8 generations takes ~7 s there)
    # test: 2,000 held-out prompts, so one evaluation's standard error is ~1.1 points (at 50% accuracy)
    "full": dict(train=512, test=2000, n_ref=8, max_new_tokens=64, prompts_per_step=64, passes=4, seeds=[0, 1, 2],
                 lr={"apo": [3e-5, 5e-5], "trl_grpo": [5e-5, 1e-4], "trl_a2po": [3e-5, 1e-4]}, beta2=[1e-3, 0.1],
                 grpo_generations=[4, 8],
                 compare=dict(screen_seed=100, seeds=[0, 1, 2], eval_every_s=10.0, kl_records=512),
                 memory=dict(shape=QWEN25_05B, steps=2, prompts_per_step=8, max_new_tokens=16),
                 overhead=dict(train=1024, test=500),
                 scaling=dict(stage1=[[128, 8], [256, 8], [512, 4], [512, 8]], stage2_n=[2, 8, 32], prompts=128, warmup=1, steps=3)),
    # the race and memory again on embedded-qwen (Qwen2.5's tokenizer, 151,936-row vocabulary; ChatML prompts):
    # a step costs ~15x the byte-level model's, so fewer and shorter runs, each method at the byte-level
    # comparison's chosen point (one point each: no screening); TRL GRPO's step of 32 prompts x 4
    # generations took 92 s, so 16 prompts a step. 2,000 held-out prompts as on the byte-level model: one
    # evaluation takes ~39 s here (BENCHMARKS.md), so they are scored at
    # times dense where the race is decided and sparse after it, not every few seconds (~1.6 h alone)
    "qwen": dict(model="embedded-qwen", template="chat", train=64, test=2000, n_ref=4, max_new_tokens=56,
                 prompts_per_step=16, passes=2, seeds=[0, 1, 2],
                 lr={"apo": [5e-5], "trl_grpo": [1e-4], "trl_a2po": [1e-4]}, beta2=[0.1], grpo_generations=[4],
                 compare=dict(screen_seed=100, seeds=[0, 1, 2], eval_every_s=None,
                              eval_at_s=[10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0], kl_records=64),
                 memory=dict(shape=None, steps=2, prompts_per_step=8, max_new_tokens=16)),
    "quick": dict(train=16, test=16, n_ref=2, max_new_tokens=48, prompts_per_step=8, passes=1, seeds=[0],
                  lr={"apo": [1e-4], "trl_grpo": [1e-4], "trl_a2po": [1e-4]}, beta2=[0.1], grpo_generations=[2],
                  compare=dict(screen_seed=100, seeds=[0], eval_every_s=2.0, kl_records=8),
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


DEFAULT_TEMPLATE = "auto"  # a size without `template`; also what children used before specs named one


def base_spec(s: dict, threads: int) -> dict:
    """What every child of a size shares: the model, the threads, the data and the step shape."""
    return {"model": s.get("model", "embedded"), "template": s.get("template", DEFAULT_TEMPLATE), "threads": threads,
            "train": s["train"], "test": s["test"], "n_ref": s["n_ref"], "max_new_tokens": s["max_new_tokens"],
            "prompts_per_step": s["prompts_per_step"]}


def comma_floats(text: str) -> list[float]:
    """An option's comma list of numbers.

    >>> comma_floats("1e-4,3e-4,")
    [0.0001, 0.0003]
    """
    return [float(x) for x in text.split(",") if x.strip()]


def comma_ints(text: str) -> list[int]:
    """An option's comma list of whole numbers.

    >>> comma_ints("0,1,2")
    [0, 1, 2]
    """
    return [int(x) for x in text.split(",") if x.strip()]


def rollout_steps(passes: int, prompts: int, per_step: int) -> int:
    """Rollout steps for `passes` passes over `prompts` training prompts, `per_step` per step (the last partial)."""
    return -(-passes * prompts // per_step)


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
