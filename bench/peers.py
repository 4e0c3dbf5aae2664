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
- `trl_grpo`: TRL GRPOTrainer, 4 or 8 generations per prompt (swept).
- `trl_a2po`: TRL experimental A2POTrainer (the same algorithm): num_value_samples = N,
  beta1 = apo's default (0.5), beta2 from the sweep, filter_all_incorrect off (apo's default).

Modes (keys of the JSON): `paper` (same prompts, same passes over them: wall_s, final_accuracy,
peak_rss_mb, kl, generated_tokens), `equal_time` and `race` (one set of runs, peerlib/compare.py:
GRPO's `paper` protocol at its best configuration sets a wall-time budget B; apo and A2PO train
for B, apo bounded by its trainer's own train.time_budget_s; held-out accuracy and KL at every
evaluation over paired seeds. `equal_time`: accuracy at B, apo vs GRPO, with 95% intervals;
`race`: time to reference + 10 and + 15 points on each method's mean curve; also
`time_to_grpo_accuracy` and `kl_matched`), `memory` (a random Qwen2.5-0.5B-shaped model, a few
steps at the same prompts per step, each method at its documented defaults: peak_rss_mb),
`overhead` (the share of an `apo run`'s wall time outside stage compute, from its summary.json),
`scaling` (stage 1's seconds at four sizes of prompts x N; stage 2's seconds per step after a stage
1 of each N) and `gpu` (bench/gpu.sh: stage-2 step time and peak GPU memory, apo vs TRL GRPO, on a
random Qwen2.5-1.5B-shaped model).

Fairness rules. Every method runs in its own child process (this script with --child); its peak
RSS is the child's own VmHWM (`peak_rss_mb`) and, polled by the parent with psutil, its whole
process tree (`peak_rss_tree_mb`: the Prefect server of the flow shows there). Evaluation is the
same function for all (`heldout_accuracy`: greedy, apo's TransformersEngine, the embedded
verifier), always run with the method's clock paused: for TRL by a TrainerCallback at step ends.
KL is measured alike after training (`policy_kl`: mean over response tokens of log pi - log pi_ref
on one sampled response per held-out prompt). Tokens generated count completion tokens (EOS
included) of every sample drawn, stage 1 included. TRL runs in fp32 like apo (its bf16 default
is off: no bf16 units on the CI CPU) and, in `paper` and `race`, without gradient checkpointing
(apo turns it on only from 100M parameters); `memory` keeps TRL's documented defaults (gradient
checkpointing on) except bf16.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import util
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:  # `python bench/peers.py` from anywhere: apo_core, tasks, flows importable
    sys.path.insert(0, str(ROOT))
if str(BENCH) not in sys.path:  # bench/peerlib, when this file is loaded by path rather than run
    sys.path.append(str(BENCH))

from peerlib.measures import (  # noqa: E402
    measure_gpu, measure_memory, measure_overhead, measure_paper, measure_scaling, targets,
)
from peerlib.compare import measure_compare  # noqa: E402
from peerlib.report import machine, plot, report  # noqa: E402
from peerlib.runners import add_child_arguments, answer_child, child_main  # noqa: E402
from peerlib.settings import (  # noqa: E402
    APO_BETA1, COMPARE_MODES, GPU_SIZES, GRPO_GENERATIONS, METHODS, MODE_KEYS, MODES, SIZES, base_spec, comma_floats, comma_ints,
    parse_train_overrides,
)


