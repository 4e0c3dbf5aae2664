"""Child result files rebuilt from a peers JSON's recorded per-seed curves, so that
`peers.py --reuse DIR` computes a one-configuration-per-method comparison (the qwen size) again
without training: for a change in how the figures are computed, not in what is measured.

    bench/.venv-peers/bin/python bench/peers_rebuild.py bench/results/peers-qwen.json /tmp/children
    bench/.venv-peers/bin/python bench/peers.py --size qwen --modes equal_time,race --reuse /tmp/children --out /tmp/again.json

Each file holds what the JSON recorded for that method and seed (curve, wall, steps; the final
accuracy and KL are the curve's last point) and the spec the parent gives that child now, so
`--reuse` takes it only where the settings still match the run's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from peerlib import compare, settings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, help="a peers JSON with equal_time and race")
    ap.add_argument("out", type=Path, help="folder for the child files (for peers.py --reuse)")
    ap.add_argument("--size", default="qwen", choices=sorted(settings.SIZES))
    args = ap.parse_args()
    d = json.loads(args.results.read_text())
    recorded = {"apo": d["equal_time"]["apo"], "trl_grpo": d["equal_time"]["trl_grpo"], "trl_a2po": d["race"]["trl_a2po"]}
    args.out.mkdir(parents=True, exist_ok=True)

    def from_json(spec: dict, log_dir: Path, name: str) -> dict:
        e = recorded[spec["method"]]
        if any(spec.get(k) != v for k, v in e["config"].items() if v is not None):
            sys.exit(f"peers_rebuild: {name}: the JSON's {spec['method']} ran {e['config']}, the settings ask another point")
        i = e["seeds"].index(spec["seed"])
        points = e["curves"][i]["points"]
        r = {"wall_s": e["wall_s_per_seed"][i], "steps": e["steps_per_seed"][i], "final_accuracy": points[-1]["accuracy"],
             "reference_accuracy": points[0]["accuracy"], "curve": points, "kl": points[-1]["kl"], "spec": spec,
             "rebuilt_from": str(args.results)}
        (args.out / f"{name}.json").write_text(json.dumps(r))
        return r

    compare.run_child = from_json  # the parent's own protocol decides which children there are, and their specs
    s = json.loads(json.dumps(settings.SIZES[args.size]))
    compare.measure_compare(list(settings.METHODS), s, settings.base_spec(s, 2), args.out)
    print(f"wrote {len(list(args.out.glob('*.json')))} child files to {args.out}")


if __name__ == "__main__":
    main()
