"""`apo` command line: `apo run [--config FILE] [--set key=value ...] [--run-id ID]`."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

# Prefect reads its settings at import time: set local defaults first (env still wins).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class LocalPrefectAPI:
    """The run's local Prefect API server, started before the heavy imports instead of after.

    With no PREFECT_API_URL configured, Prefect starts a temporary API server (a uvicorn
    subprocess) the first time a flow needs one, and waits for it: ~8 s here with a migrated
    database (~20 s on a fresh one), after this process has spent ~7 s importing torch,
    transformers and MLflow. `start` launches the same server, the same way, first thing, so
    the two overlap on separate cores; the flow then runs against it as a configured API
    (`settings()`), and `stop` ends it. Where a server is configured, or Prefect's ephemeral
    mode is off, this does nothing and Prefect behaves as usual."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.url: str | None = None

    def start(self) -> None:
        from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE

        if PREFECT_API_URL.value() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
            return
        import prefect

        with socket.socket() as sock:  # a free loopback port
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        # Prefect's own command and environment for its temporary server (prefect.server.api.server)
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "error",
             "--lifespan", "on"], env=env)
        self.url = f"http://127.0.0.1:{port}/api"

    def wait_until_ready(self) -> None:
        """Block until the server answers /health; a clear error if it exits or does not answer."""
        if self.process is None:
            return
        import httpx
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        deadline = time.monotonic() + PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the local Prefect API server exited with code {self.process.returncode} before answering")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the local Prefect API server did not answer {self.url}/health within "
                           f"{PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()} s "
                           "(raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")

    def settings(self):
        """Context in which Prefect clients use this server (no-op when none was started)."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        return temporary_settings(updates={PREFECT_API_URL: self.url}) if self.url else contextlib.nullcontext()

    def stop(self) -> None:
        """Signal a graceful shutdown and return. uvicorn's shutdown waits for open connections,
        and this process's Prefect client holds keep-alive ones until it exits (waiting here took
        3-10 s); once this process is gone the server finishes on its own within a second."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()


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
    metrics = summary.get("metrics", {})
    if "reference/sampled" in metrics:
        lines.append(f"  reference samples: {int(metrics['reference/reused'])} reused from the store, "
                     f"{int(metrics['reference/sampled'])} sampled (stage 1: {summary['stage_seconds'].get('sample_reference', 0):.1f}s)")
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
    from apo_core.data import BUILTIN  # the built-in data sets (no torch: a bad command fails fast)

    parser = argparse.ArgumentParser(prog="apo", description="A*-PO post-training pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline (flow `apo`) locally")
    run.add_argument("--config", help="YAML config file")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one config key, e.g. --set train.lr=1e-5 (repeatable)")
    run.add_argument("--run-id", help="run id; re-using one skips completed stages and resumes training")
    run.add_argument("--take-over", action="store_true",
                     help="run even though another process holds the run id's lease (a stuck one); logged")
    ev = sub.add_parser("evaluate", help="evaluate a model on a benchmark (greedy, and avg@K/pass@K with --samples K)")
    ev.add_argument("--model", required=True, help="model folder, hub id, or `embedded`")
    ev.add_argument("--benchmark", required=True, choices=list(BUILTIN))
    ev.add_argument("--data-path", help="local or fsspec JSONL/Parquet file of the benchmark (default: the hub)")
    ev.add_argument("--limit", type=int, help="evaluate the first N problems")
    ev.add_argument("--samples", type=int, default=1, help="K sampled responses per problem (adds avg@K, pass@K)")
    ev.add_argument("--out", help="output folder or URI (default ./.apo/eval/<benchmark>-<model>)")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="other config keys, e.g. eval.max_new_tokens=1024 (repeatable)")
    st = sub.add_parser("store", help="show the reference-sample store (size, models, prompts); --prune removes unused models")
    st.add_argument("--config", help="YAML config file naming the store (reference.store, else artifact_root)")
    st.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one config key, e.g. --set reference.store=s3://bucket/apo-reference (repeatable)")
    st.add_argument("--prune", action="store_true", help="remove models not used for --unused-days (never one a run is reading)")
    st.add_argument("--unused-days", type=float, default=30.0, help="with --prune: a model unused this long goes (default 30)")
    st.add_argument("--model", dest="models", action="append", default=[], metavar="DIGEST",
                    help="with --prune: remove this model (a digest prefix as `apo store` lists it) whatever its age (repeatable)")
    st.add_argument("--dry-run", action="store_true", help="with --prune: list what would go, remove nothing")
    args = parser.parse_args(argv)

    if args.command == "evaluate":
        return _evaluate(args)  # no flow: Prefect's API is not needed
    if args.command == "store":
        return _store(args)

    from tasks.config import ConfigError, load_config

    try:  # a bad config fails before anything starts
        overrides = list(args.overrides) + ([f"run_id={args.run_id}"] if args.run_id else [])
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"apo: {exc}", file=sys.stderr)
        return 2
    local_api = LocalPrefectAPI()
    local_api.start()  # starts up while _run imports torch, transformers and MLflow
    try:
        return _run(cfg, local_api, args.take_over)
    finally:
        local_api.stop()


