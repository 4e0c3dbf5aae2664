"""After evaluate: register the trained model in the MLflow model registry and move the
`champion` alias to it only when it beats the current champion on the configured benchmark.

Each version carries its scores as tags (`apo.score.<benchmark>`) and the digest of the prompts
each was measured on (`apo.eval_set.<benchmark>`), so the comparison reads the champion's score
instead of re-evaluating it, and only on the same evaluation set: a retrain evaluated on other
prompts says so and leaves the alias where it is. The version's source is the trained model's
MLflow logged model of the run (`models:/<id>`, the one MLflow copy of the weights, which
train_online makes: a new id for every training, never rewritten, so no later run changes a
registered model), or the model folder in the artifact root for a model trained before logged
models; the tag apo.model_sha256 says which content it was. After each registration the champion
is recomputed from every version's decision (converge_champion), so retrains that register at
the same time end on one champion.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from . import storage
from .stage import RunContext, StageResult

CHAMPION = "champion"
REGISTRY_FILE = "registry.json"  # beside summary.json: the decision of this run, read by finish_run
SCORE_TAG = "apo.score."  # + benchmark name; one tag per benchmark the version was evaluated on
DECISION_TAG = "apo.registry.decision"
EVAL_SET_TAG = "apo.eval_set."  # + benchmark name: data_version of the prompts the score is over
MODEL_DIGEST_TAG = "apo.model_sha256"  # the weights' content (storage.folder_digest of the model folder)


def benchmark_scores(metrics: dict[str, float]) -> dict[str, float]:
    """Greedy accuracy of the trained model per benchmark, from evaluate's metrics:
    eval/trained_accuracy is the run's held-out split, eval/trained_<name>_accuracy a benchmark.

    >>> benchmark_scores({"eval/trained_accuracy": 0.5, "eval/trained_math500_accuracy": 0.25, "eval/reference_accuracy": 0.1})
    {'heldout': 0.5, 'math500': 0.25}
    """
    scores = {}
    for key, value in metrics.items():
        if key == "eval/trained_accuracy":
            scores["heldout"] = float(value)
        elif key.startswith("eval/trained_") and key.endswith("_accuracy"):
            scores[key.removeprefix("eval/trained_").removesuffix("_accuracy")] = float(value)
    return scores


def decide(score: float, champion_score: float | None, min_improvement: float) -> str:
    """`first` (no champion: the new version becomes it), `promoted` (it beats the champion by
    more than min_improvement) or `kept` (a tie or worse leaves the alias where it was).

    >>> decide(0.5, None, 0.0), decide(0.6, 0.5, 0.0), decide(0.5, 0.5, 0.0), decide(0.55, 0.5, 0.1)
    ('first', 'promoted', 'kept', 'kept')
    """
    if champion_score is None:
        return "first"
    return "promoted" if score - champion_score > min_improvement else "kept"


def source_uri(model_uri: str) -> str:
    """Where the registry points: an absolute file:// URI for a local folder, the URI itself otherwise."""
    return storage.local_path(model_uri).as_uri() if storage.is_local(model_uri) else model_uri


def registry_record(ctx: RunContext, evaluated: StageResult | None) -> dict | None:
    """The registry decision this run recorded for the model that `evaluated` scored, or None
    (registry off, or a record left from an earlier model of this run id)."""
    uri = storage.join(ctx.run_uri, REGISTRY_FILE)
    if evaluated is None or not storage.exists(uri):
        return None
    record = storage.read_json(uri)
    return record if record.get("evaluate_fingerprint") == evaluated.fingerprint else None


