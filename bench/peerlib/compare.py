"""The comparison a user makes: for the hours I have, which method gives the better model, and how
soon does it reach a given accuracy? Every method's held-out curve (accuracy and KL at every
evaluation) over paired seeds, each method at its best configuration for the question asked.

Protocol (`measure_compare`):
1. Screening, on a seed of its own (`screen_seed`, not one of the reported seeds, so choosing a
   configuration does not flatter the reported means): TRL GRPO over lr x generations per prompt
   for the `paper` protocol (`passes` over the training prompts); its most accurate point's
   training time is the budget B every other run gets; apo and TRL A2PO over lr x beta2, each
   bounded by B (apo by its trainer's own train.time_budget_s, A2PO by a TrainerCallback).
2. The reported runs, seeds `seeds` for every method: GRPO at its most accurate point (its mean
   training time is B) and, if another point reached reference + 10 points sooner, that one too;
   apo at its most accurate point at B, at its fastest to reference + 10, and at the point with
   the least KL where it reaches GRPO's screened accuracy (each once where they coincide); A2PO
   at its fastest to reference + 10; all bounded by B.

A method "reaches" a target at the first evaluation where its mean curve over seeds (the k-th
evaluations of every seed averaged, at the mean of their times) is at or above it. Intervals are
95% t-intervals over the seeds (paired for differences).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .measures import run_tag, sweep_points
from .runners import run_child
from .settings import DEFAULT_TEMPLATE

# two-sided 95% quantiles of Student's t by degrees of freedom (seeds - 1)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(values: list[float]) -> dict:
    """Mean and 95% t-interval of per-seed values (no interval from one value).

    >>> interval([0.5, 0.6, 0.7])["ci95"]
    [0.3516, 0.8484]
    """
    mean = statistics.mean(values)
    if len(values) < 2:
        return {"mean": round(mean, 4), "ci95": None, "n": len(values)}
    half = T_975.get(len(values) - 1, 1.96) * statistics.stdev(values) / len(values) ** 0.5
    return {"mean": round(mean, 4), "ci95": [round(mean - half, 4), round(mean + half, 4)], "n": len(values)}


def mean_curve(curves: list[list[dict]]) -> list[dict]:
    """The k-th evaluations of every seed averaged (time, accuracy, KL where present), for every k
    all seeds have, then the mean of their last evaluations if those came later.

    >>> mean_curve([[{"t_s": 0, "accuracy": 0.4}, {"t_s": 10, "accuracy": 0.5}],
    ...             [{"t_s": 0, "accuracy": 0.4}, {"t_s": 12, "accuracy": 0.6}, {"t_s": 20, "accuracy": 0.6}]])
    [{'t_s': 0, 'accuracy': 0.4}, {'t_s': 11, 'accuracy': 0.55}, {'t_s': 15, 'accuracy': 0.55}]
    """
    def average(points: list[dict]) -> dict:
        out = {"t_s": round(statistics.mean(p["t_s"] for p in points), 3),
               "accuracy": round(statistics.mean(p["accuracy"] for p in points), 5)}
        if all("kl" in p for p in points):
            out["kl"] = round(statistics.mean(p["kl"] for p in points), 5)
        return out

    common = min(len(c) for c in curves)
    out = [average([c[k] for c in curves]) for k in range(common)]
    if any(len(c) > common for c in curves):
        out.append(average([c[-1] for c in curves]))
    return out


def reach(curve: list[dict], target: float) -> dict | None:
    """The first point of `curve` at or above `target` accuracy (None: never).

    >>> reach([{"t_s": 0, "accuracy": 0.4}, {"t_s": 9, "accuracy": 0.52}], 0.5)["t_s"]
    9
    """
    return next((p for p in curve if p["accuracy"] >= target - 1e-9), None)


def _time(curve: list[dict], target: float) -> float | None:
    hit = reach(curve, target)
    return None if hit is None else hit["t_s"]


def _point_key(point: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in point.items() if v is not None))


class Runs:
    """Child runs of `curve` mode, each made once per (method, point, seed, budget). With `reuse`
    (the child-log folder of an earlier run), a child whose result is there under the same name
    and with the same spec is taken from it instead of run again; each reused run says so."""

    def __init__(self, s: dict, base: dict, log_dir: Path, reuse: Path | None = None):
        self.s, self.base, self.log_dir, self.reuse = s, base, log_dir, reuse
        self.done: dict[tuple, dict] = {}

    def _earlier(self, tag: str, spec: dict) -> dict | None:
        found = self.reuse / f"{tag}.json" if self.reuse else None
        if found is None or not found.exists():
            return None
        earlier = json.loads(found.read_text())
        # results written before specs were kept are matched by name, those before specs named the
        # template used the default one
        if {"template": DEFAULT_TEMPLATE, **earlier.get("spec", spec)} != spec:
            return None
        print(f"  {tag} ... reused from {found}", flush=True)
        return {**earlier, "reused_from": str(found)}

    def one(self, method: str, point: dict, seed: int, budget_s: float | None) -> dict:
        key = (method, _point_key(point), seed, None if budget_s is None else round(budget_s, 1))
        if key not in self.done:
            c = self.s["compare"]
            spec = {**self.base, **point, "method": method, "mode": "curve", "seed": seed, "score": True,
                    "beta2": point.get("beta2") or 0.0, "eval_every_s": c["eval_every_s"], "kl_records": c["kl_records"],
                    **({"eval_at_s": c["eval_at_s"]} if c.get("eval_at_s") else {})}  # absent: earlier specs still match
            if budget_s is None:  # GRPO: the paper protocol's passes
                spec["passes"] = self.s["passes"]
            else:
                spec.update(budget_s=budget_s, steps=10**9)
            tag = f"curve-{run_tag(method, point, seed)}" + ("" if budget_s is None else f"-B{budget_s:.0f}")
            r = self._earlier(tag, spec) or run_child(spec, self.log_dir, tag)
            self.done[key] = {"seed": seed, **{k: r[k] for k in ("wall_s", "steps", "final_accuracy", "reference_accuracy",
                                                                   "curve", "kl", "peak_rss_mb", "eval_s", "reused_from") if k in r}}
        return self.done[key]

    def seeds(self, method: str, point: dict, seeds: list[int], budget_s: float | None) -> dict:
        runs = [self.one(method, point, seed, budget_s) for seed in seeds]
        return {"point": point, "runs": runs, "curve": mean_curve([r["curve"] for r in runs]),
                "wall_s": round(statistics.mean(r["wall_s"] for r in runs), 2)}


def _most_accurate(entries: list[dict]) -> dict:
    return max(entries, key=lambda e: (e["curve"][-1]["accuracy"], -e["wall_s"]))


def _least_kl_at(entries: list[dict], accuracy: float) -> dict:
    """The entry with the lowest KL where its curve first reaches `accuracy` (none reaches it: the most accurate)."""
    reaching = [e for e in entries if reach(e["curve"], accuracy) is not None and "kl" in reach(e["curve"], accuracy)]
    return min(reaching, key=lambda e: reach(e["curve"], accuracy)["kl"]) if reaching else _most_accurate(entries)


def _fastest(entries: list[dict], target: float) -> dict:
    return min(entries, key=lambda e: (_time(e["curve"], target) is None, _time(e["curve"], target) or 0.0,
                                       -e["curve"][-1]["accuracy"]))


def _describe(entry: dict, targets: dict[str, float]) -> dict:
    """One method's figures at one configuration: final accuracy with its interval, training time,
    times to every target on the mean curve (and per seed), the curves."""
    runs = entry["runs"]
    return {
        "config": entry["point"], "seeds": [r["seed"] for r in runs],
        "accuracy_mean": interval([r["final_accuracy"] for r in runs])["mean"],
        "accuracy_ci95": interval([r["final_accuracy"] for r in runs])["ci95"],
        "accuracy_per_seed": [r["final_accuracy"] for r in runs],
        "wall_s": entry["wall_s"], "wall_s_per_seed": [round(r["wall_s"], 2) for r in runs],
        "steps_per_seed": [r["steps"] for r in runs],
        "kl_final": round(statistics.mean(r["kl"] for r in runs), 5),
        "time_to_target_s": {name: _time(entry["curve"], t) for name, t in targets.items()},
        "time_to_target_s_per_seed": {name: [_time(r["curve"], t) for r in runs] for name, t in targets.items()},
        "mean_curve": entry["curve"],
        "curves": [{"seed": r["seed"], "points": r["curve"]} for r in runs],
    }


def measure_compare(methods: list[str], s: dict, base: dict, log_dir: Path, reuse: Path | None = None) -> dict:
    """equal_time, race, time_to_grpo_accuracy and kl_matched from one set of runs (module docstring)."""
    missing = [m for m in ("apo", "trl_grpo") if m not in methods]
    if missing:
        raise SystemExit(f"peers: the equal_time and race modes compare apo with TRL GRPO; add {', '.join(missing)} to --methods")
    c, runs = s["compare"], Runs(s, base, log_dir, reuse)
    screen = c["screen_seed"]  # one point per method: no screening, the point is the configuration
    points = {m: sweep_points(m, s["lr"], s["beta2"], generations=s.get("grpo_generations")) for m in methods}

    seeds = c["seeds"]
    if all(len(points[m]) == 1 for m in methods):  # one point each (e.g. the qwen size): nothing to choose
        only = {m: points[m][0] for m in methods}
        grpo_acc = grpo_race = runs.seeds("trl_grpo", only["trl_grpo"], seeds, None)
        budget = budget_screen = grpo_acc["wall_s"]
        apo_acc = apo_race = apo_kl = runs.seeds("apo", only["apo"], seeds, budget)
        screened = {}
        a2po = runs.seeds("trl_a2po", only["trl_a2po"], seeds, budget) if "trl_a2po" in methods else None
        reference = grpo_acc["runs"][0]["reference_accuracy"]
        plus = {"10": reference + 0.10, "15": reference + 0.15}
    else:
        # 1. screening on its own seed
        grpo_screen = [runs.seeds("trl_grpo", p, [screen], None) for p in points["trl_grpo"]]
        reference = grpo_screen[0]["runs"][0]["reference_accuracy"]
        plus = {"10": reference + 0.10, "15": reference + 0.15}
        budget_screen = _most_accurate(grpo_screen)["wall_s"]
        screened = {"trl_grpo": grpo_screen}
        for m in (m for m in methods if m != "trl_grpo"):
            screened[m] = [runs.seeds(m, p, [screen], budget_screen) for p in points[m]]

        # 2. the reported seeds at each method's best configurations
        grpo_acc = runs.seeds("trl_grpo", _most_accurate(grpo_screen)["point"], seeds, None)
        budget = grpo_acc["wall_s"]  # the wall time GRPO needs for the paper protocol at its best configuration
        grpo_race = runs.seeds("trl_grpo", _fastest(grpo_screen, plus["10"])["point"], seeds, None)
        apo_acc = runs.seeds("apo", _most_accurate(screened["apo"])["point"], seeds, budget)
        apo_race = runs.seeds("apo", _fastest(screened["apo"], plus["10"])["point"], seeds, budget)
        # KL at matched accuracy: the point with the least KL where it reaches GRPO's screened accuracy
        apo_kl = runs.seeds("apo", _least_kl_at(screened["apo"], _most_accurate(grpo_screen)["curve"][-1]["accuracy"])["point"],
                            seeds, budget)
        a2po = runs.seeds("trl_a2po", _fastest(screened["trl_a2po"], plus["10"])["point"], seeds, budget) \
            if "trl_a2po" in methods else None
    chosen = {"trl_grpo": {"accuracy": grpo_acc, "race": grpo_race},
              "apo": {"accuracy": apo_acc, "race": apo_race, "kl": apo_kl}}
    if a2po is not None:
        chosen["trl_a2po"] = {"race": a2po}

    grpo, apo = _describe(grpo_acc, plus), _describe(apo_acc, plus)
    diffs = [a - g for a, g in zip(apo["accuracy_per_seed"], grpo["accuracy_per_seed"])]  # paired: the same seeds
    diff = interval(diffs)
    equal_time = {"budget_s": budget, "apo": apo, "trl_grpo": grpo,
                  "difference": {"mean": diff["mean"], "ci95": diff["ci95"], "per_seed": [round(d, 4) for d in diffs]},
                  "target": "apo - GRPO >= +0.02 (mean)", "met": diff["mean"] >= 0.02}

    race = {m: _describe(entries["race"], plus) for m, entries in chosen.items()}

    # time to GRPO's final accuracy, at whichever of apo's configurations gets there soonest; the mean
    # curve's last point is that accuracy unrounded (accuracy_mean is rounded to 4 places, and may lie
    # above it, so GRPO's own curve would never reach it)
    grpo_final = grpo_acc["curve"][-1]["accuracy"]
    apo_times = [t for e in (apo_acc, apo_race, apo_kl) if (t := _time(e["curve"], grpo_final)) is not None]
    apo_time = min(apo_times) if apo_times else None
    to_accuracy = {"grpo_accuracy": grpo_final, "grpo_wall_s": budget,
                   "grpo_first_reached_s": _time(grpo_acc["curve"], grpo_final), "apo_time_s": apo_time,
                   "ratio": None if apo_time is None else round(apo_time / budget, 4), "target": "<= 0.4"}
    to_accuracy["met"] = to_accuracy["ratio"] is not None and to_accuracy["ratio"] <= 0.4

    # KL where the two are at the same accuracy: GRPO's final accuracy, or the best both reach
    matched = min(grpo_final, max(p["accuracy"] for p in apo_kl["curve"]))
    at_apo, at_grpo = reach(apo_kl["curve"], matched), reach(grpo_acc["curve"], matched)
    kl = {"accuracy": round(matched, 4), "apo": at_apo, "trl_grpo": at_grpo, "target": "apo KL <= 0.8x GRPO's",
          "apo_config": apo_kl["point"], "trl_grpo_config": grpo_acc["point"]}
    # a ratio only of two positive estimates (a sampled KL near 0 can come out below it)
    positive = at_apo and at_grpo and at_apo.get("kl", 0) > 0 and at_grpo.get("kl", 0) > 0
    kl["ratio"] = round(at_apo["kl"] / at_grpo["kl"], 4) if positive else None
    kl["met"] = kl["ratio"] is not None and kl["ratio"] <= 0.8

    screening = {m: [{"config": e["point"], "final_accuracy": e["curve"][-1]["accuracy"], "wall_s": e["wall_s"],
                      "time_to_10_s": _time(e["curve"], plus["10"]), "kl_final": e["runs"][0]["kl"]} for e in entries]
                 for m, entries in screened.items()}
    return {"equal_time": equal_time, "race": race, "time_to_grpo_accuracy": to_accuracy, "kl_matched": kl,
            "compare": {"reference_accuracy": reference, "screen_seed": screen, "screen_budget_s": budget_screen,
                        "seeds": seeds, "budget_s": budget, "screening": screening,
                        "chosen": {m: {q: e["point"] for q, e in entries.items()} for m, entries in chosen.items()}}}
