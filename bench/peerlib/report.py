"""What a run prints and draws: the text summary, the race plot, and the machine it ran on."""

from __future__ import annotations

import contextlib
import os
import sys
from importlib import metadata
from pathlib import Path

from .settings import METHODS


def report(r: dict) -> str:
    """The run's figures as the lines it prints: one block per mode, then each target."""
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
    """The CPU, cores, threads, interpreter and package versions a run measured on."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    versions = {}
    for p in ("torch", "transformers", "trl", "accelerate", "datasets", "polars", "prefect", "mlflow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[p] = metadata.version(p)
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "python": sys.executable, "versions": versions}
