"""apo's `paper` accuracy over seeds: is the gap to TRL GRPO the seed, the settings or the algorithm?

`bench/peers.py --modes paper` compares one seed per sweep point, and apo's final accuracy moves
by several points with the seed. This runs apo's stage cores (bench/peers.py's race child: stage 1,
V*, OnlineTrainer; the same numbers as the Prefect pipeline for a seed) at the `paper` budget, the
same prompts and passes, for every lr x beta2 point and every seed, and reports each point's mean,
spread and per-seed accuracies. Extra TrainConfig fields go in with --set (e.g. --set minibatch_size=32);
--passes changes the budget (how many passes apo needs to match another method's accuracy, and at what
wall time).

    .venv/bin/python bench/apo_seeds.py --lr 7e-5,1e-4 --beta2 0.03,0.1 --seeds 0,1,2 --out bench/results/apo-seeds.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
for path in (BENCH.parent, BENCH):  # apo_core; bench/peerlib (bench/peers.py's child runner, sizes and evaluation)
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from peerlib.runners import run_child  # noqa: E402
from peerlib.settings import (  # noqa: E402
    ROOT, SIZES, base_spec, comma_floats, comma_ints, parse_train_overrides, rollout_steps,
)


def summarise(accuracies: list[float]) -> dict:
    """Mean, population spread and range of one point's per-seed accuracies.

    >>> summarise([0.5, 0.4, 0.6])["mean"]
    0.5
    """
    return {"mean": round(statistics.mean(accuracies), 4), "std": round(statistics.pstdev(accuracies), 4),
            "min": min(accuracies), "max": max(accuracies)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="peers.py's quick sizes: the mechanics in a minute")
    ap.add_argument("--lr", type=comma_floats, default=[1e-4])
    ap.add_argument("--beta2", type=comma_floats, default=[0.1])
    ap.add_argument("--seeds", type=comma_ints, default=[0, 1, 2])
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="another TrainConfig field for every run (repeatable)")
    ap.add_argument("--passes", type=int, default=None,
                    help="passes over the training prompts (default: the `paper` budget's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    s = {**SIZES["quick" if args.quick else "full"]}
    if args.passes is not None:
        if args.passes < 1:
            sys.exit(f"apo_seeds: --passes must be at least 1, got {args.passes}")
        s["passes"] = args.passes
    extra = parse_train_overrides(args.set, "apo_seeds", "--set")
    steps = rollout_steps(s["passes"], s["train"], s["prompts_per_step"])
    base = {**base_spec(s, args.threads), "method": "apo", "mode": "seeds", "score": True, "steps": steps,
            "train_config": extra}
    log_dir = Path(tempfile.mkdtemp(prefix="apo-seeds-logs-"))
    started = time.time()
    points = []
    for lr in args.lr:
        for beta2 in args.beta2:
            runs = []
            for seed in args.seeds:
                tag = f"apo-lr{lr:g}-b2{beta2:g}-s{seed}"
                r = run_child({**base, "lr": lr, "beta2": beta2, "seed": seed}, log_dir, tag)
                runs.append({"seed": seed, "final_accuracy": r["final_accuracy"], "wall_s": round(r["wall_s"], 2),
                             "kl": r["kl"], "reference_accuracy": r["reference_accuracy"],
                             "minibatch_size": r["minibatch_size"], "steps": r["steps"]})
            points.append({"lr": lr, "beta2": beta2, **summarise([r["final_accuracy"] for r in runs]),
                           "wall_s_mean": round(statistics.mean(r["wall_s"] for r in runs), 2), "runs": runs})
    out = {"points": points, "best": max(points, key=lambda p: p["mean"]),
           "settings": {"size": "quick" if args.quick else "full", "steps": steps, "passes": s["passes"],
                        "train": s["train"], "test": s["test"], "prompts_per_step": s["prompts_per_step"],
                        "n_ref": s["n_ref"], "max_new_tokens": s["max_new_tokens"], "threads": args.threads,
                        "train_config": extra, "seeds": args.seeds},
           "run": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "wall_s": round(time.time() - started, 1), "command": " ".join([Path(sys.executable).name, *sys.argv]),
                   "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                                text=True).stdout.strip()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for p in points:
        print(f"lr {p['lr']:g} beta2 {p['beta2']:g}: mean {p['mean']:.1%} (std {p['std']:.1%}; "
              + ", ".join(f"s{r['seed']} {r['final_accuracy']:.1%}" for r in p["runs"]) + ")")
    print(f"wrote {args.out} ({s['passes']} passes, {steps} steps)")
    shutil.rmtree(log_dir, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