def merge_earlier(results: dict, name: str, earlier: dict) -> None:
    """Copy into `results` the modes it lacks from an earlier peers JSON, each with the run that measured it.

    A mode the earlier file had itself merged keeps the provenance recorded under its `parts`; only
    the modes it measured carry its own `run` and `settings`.
    """
    taken = [m for m in MODES if m in earlier and m not in results]
    results.update({key: earlier[key] for m in taken for key in MODE_KEYS.get(m, (m,)) if key in earlier})
    parts = results.setdefault("parts", [])
    inherited: set = set()
    for part in earlier.get("parts", []):
        modes = [m for m in part["modes"] if m in taken]
        if modes:
            parts.append({**part, "modes": modes})
            inherited.update(modes)
    own = [m for m in taken if m not in inherited]
    if own:
        parts.append({"file": name, "modes": own, "run": earlier.get("run"), "settings": earlier.get("settings")})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: the mechanics in a couple of minutes (= --size quick)")
    ap.add_argument("--size", choices=sorted(SIZES), default=None,
                    help="full (default): the byte-level embedded model; qwen: embedded-qwen, Qwen2.5's vocabulary, ChatML")
    ap.add_argument("--modes", default="equal_time,race,memory", help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of every method (the same for all)")
    for method in METHODS:
        ap.add_argument(f"--lr-{method.replace('_', '-')}", type=comma_floats, default=None,
                        help=f"learning rates swept for {method} (comma list)")
    ap.add_argument("--beta2", type=comma_floats, default=None, help="beta2 values swept for apo and trl_a2po (comma list)")
    ap.add_argument("--minibatch-apo", type=comma_ints, default=None,
                    help="apo's minibatch sizes swept (comma list; default: one update per rollout step)")
    ap.add_argument("--filter-apo", type=comma_ints, default=None,
                    help="apo's vstar.filter_all_zero values swept (comma list of 0/1; default: off)")
    ap.add_argument("--apo-set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a TrainConfig field for every apo run (repeatable; e.g. reference_dtype=model)")
    ap.add_argument("--grpo-generations", type=comma_ints, default=None,
                    help=f"generations per prompt swept for trl_grpo (comma list, each >= 2; default {GRPO_GENERATIONS})")
    ap.add_argument("--seeds", type=comma_ints, default=None, help="paper: the seed (the first); equal_time/race: the reported seeds")
    ap.add_argument("--screen-seed", type=int, default=None, help="equal_time/race: the seed configurations are chosen on")
    ap.add_argument("--passes", type=int, default=None, help="paper, and GRPO in equal_time/race: passes over the training prompts")
    ap.add_argument("--eval-every-s", type=float, default=None,
                    help="equal_time/race: held-out scoring interval (training seconds), after the --eval-at-s times")
    ap.add_argument("--eval-at-s", type=comma_floats, default=None,
                    help="equal_time/race: training times to score the held-out set at before the interval takes over (comma list)")
    ap.add_argument("--test", type=int, default=None, help="held-out prompts every evaluation scores")
    ap.add_argument("--gpu-size", choices=sorted(GPU_SIZES), default="1.5b", help="gpu mode: the random model (tiny: CPU check)")
    ap.add_argument("--out", type=Path, default=None, help="JSON (default results/peers.json, --quick: results/peers-quick.json)")
    ap.add_argument("--reuse", type=Path, default=None,
                    help="equal_time/race: the child-log folder of an earlier run; its children with the same spec are not run again")
    ap.add_argument("--merge", type=Path, nargs="*", default=[],
                    help="earlier peers JSONs whose modes this run does not measure are copied in (their run info under `parts`)")
    add_child_arguments(ap)
    args = ap.parse_args(argv)
    if answer_child(args, child_main):
        return

    size = args.size or ("quick" if args.quick else "full")
    s = json.loads(json.dumps(SIZES[size]))
    for method in METHODS:
        given = getattr(args, f"lr_{method}")
        if given:
            s["lr"][method] = given
    for key in ("beta2", "seeds", "passes", "minibatch_apo", "filter_apo", "grpo_generations"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    if args.test is not None:
        if args.test < 1:
            sys.exit(f"peers: --test must be at least 1, got {args.test}")
        s["test"] = args.test
    for key, option in (("seeds", "seeds"), ("screen_seed", "screen_seed"), ("eval_every_s", "eval_every_s"),
                        ("eval_at_s", "eval_at_s")):
        if getattr(args, option) is not None:
            s["compare"][key] = getattr(args, option)
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
    out_path = args.out or ROOT / "bench" / "results" / ("peers.json" if size == "full" else f"peers-{size}.json")
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
    if any(m in modes for m in COMPARE_MODES):
        results.update(measure_compare(methods, s, base, log_dir, args.reuse))
    if "memory" in modes:
        results["memory"] = measure_memory(methods, s, base, log_dir)
    if "overhead" in modes:
        results["overhead"] = measure_overhead(s, base, log_dir)
    if "scaling" in modes:
        results["scaling"] = measure_scaling(s, base, log_dir)
    if "gpu" in modes:
        results["gpu"] = measure_gpu(methods, args.gpu_size, base, log_dir)
    results["settings"] = {"size": size, "modes": modes, "methods": methods, **s,
                           "grpo_generations": s.get("grpo_generations") or [GRPO_GENERATIONS], "beta1": APO_BETA1}
    for earlier in args.merge:
        merge_earlier(results, earlier.name, json.loads(earlier.read_text()))
    results["targets"] = targets(results)
    results["machine"] = machine(args.threads)
    results["run"] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "wall_s": round(time.time() - started, 1), "command": " ".join([Path(sys.executable).name, *sys.argv]),
                      "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
                      "loadavg_end": os.getloadavg()}
    if "race" in results:
        png = out_path.with_suffix(".png")
        plot(results, png)
        results["run"]["plot"] = str(png.relative_to(ROOT) if png.is_relative_to(ROOT) else png)
    out_path.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))
    print(f"wrote {out_path}")
    shutil.rmtree(log_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