@task(name="register_model", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def register_model(ctx: RunContext, trained: StageResult, evaluated: StageResult) -> dict | None:
    """Register the trained model as a new version of registry.model_name (run = the parent run)
    and give it `champion` when it wins; record the decision and both scores on the parent run,
    on the version and in registry.json. Re-running the same run id reuses its version."""
    cfg = ctx.config.registry
    if not cfg.enabled:
        return None
    scores = benchmark_scores(evaluated.metrics)
    eval_sets = eval_set_digests(evaluated)
    if cfg.benchmark not in scores:
        raise ValueError(f"registry.benchmark {cfg.benchmark!r}: evaluate recorded no trained accuracy for it "
                         f"(has: {', '.join(sorted(scores)) or 'none'})")
    tracker = ctx.tracker()
    version, reused = find_or_register(ctx, tracker, trained, evaluated, scores, eval_sets)
    number = str(version.version)  # the SQL store answers ints, the REST API strings
    record_uri = storage.join(ctx.run_uri, REGISTRY_FILE)
    if reused and DECISION_TAG in version.tags and storage.exists(record_uri):  # decided by an earlier attempt
        record = storage.read_json(record_uri)
        if record.get("version") == number:
            print(f"[register] {cfg.model_name} version {number} was registered by this run already ({record['decision']})")
            return record

    score = scores[cfg.benchmark]
    decision, champion_version, champion_score, reason = against_champion(tracker, cfg, number, score, eval_sets.get(cfg.benchmark))
    is_champion = decision in ("first", "promoted")
    if is_champion:
        tracker.set_alias(cfg.model_name, CHAMPION, number)
    record = {
        "model_name": cfg.model_name, "version": number, "source": version.source, "benchmark": cfg.benchmark,
        "score": score, "champion_score": champion_score, "previous_champion_version": champion_version,
        "min_improvement": cfg.min_improvement, "decision": decision, "champion": is_champion,
        "champion_version": number if is_champion else champion_version,
        "evaluate_fingerprint": evaluated.fingerprint, "eval_set": eval_sets.get(cfg.benchmark), "reason": reason,
    }
    record_decision(ctx, tracker, record, record_uri)
    converge_champion(tracker, cfg)
    return record


def best_eligible(versions, benchmark: str, eval_set: str | None):
    """The version that should hold `champion`: of those that qualified when registered (decision
    first or promoted) and were scored on `benchmark` over the prompts of digest `eval_set`, the
    best score; the earliest of equal ones (a tie never moves the alias). None when none qualifies."""
    eligible = [v for v in versions if v.tags.get(DECISION_TAG) in ("first", "promoted")
                and v.tags.get(EVAL_SET_TAG + benchmark) == eval_set and SCORE_TAG + benchmark in v.tags]
    return min(eligible, key=lambda v: (-float(v.tags[SCORE_TAG + benchmark]), int(v.version)), default=None)


def converge_champion(tracker, cfg, rounds: int = 3) -> None:
    """Recompute the champion from every version's recorded decision and score after a
    registration, so two retrains that registered at once (each compared with the champion it
    read, each moving the alias) end on one champion, the better: whichever moves the alias last
    has seen both decisions, and checks again after its move."""
    for _ in range(rounds):
        champion = tracker.version_by_alias(cfg.model_name, CHAMPION)
        if champion is None:
            return
        best = best_eligible(tracker.all_versions(cfg.model_name), cfg.benchmark, champion.tags.get(EVAL_SET_TAG + cfg.benchmark))
        if best is None or str(best.version) == str(champion.version):
            return
        print(f"[register] champion recomputed: v{best.version} ({cfg.benchmark} {best.tags[SCORE_TAG + cfg.benchmark]}) "
              f"over v{champion.version} ({champion.tags.get(SCORE_TAG + cfg.benchmark)}), registered at the same time")
        tracker.set_alias(cfg.model_name, CHAMPION, str(best.version))


def against_champion(tracker, cfg, number: str, score: float,
                     eval_set: str | None) -> tuple[str, str | None, float | None, str | None]:
    """(decision, the champion's version, its score, why it was kept when not by score) for
    version `number` scoring `score` on the prompts of digest `eval_set`."""
    champion = tracker.version_by_alias(cfg.model_name, CHAMPION)
    if champion is not None and str(champion.version) == number:
        # an earlier attempt of this run moved the alias, then stopped before recording why
        return "promoted", None, None, None
    champion_version = str(champion.version) if champion is not None else None
    champion_score = _champion_score(champion, cfg.benchmark)
    if champion is not None and champion_score is None:
        return "kept", champion_version, None, "no score"  # a champion without a score on this benchmark cannot be beaten fairly
    theirs = champion.tags.get(EVAL_SET_TAG + cfg.benchmark) if champion is not None else None
    if champion is not None and theirs != eval_set:
        print(f"[register] {cfg.benchmark} was evaluated on other prompts than champion v{champion_version}'s "
              f"(eval set {(eval_set or 'unrecorded')[:12]} vs {(theirs or 'unrecorded')[:12]}): the scores do not compare, "
              "the alias stays")
        return "kept", champion_version, champion_score, "other evaluation set"
    return decide(score, champion_score, cfg.min_improvement), champion_version, champion_score, None


def eval_set_digests(evaluated: StageResult) -> dict[str, str]:
    """benchmark -> data_version of the prompts evaluate scored it on (eval_sets.json)."""
    uri = evaluated.outputs.get("eval_sets")
    return storage.read_json(uri) if uri else {}


def find_or_register(ctx: RunContext, tracker, trained: StageResult, evaluated: StageResult,
                     scores: dict[str, float], eval_sets: dict[str, str]) -> tuple[object, bool]:
    """(the model version of this evaluated model, whether it existed): an earlier attempt of
    this run registered it already, or a new version with the scores as tags."""
    name = ctx.config.registry.model_name
    for version in tracker.model_versions(name, ctx.parent_run_id):
        if version.tags.get("apo.evaluate_fingerprint") == evaluated.fingerprint:
            return version, True
    logged = trained.outputs.get("mlflow_model")  # models:/<id>: the weights' MLflow copy, immutable
    source = logged or source_uri(trained.outputs["model"])
    return tracker.register_version(name, source, ctx.parent_run_id, {
        "apo.run_id": ctx.config.run_id, "apo.evaluate_fingerprint": evaluated.fingerprint,
        MODEL_DIGEST_TAG: storage.folder_digest(trained.outputs["model"], keep=lambda _: True),
        **{SCORE_TAG + bench: value for bench, value in scores.items()},
        **{EVAL_SET_TAG + bench: digest for bench, digest in eval_sets.items()},
    }, model_id=logged.removeprefix("models:/") if logged else None), False


def record_decision(ctx: RunContext, tracker, record: dict, record_uri: str) -> None:
    """The decision as a tag of the version, tags and metrics of the parent run, and registry.json."""
    name, number, champion_version = record["model_name"], record["version"], record["previous_champion_version"]
    tracker.set_version_tags(name, number, {DECISION_TAG: record["decision"]})
    tracker.set_tags(ctx.parent_run_id, {
        "apo.registry.model_name": name, "apo.registry.version": number, "apo.registry.decision": record["decision"],
        "apo.registry.benchmark": record["benchmark"], "apo.registry.champion_version": record["champion_version"],
        "apo.registry.previous_champion_version": champion_version or "none",
    })
    metrics = {"registry/score": record["score"], "registry/version": float(number), "registry/promoted": float(record["champion"])}
    if record["champion_score"] is not None:
        metrics["registry/champion_score"] = record["champion_score"]
    tracker.log_metrics(ctx.parent_run_id, metrics)
    storage.write_json(record, record_uri)
    against = f"champion v{champion_version} {record['champion_score']}" if champion_version else "no champion yet"
    print(f"[register] {name} version {number}: {record['benchmark']} {record['score']:.4f} vs {against} -> "
          f"{record['decision']} (champion: v{record['champion_version']})")


def _champion_score(champion, benchmark: str) -> float | None:
    """The champion's recorded score on `benchmark`; None when there is no champion or it has
    no score there."""
    if champion is None:
        return None
    raw = champion.tags.get(SCORE_TAG + benchmark)
    if raw is None:
        print(f"[register] champion version {champion.version} has no {SCORE_TAG + benchmark} tag; it stays champion")
        return None
    return float(raw)
