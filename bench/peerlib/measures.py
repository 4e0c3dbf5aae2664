"""The modes: each method's sweep run child by child, the best point of each, and the targets
that compare apo with its peers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .runners import pipeline_overhead, run_child
from .settings import GPU_SIZES, ROOT


def sweep_points(method: str, lrs: dict, beta2s: list[float], minibatches: list[int] | None = None,
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


def run_tag(method: str, point: dict, seed: int | None = None) -> str:
    tag = f"{method}-lr{point['lr']:g}" + (f"-b2{point['beta2']:g}" if point["beta2"] is not None else "")
    tag += f"-mb{point['minibatch']}" if point.get("minibatch") else ""
    tag += "-filter" if point.get("filter") else ""
    tag += f"-g{point['generations']}" if point.get("generations") else ""
    return tag + (f"-s{seed}" if seed is not None else "")


def measure_paper(methods, s: dict, base: dict, log_dir: Path) -> dict:
    out = {}
    for method in methods:
        runs = []
        for point in sweep_points(method, s["lr"], s["beta2"], s.get("minibatch_apo"), s.get("filter_apo"), s.get("grpo_generations")):
            spec = {**base, **point, "method": method, "mode": "paper", "seed": s["seeds"][0], "score": True,
                    "passes": s["passes"], "beta2": point["beta2"] or 0.0}
            runs.append({**point, **run_child(spec, log_dir, "paper-" + run_tag(method, point))})
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


@contextlib.contextmanager
def random_model(shape: dict, mode: str, base: dict, log_dir: Path):
    """(folder, parameter count) of a random Qwen2 of `shape` that a child process saved, for the block."""
    model_dir = tempfile.mkdtemp(prefix=f"apo-peers-{mode}-model-")
    try:
        saved = run_child({"method": "save_model", "mode": mode, "threads": base["threads"], "shape": shape,
                           "path": model_dir}, log_dir, f"{mode}-save-model")
        yield model_dir, saved["params"]
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)


def measure_memory(methods, s: dict, base: dict, log_dir: Path) -> dict:
    """Peak RSS of each method at its defaults on a random Qwen2 of the size's shape, or (shape None)
    on the size's own model."""
    m = s["memory"]
    own = contextlib.nullcontext((base["model"], None))
    with (own if m["shape"] is None else random_model(m["shape"], "memory", base, log_dir)) as (model_dir, params):
        out = {"model": {"params": params, "shape": m["shape"] or base["model"]}}
        for method in methods:
            # the training prompts are exactly those of the measured steps (stage 1 samples each N times)
            spec = {**base, "model": model_dir, "method": method, "mode": "memory", "seed": 0, "score": False,
                    "train": m["steps"] * m["prompts_per_step"], "test": 1, "steps": m["steps"], "prompts_per_step": m["prompts_per_step"], "max_new_tokens": m["max_new_tokens"],
                    "lr": 1e-6, "beta2": 1e-3, "passes": 1}  # lr / beta2: the documented defaults of apo's paper config and TRL
            r = run_child(spec, log_dir, f"memory-{method}")
            out[method] = {k: r[k] for k in ("peak_rss_mb", "peak_rss_tree_mb", "wall_s", "steps", "phases", "memory_plan")
                           if k in r}
            out["model"]["params"] = out["model"]["params"] or r.get("params")
    return out


def measure_gpu(methods, size: str, base: dict, log_dir: Path) -> dict:
    """Stage-2 step time and peak accelerator memory, apo vs TRL GRPO, on a random Qwen2 (bench/gpu.sh)."""
    g = GPU_SIZES[size]
    with random_model(g["shape"], "gpu", base, log_dir) as (model_dir, params):
        out = {"model": {"params": params, "shape": g["shape"]}, "size": size,
               **{k: g[k] for k in ("prompts_per_step", "max_new_tokens", "warmup", "steps")}}
        for method in [m for m in methods if m in ("apo", "trl_grpo")]:
            spec = {**base, **{k: g[k] for k in ("prompts_per_step", "max_new_tokens", "warmup", "steps")},
                    "model": model_dir, "method": method, "mode": "gpu", "seed": 0}
            r = run_child(spec, log_dir, f"gpu-{method}")
            out[method] = {k: r[k] for k in ("step_s", "steps_timed", "peak_gpu_mb", "peak_rss_mb", "peak_rss_tree_mb", "engine", "device")}
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


def measure_scaling(s: dict, base: dict, log_dir: Path) -> dict:
    """Stage 1's seconds against prompts x N, and stage 2's seconds per step against N (one apo child)."""
    return run_child({**base, **s["scaling"], "method": "apo", "mode": "scaling", "seed": 0}, log_dir, "scaling")


def targets(results: dict) -> dict:
    """apo against its peers in one figure each: the ratio (or gap) to the peer, the bound apo aims
    for, and whether it is met (None where the figure is only reported, or was not measured)."""
    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b

    paper, memory = results.get("paper", {}), results.get("memory", {})
    t = {}
    if "apo" in paper and "trl_grpo" in paper:
        r = ratio(paper["apo"]["wall_s"], paper["trl_grpo"]["wall_s"])
        gap = paper["apo"]["final_accuracy"] - paper["trl_grpo"]["final_accuracy"]
        t["paper_apo_over_grpo_wall"] = {"value": r, "target": "<= 0.5", "met": r is not None and r <= 0.5}
        t["paper_apo_minus_grpo_accuracy"] = {"value": gap, "target": ">= -0.02", "met": gap >= -0.02}
    if "equal_time" in results:
        e = results["equal_time"]
        t["equal_time_apo_minus_grpo_accuracy"] = {"value": e["difference"]["mean"], "ci95": e["difference"]["ci95"],
                                                   "target": ">= 0.02", "met": e["difference"]["mean"] >= 0.02}
    if "time_to_grpo_accuracy" in results:
        a = results["time_to_grpo_accuracy"]
        t["apo_time_to_grpo_accuracy_over_grpo_time"] = {"value": a["ratio"], "target": "<= 0.4", "met": a["met"]}
    race = results.get("race", {})
    for peer in ("trl_a2po", "trl_grpo"):
        for points in ("10", "15"):
            if "apo" not in race or peer not in race:
                continue
            mine, theirs = race["apo"]["time_to_target_s"][points], race[peer]["time_to_target_s"][points]
            entry = {"value": ratio(mine, theirs), "target": "<= 0.5" if points == "10" else "reported"}
            if mine is not None and theirs is None:  # the peer never got there within the budget: an upper bound
                entry["upper_bound"] = mine / results["compare"]["budget_s"]
                entry["note"] = f"{peer} did not reach reference + {points} points within the budget"
            bound = entry["value"] if entry["value"] is not None else entry.get("upper_bound")
            entry["met"] = (bound is not None and bound <= 0.5) if points == "10" else None
            t[f"race_{points}_apo_over_{peer}_time"] = entry
    if "kl_matched" in results:
        k = results["kl_matched"]
        t["kl_matched_apo_over_grpo"] = {"value": k["ratio"], "target": "<= 0.8", "met": k["met"]}
    peers = [memory[m]["peak_rss_mb"] for m in ("trl_grpo", "trl_a2po") if m in memory]
    if "apo" in memory and peers:
        r = ratio(memory["apo"]["peak_rss_mb"], min(peers))
        t["memory_apo_over_lower_peer_rss"] = {"value": r, "target": "<= 0.6", "met": r is not None and r <= 0.6}
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
