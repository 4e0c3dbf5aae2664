"""Where an apo stage-2 step spends its time, at the race's configuration of `bench/peers.py`.

Stage 1 on the training prompts, then warm-up steps, then timed steps split into the trainer's parts
(sampling with the reward, pi_ref's forward, the update), then torch.profiler over a few more
steps: each op's CPU time per step, and the matrix products' achieved GFLOP/s (their flops counted
in a second pass). What a speed-up can still win is the time outside the matrix products.

    .venv/bin/python bench/step_profile.py --out bench/results/step-profile.json    # ~1 min alone
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
for path in (BENCH.parent, BENCH):  # apo_core; bench/peerlib
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from peerlib.runners import _load, setup_child  # noqa: E402
from peerlib.scoring import task_records  # noqa: E402
from peerlib.settings import APO_BETA1, ROOT, SIZES  # noqa: E402

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward")
PROFILE_SIZES = {
    # the race's data and step shape (SIZES["full"]) and apo's race point (lr 5e-5, beta2 1e-3)
    "full": dict(**{k: SIZES["full"][k] for k in ("train", "n_ref", "max_new_tokens", "prompts_per_step")},
                 lr=5e-5, beta2=1e-3, warmup=5, steps=20, profiled=5),
    "quick": dict(train=16, n_ref=2, max_new_tokens=16, prompts_per_step=8, lr=1e-4, beta2=0.1, warmup=1, steps=2, profiled=1),
}


def op_table(events, flops_events, steps: int, top: int) -> dict:
    """Per-op CPU time per step from profiler `events` (key_averages) over `steps` steps, and the
    flops per step of each op from `flops_events` (a second pass of as many steps with flops
    counted: recording shapes slows every small op, so the times come from the first): the `top`
    ops by self time, the matrix products' share (attention included) and their GFLOP/s (those
    whose flops torch counts).

    >>> from types import SimpleNamespace as E
    >>> t = op_table([E(key="aten::mm", self_cpu_time_total=3e3, count=4), E(key="aten::add", self_cpu_time_total=1e3, count=8)],
    ...              [E(key="aten::mm", flops=6e6), E(key="aten::add", flops=8e3)], 2, 5)
    >>> t["total_ms_per_step"], t["matmul_share"], t["matmul_gflops"], t["ops"][0]["gflops"], t["ops"][1]["calls_per_step"]
    (2.0, 0.75, 2.0, 2.0, 4.0)
    """
    flops = {e.key: e.flops for e in flops_events if e.key in MATMUL_OPS and e.flops}  # torch counts the products', not attention's
    total = sum(e.self_cpu_time_total for e in events)  # microseconds
    matmul_us = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    counted_us = sum(e.self_cpu_time_total for e in events if e.key in flops)
    ops = [{"op": e.key, "ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 3), "calls_per_step": e.count / steps,
            "gflops": round(flops[e.key] / e.self_cpu_time_total / 1e3, 1) if e.key in flops else None}
           for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]]
    return {"total_ms_per_step": round(total / 1e3 / steps, 3), "matmul_share": round(matmul_us / max(total, 1e-9), 4),
            "matmul_gflops": round(sum(flops.values()) / max(counted_us, 1e-9) / 1e3, 1), "ops": ops}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: the mechanics in seconds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=25, help="ops listed")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    s = PROFILE_SIZES["quick" if args.quick else "full"]

    import torch
    from torch.profiler import ProfilerActivity, profile

    from apo_core.config import TrainConfig
    from apo_core.engines import TransformersEngine
    from apo_core.modeling import reference_of
    from apo_core.rewards import get_reward
    from apo_core.rollouts import aggregate_vstar, sample_reference, training_prompts
    from apo_core.trainer import OnlineTrainer

    setup_child(args.threads, 0)
    model, tok = _load("embedded")
    train, _ = task_records(s["train"], 1, tok)
    reward = get_reward("embedded")
    engine = TransformersEngine(model, tok, batch_size=512, autocast_bf16=False)
    started = time.perf_counter()
    rows = sample_reference(engine, train, reward, n_samples=s["n_ref"], temperature=1.0, top_p=1.0,
                            max_new_tokens=s["max_new_tokens"], seed=1234)
    stage1_s = time.perf_counter() - started
    prompts = training_prompts(train, aggregate_vstar([r["prompt_id"] for r in rows], [r["reward"] for r in rows], APO_BETA1),
                               filter_all_zero=False)
    P = s["prompts_per_step"]
    cfg = TrainConfig(steps=s["warmup"] + s["steps"] + 2 * s["profiled"], rollout_batch_size=P, minibatch_size=P, lr=s["lr"],
                      beta2=s["beta2"], max_new_tokens=s["max_new_tokens"], seed=0)
    trainer = OnlineTrainer(model, reference_of(model, cfg.reference_dtype), tok, engine, reward, cfg)
    model.train()

    def step() -> dict:
        return trainer.train_step(trainer.batch_for_step(prompts, trainer.step))[0]

    for _ in range(s["warmup"]):
        step()
    timed = [step() for _ in range(s["steps"])]
    parts = {k.removeprefix("time/"): round(sum(m[k] for m in timed) / len(timed), 4) for k in timed[0] if k.startswith("time/")}
    passes = []
    for flops in (False, True):
        with profile(activities=[ProfilerActivity.CPU], with_flops=flops) as prof:
            for _ in range(s["profiled"]):
                step()
        passes.append(prof.key_averages())
    result = {
        "settings": {**s, "size": "quick" if args.quick else "full", "threads": args.threads, "model": "embedded",
                     "torch": torch.__version__},
        "stage1_s": round(stage1_s, 3),
        "step_parts_s": parts,
        "profile": op_table(*passes, s["profiled"], args.top),
        "run": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    p = result["profile"]
    print(f"stage 1 {stage1_s:.1f} s; step {parts['step_s']:.3f} s = " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items() if k != "step_s"))
    print(f"profiled: {p['total_ms_per_step']:.0f} ms of ops per step, matrix products {p['matmul_share']:.0%} at {p['matmul_gflops']:.0f} GFLOP/s")
    for o in p["ops"]:
        rate = f"  {o['gflops']:.0f} GFLOP/s" if o["gflops"] else ""
        print(f"  {o['op'][:48]:48s} {o['ms_per_step']:8.2f} ms/step {o['calls_per_step']:7.0f} calls{rate}")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