# Exit codes of `apo run`: done; stopped, resumable with the same --run-id; refused before
# anything was computed (config, preflight); the run id is held by another process.
EXIT_OK, EXIT_STOPPED, EXIT_REFUSED, EXIT_BUSY = 0, 1, 2, 3


def _run(cfg, local_api: LocalPrefectAPI, take_over: bool = False) -> int:
    from tasks.config import ConfigError
    from apo_core.checkpoints import CheckpointMismatch
    from flows.apo import apo
    from flows.dispatch import StageRunFailed
    from tasks.lease import LeaseHeld, LeaseLost
    from tasks.preflight import PreflightError
    from tasks.storage import StorageError, out_of_space
    from tasks.termination import Preempted

    try:
        if cfg.run_id:  # a run id that another process is writing: say so before any flow run starts
            from tasks import lease, storage

            storage.configure(cfg.storage)
            lease.check_free(storage.join(cfg.artifact_root, cfg.run_id), cfg.run_id, take_over)
        local_api.wait_until_ready()
        with local_api.settings():
            summary = apo(config=cfg, take_over=take_over)
    except (ConfigError, PreflightError) as exc:  # the run could not start: nothing was computed
        print(f"apo: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_REFUSED
    except LeaseHeld as exc:
        print(f"apo: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_BUSY
    except (StorageError, StageRunFailed, CheckpointMismatch, FloatingPointError, LeaseLost, Preempted) as exc:
        # Prefect has logged the traceback; the last line says what stopped the run. Re-run with
        # the same --run-id to resume from what was published.
        print(f"apo: stopped: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_STOPPED
    except Exception as exc:
        if not out_of_space(exc):
            raise
        print(f"apo: stopped: {disk_full_line(exc, cfg)}", file=sys.stderr)
        return EXIT_STOPPED
    print(_summary_table(summary))
    return EXIT_OK


def disk_full_line(exc: BaseException, cfg) -> str:
    """One line for a run that ran out of space: the path and what was being written."""
    from tasks.storage import DiskFull, redact
    from tasks.tracking import default_tracking_uri

    chain, seen = [], exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for err in chain:
        if isinstance(err, DiskFull):
            return str(err).splitlines()[0]
    for err in chain:
        if getattr(err, "filename", None):
            return f"no space left on device writing {redact(str(err.filename))} (free space, then rerun the same run id: it resumes)"
    return (f"no space left on device writing MLflow's tracking store {redact(default_tracking_uri(cfg))} "
            "(free space, then rerun the same run id: it resumes)")


def _store(args) -> int:
    from tasks.config import ConfigError, load_config
    from tasks import reference_store
    from tasks.storage import redact

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"apo: {exc}", file=sys.stderr)
        return 2
    root = cfg.reference.store_uri(cfg.artifact_root)
    if args.prune:
        removed = reference_store.prune(root, args.unused_days, args.models, dry_run=args.dry_run)
        verb = "would remove" if args.dry_run else "removed"
        print("\n".join(f"{verb} {redact(uri)}" for uri in removed) or "nothing to prune")
        return 0
    models = reference_store.describe(root)
    print(f"reference-sample store {redact(root)}: {len(models)} model(s), "
          f"{sum(m['samples'] for m in models)} samples, {sum(m['bytes'] for m in models) / 2**20:.1f} MiB")
    if models:
        print(f"  {'model':<18}{'prompts':>9}{'samples':>10}{'MiB':>8}  {'last used':<26}path")
    for m in models:
        busy = "  (a run is reading it)" if m["readers"] else ""
        print(f"  {m['model']:<18}{m['prompts']:>9}{m['samples']:>10}{m['bytes'] / 2**20:>8.1f}  {m['last_used'] or '-':<26}"
              f"{m['model_path'] or '-'}{busy}")
    return 0


def _evaluate(args) -> int:
    import re

    from tasks.config import ConfigError, load_config

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
        sets, _ = benchmark_sets(cfg, load_tokenizer(cfg.model.path))
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


def entry() -> None:
    """Console-script entry point: main(), then exit without the interpreter's module teardown.

    Tearing down torch, transformers and Prefect's modules takes ~2.5 s after the work is
    done; the exit handlers (Prefect's log and event flushing, MLflow's run end) still run
    first, and the output streams are flushed."""
    code = main()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
