"""`apo` command line: `apo run [--config FILE] [--set key=value ...] [--run-id ID]`."""

from __future__ import annotations

import argparse
import json
import os
import sys

# Prefect reads its settings at import time: set local defaults first (env still wins).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _summary_table(summary: dict) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    lines = [
        "",
        f"A*-PO run {summary['run_id']}",
        f"  held-out greedy accuracy: reference {pct(summary['reference_accuracy'])} -> trained {pct(summary['trained_accuracy'])}",
        "",
        f"  {'stage':<18}{'status':<10}{'seconds':>9}{'peak RSS MB':>13}",
    ]
    for stage, seconds in summary["stage_seconds"].items():
        lines.append(f"  {stage:<18}{summary['stage_status'][stage]:<10}{seconds:>9.1f}{summary['stage_peak_rss_mb'][stage]:>13.0f}")
    if any(status == "skipped" for status in summary["stage_status"].values()):
        lines.append("  (a skipped stage shows the time and memory of the run that computed it)")
    lines += [
        "",
        f"  recomputed: {', '.join(summary['stages_recomputed']) or 'nothing (every stage was complete)'}",
        f"  artifacts:  {summary['summary_uri'].rsplit('/', 1)[0]}/",
        f"  summary:    {summary['summary_uri']}",
        f"  MLflow:     run {summary['mlflow_run_id']} in {summary['mlflow_tracking_uri']}",
        f"  MLflow UI:  {summary['mlflow_ui']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apo", description="A*-PO post-training pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline (flow `apo`) locally")
    run.add_argument("--config", help="YAML config file")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one config key, e.g. --set train.lr=1e-5 (repeatable)")
    run.add_argument("--run-id", help="run id; re-using one skips completed stages and resumes training")
    ev = sub.add_parser("evaluate", help="evaluate a model on a benchmark (greedy, and avg@K/pass@K with --samples K)")
    ev.add_argument("--model", required=True, help="model folder, hub id, or `embedded`")
    ev.add_argument("--benchmark", required=True, choices=["gsm8k", "math", "math500", "amc23", "aime24"])
    ev.add_argument("--data-path", help="local or fsspec JSONL/Parquet file of the benchmark (default: the hub)")
    ev.add_argument("--limit", type=int, help="evaluate the first N problems")
    ev.add_argument("--samples", type=int, default=1, help="K sampled responses per problem (adds avg@K, pass@K)")
    ev.add_argument("--out", help="output folder or URI (default ./.apo/eval/<benchmark>-<model>)")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="other config keys, e.g. eval.max_new_tokens=1024 (repeatable)")
    args = parser.parse_args(argv)

    from apo_core.config import ConfigError, load_config

    if args.command == "evaluate":
        return _evaluate(args)

    try:
        overrides = list(args.overrides) + ([f"run_id={args.run_id}"] if args.run_id else [])
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"apo: {exc}", file=sys.stderr)
        return 2

    from apo_core.trainer import CheckpointMismatch
    from flows.apo import apo
    from flows.dispatch import StageRunFailed
    from tasks.preflight import PreflightError
    from tasks.storage import StorageError

    try:
        summary = apo(config=cfg)
    except (ConfigError, PreflightError) as exc:  # the run could not start: nothing was computed
        print(f"apo: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except (StorageError, StageRunFailed, CheckpointMismatch, FloatingPointError) as exc:
        # Prefect has logged the traceback; the last line says what stopped the run. Re-run with
        # the same --run-id to resume from what was published.
        print(f"apo: stopped: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    print(_summary_table(summary))
    return 0


def _evaluate(args) -> int:
    import re

    from apo_core.config import ConfigError, load_config

    entry = f"{args.benchmark}={args.data_path}" if args.data_path else args.benchmark
    overrides = [f"model.path={args.model}", f"eval.samples={args.samples}", *args.overrides]
    if args.limit:
        overrides.append(f"eval.benchmark_limit={args.limit}")
    try:
        cfg = load_config(overrides=overrides)
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"benchmarks": [entry]})})
    except ConfigError as exc:
        print(f"apo: {exc}", file=sys.stderr)
        return 2

    from apo_core.modeling import load_tokenizer
    from tasks import storage
    from tasks.evaluate import benchmark_sets, evaluate_models

    try:
        sets = benchmark_sets(cfg, load_tokenizer(cfg.model.path))
    except (ValueError, FileNotFoundError) as exc:
        print(f"apo: {exc}", file=sys.stderr)
        return 2
    results, metrics = evaluate_models(cfg, {"model": cfg.model.path}, sets)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", args.model.rstrip("/").rsplit("/", 1)[-1])
    out = args.out or f"./.apo/eval/{args.benchmark}-{slug}"
    storage.write_parquet(results, storage.join(out, "results.parquet"))
    aggregate = {"model": args.model, "benchmark": args.benchmark, "source": entry, "samples": args.samples,
                 **{k.removeprefix(f"eval/model_{args.benchmark}_"): v for k, v in metrics.items()}}
    storage.write_json(aggregate, storage.join(out, "results.json"))
    print(json.dumps(aggregate, indent=2))
    print(f"per-problem results: {storage.join(out, 'results.parquet')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
