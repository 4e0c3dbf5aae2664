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
    if "equal_time" in r:
        e = r["equal_time"]
        lines.append(f"equal_time: every method trained for GRPO's paper-protocol time, B = {e['budget_s']:.1f} s "
                     f"(reference {100 * r['compare']['reference_accuracy']:.1f}%)")
        for m in ("apo", "trl_grpo"):
            v = e[m]
            lines.append(f"  {m:9s} acc {100 * v['accuracy_mean']:5.1f}% {_ci(v['accuracy_ci95'])}  seeds {_pct(v['accuracy_per_seed'])}"
                         f"  wall {v['wall_s']:6.1f} s  kl {v['kl_final']:.4f}  {_config(v['config'])}")
        d = e["difference"]
        lines.append(f"  apo - GRPO {100 * d['mean']:+.1f} points {_ci(d['ci95'], signed=True)} (paired seeds {_pct(d['per_seed'], signed=True)})")
    if "race" in r:
        lines.append("race: time to reference + 10 / + 15 points on the mean curve over seeds (training clock)")
        for m, v in r["race"].items():
            times = "  ".join(f"+{k}: {'never' if t is None else f'{t:6.1f} s'}" for k, t in v["time_to_target_s"].items())
            lines.append(f"  {m:9s} {times}  final acc {100 * v['accuracy_mean']:5.1f}%  {_config(v['config'])}")
    if "time_to_grpo_accuracy" in r:
        a = r["time_to_grpo_accuracy"]
        when = "never" if a["apo_time_s"] is None else f"{a['apo_time_s']:.1f} s"
        lines.append(f"time to GRPO's accuracy ({100 * a['grpo_accuracy']:.1f}%): apo {when} vs GRPO {a['grpo_wall_s']:.1f} s")
    if "kl_matched" in r:
        k = r["kl_matched"]
        kls = "  ".join(f"{m} {k[m]['kl']:.4f} at {k[m]['t_s']:.0f} s" for m in ("apo", "trl_grpo") if k.get(m))
        lines.append(f"KL at matched accuracy ({100 * k['accuracy']:.1f}%): {kls}")
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


def _pct(values: list[float], signed: bool = False) -> str:
    return "/".join(f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}" for v in values)


def _ci(ci: list[float] | None, signed: bool = False) -> str:
    return "" if ci is None else f"[95% {_pct([ci[0]], signed)}, {_pct([ci[1]], signed)}]"


def _config(config: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in config.items() if v is not None)


def plot(results: dict, path: Path) -> None:
    """Held-out accuracy against training time: each method's mean curve over seeds (bold) and its
    seeds (faint), at its configuration for the race, apo's and GRPO's for equal time too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    shown = [(m, "race", results["race"][m]) for m in METHODS if m in results["race"]]
    for m in ("apo", "trl_grpo"):
        e = results.get("equal_time", {}).get(m)
        if e is not None and e["config"] != results["race"].get(m, {}).get("config"):
            shown.append((m, "equal time", e))
    for i, (method, question, v) in enumerate(shown):
        colour, style = f"C{METHODS.index(method)}", "-" if question == "race" else "--"
        for run in v["curves"]:
            ax.plot([p["t_s"] for p in run["points"]], [100 * p["accuracy"] for p in run["points"]], style, color=colour, alpha=0.2, lw=1)
        curve = v["mean_curve"]
        ax.plot([p["t_s"] for p in curve], [100 * p["accuracy"] for p in curve], style, color=colour, lw=2, marker="o", ms=3,
                label=f"{method} ({_config(v['config'])}), {question}")
    reference = 100 * results["compare"]["reference_accuracy"]
    for points in (10, 15):
        ax.axhline(reference + points, color="grey", lw=0.8, ls=":")
    if "equal_time" in results:
        ax.axvline(results["equal_time"]["budget_s"], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("training wall time, s (evaluation excluded; stage 1 included)")
    ax.set_ylabel("held-out greedy accuracy, %")
    ax.set_title("embedded task: mean over seeds (bold), seeds (faint)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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
