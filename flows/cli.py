"""`apo` command line: `apo run [--config FILE] [--set key=value ...] [--run-id ID]`."""

from __future__ import annotations

import argparse
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
    args = parser.parse_args(argv)

    from apo_core.config import ConfigError, load_config

    try:
        overrides = list(args.overrides) + ([f"run_id={args.run_id}"] if args.run_id else [])
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"apo: {exc}", file=sys.stderr)
        return 2

    from flows.apo import apo

    summary = apo(config=cfg)
    print(_summary_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
