"""What a person reviewing a run sees besides the files: the MLflow run's description, figures,
per-prompt tables and dataset inputs, where the code and the orchestrator run came from, and the
Prefect flow run's artifacts (summary, stage times, progress). Nothing here decides a result: a
review surface that cannot be written is reported and the run goes on.
"""

from __future__ import annotations

import io
import os
import subprocess
import time
from pathlib import Path
from typing import Mapping, Sequence

import polars as pl

from apo_core.data import PromptRecord, data_version

from . import storage
from .stage import STAGES, RunContext, StageResult
from .tracking import DatasetRef

REPO = Path(__file__).resolve().parents[1]
FIGURES = "figures"  # folder of the PNGs, under the run's artifact folder and in its MLflow runs
# which stage's MLflow run each figure also goes to (every figure goes to the parent run)
FIGURE_STAGE = {"vstar": "aggregate_vstar", "training": "train_online", "accuracy": "evaluate", "stages": None}


def warn(what: str, exc: Exception) -> None:
    print(f"[review] {what} not written: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")


# -- where the run came from ----------------------------------------------------------------------

def code_commit() -> str | None:
    """The code's git commit: $APO_GIT_COMMIT (set when an image is built), else the checkout's HEAD."""
    if os.environ.get("APO_GIT_COMMIT"):
        return os.environ["APO_GIT_COMMIT"]
    if not (REPO / ".git").exists():
        return None
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or None if out.returncode == 0 else None


def source_tags() -> dict[str, str]:
    """MLflow source tags of a pipeline run: the commit, the entry point, the Prefect flow run
    (id, deployment, UI address when the API has one)."""
    from prefect.runtime import deployment, flow_run

    tags = {"mlflow.source.name": "flows/apo.py:apo", "mlflow.source.type": "JOB"}
    if commit := code_commit():
        tags["mlflow.source.git.commit"] = commit
    if flow_run.id:
        tags["apo.prefect.flow_run_id"] = str(flow_run.id)
        if url := flow_run.ui_url:
            tags["apo.prefect.flow_run_url"] = url
    if deployment.name:
        tags["apo.prefect.deployment"] = f"{flow_run.flow_name}/{deployment.name}"
    return tags


def mlflow_run_url(ctx: RunContext, experiment_id: str) -> str | None:
    uri = ctx.tracking_uri.rstrip("/")
    if uri.startswith(("http://", "https://")):
        return f"{uri}/#/experiments/{experiment_id}/runs/{ctx.parent_run_id}"
    return None


def mlflow_run_link(ctx: RunContext, experiment_id: str) -> str:
    """Markdown pointing at the parent MLflow run: a link when the tracking URI is a server."""
    if url := mlflow_run_url(ctx, experiment_id):
        return f"[MLflow run {ctx.parent_run_id}]({url})"
    uri = ctx.tracking_uri
    return f"MLflow run `{ctx.parent_run_id}` (experiment `{ctx.config.tracking.experiment}`): `mlflow ui --backend-store-uri {uri}`"


# -- data sets ------------------------------------------------------------------------------------

def records_dataset(name: str, records: Sequence[PromptRecord], source: str, context: str) -> DatasetRef:
    """A prompt set as an MLflow dataset, its digest the run's data version of those prompts."""
    frame = pl.DataFrame([r.to_row() for r in records], schema={"prompt_id": pl.String, "prompt": pl.String,
                                                                "answer": pl.String, "split": pl.String})
    return DatasetRef.of_frame(name, data_version(records), source, frame, context)


def table_dataset(name: str, uri: str, context: str) -> DatasetRef:
    """A Parquet table a stage published, its digest the file's sha256."""
    return DatasetRef.of_frame(name, storage.file_sha256(uri), uri, storage.read_parquet(uri), context)


# -- the description and the stage table ----------------------------------------------------------

def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def accuracy_line(summary: Mapping) -> str:
    """The description's first line, e.g. `Held-out accuracy: reference 40.0% -> trained 60.2%`."""
    ref, trained = summary.get("reference_accuracy"), summary.get("trained_accuracy")
    if trained is None:
        return "Held-out accuracy: not evaluated"
    if ref is None:
        return f"Held-out accuracy: trained {pct(trained)}"
    return f"Held-out accuracy: reference {pct(ref)} -> trained {pct(trained)}"


def benchmark_accuracies(metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """benchmark -> {model: greedy accuracy} from evaluate's metrics (heldout is the run's split).

    >>> benchmark_accuracies({"eval/reference_accuracy": 0.4, "eval/trained_accuracy": 0.6, "eval/trained_math500_accuracy": 0.2})
    {'heldout': {'reference': 0.4, 'trained': 0.6}, 'math500': {'trained': 0.2}}
    """
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        for model in ("reference", "trained"):
            prefix = f"eval/{model}_"
            if key.startswith(prefix) and key.endswith("accuracy") and "@" not in key:
                bench = key.removeprefix(prefix).removesuffix("accuracy").rstrip("_") or "heldout"
                out.setdefault(bench, {})[model] = float(value)
    return dict(sorted(out.items(), key=lambda kv: kv[0] != "heldout"))


def stage_rows(summary: Mapping) -> list[dict]:
    return [{"stage": s, "status": summary["stage_status"][s], "seconds": summary["stage_seconds"][s],
             "peak RSS (MB)": round(summary["stage_peak_rss_mb"][s])} for s in STAGES if s in summary["stage_seconds"]]


def markdown_table(rows: Sequence[Mapping]) -> list[str]:
    if not rows:
        return []
    head = list(rows[0])
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(str(r[k]) for k in head) + " |" for r in rows]


def description(summary: Mapping) -> str:
    """The parent run's description (markdown): accuracy before and after per benchmark, V*,
    the reference samples, seconds and peak memory per stage, where the artifacts are."""
    m = summary["metrics"]
    lines = [accuracy_line(summary), ""]
    lines += markdown_table([{"benchmark": b, "reference": pct(a.get("reference")), "trained": pct(a.get("trained"))}
                             for b, a in benchmark_accuracies(m).items()])
    if "vstar/prompts" in m:
        n = summary["config"]["reference"]["n_samples"]
        lines += ["", f"V*: {int(m['vstar/prompts']):,} prompts, mean {m['vstar/mean']:.3f}, pass@{n} {m['vstar/pass_at_n']:.3f}, "
                      f"all-zero {pct(m['vstar/all_zero_frac'])}; {int(m['vstar/kept']):,} trained on"]
    if "reference/sampled" in m:
        lines += [f"Reference samples: {int(m['reference/sampled']):,} sampled, {int(m.get('reference/reused', 0)):,} "
                  "reused from the reference-sample store"]
    lines += [""] + markdown_table(stage_rows(summary))
    lines += ["", f"Artifacts: `{summary['summary_uri'].rsplit('/', 1)[0]}` (summary.json, figures/, one folder per stage)"]
    if summary.get("registry"):
        r = summary["registry"]
        lines += [f"Registry: {r['model_name']} v{r['version']}, {r['decision']} (champion v{r['champion_version']})"]
    return "\n".join(lines)


# -- figures --------------------------------------------------------------------------------------

def _figure(rows: int = 1, cols: int = 1, size=(7.0, 3.6)):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=size, constrained_layout=True, squeeze=False)


def vstar_figure(vstar: pl.DataFrame, n_samples: int):
    fig, ax = _figure()
    ax = ax[0][0]
    ax.hist(vstar["vstar"].to_list(), bins=30, color="#4c72b0")
    passed = float(vstar["pass_at_n"].mean())
    ax.set(xlabel="V* (reference value of the prompt)", ylabel="prompts",
           title=f"V* of {vstar.height:,} prompts; pass@{n_samples} {passed:.2f}, all-zero {float((vstar['pass_at_n'] == 0).mean()):.2f}")
    return fig


def training_figure(history: pl.DataFrame):
    series = [("rollout/reward_mean", "reward (rollout mean)"), ("train/kl", "KL to pi_ref"), ("train/loss", "loss")]
    series = [(k, label) for k, label in series if k in history.columns]
    fig, axes = _figure(1, len(series), size=(4.0 * len(series), 3.2))
    for ax, (key, label) in zip(axes[0], series):
        ax.plot(history["step"].to_list(), history[key].to_list(), color="#4c72b0")
        ax.set(xlabel="step", title=label)
    return fig


def accuracy_figure(accuracies: Mapping[str, Mapping[str, float]]):
    fig, ax = _figure(size=(max(4.0, 2.0 * len(accuracies)), 3.4))
    ax = ax[0][0]
    names = list(accuracies)
    for j, model in enumerate(("reference", "trained")):
        xs = [i + (j - 0.5) * 0.38 for i in range(len(names))]
        ys = [100 * accuracies[b].get(model, float("nan")) for b in names]
        bars = ax.bar(xs, ys, width=0.36, label=model, color=("#999999", "#4c72b0")[j])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set(ylabel="greedy accuracy (%)", title="Held-out accuracy before and after training")
    ax.legend()
    return fig


def stages_figure(rows: Sequence[Mapping]):
    fig, axes = _figure(1, 2, size=(9.0, 3.2))
    names = [r["stage"] for r in rows][::-1]
    for ax, key, label in ((axes[0][0], "seconds", "seconds"), (axes[0][1], "peak RSS (MB)", "peak RSS (MB)")):
        ax.barh(names, [r[key] for r in rows][::-1], color="#4c72b0")
        ax.set(title=label)
    return fig


def figures(summary: Mapping, by_stage: Mapping[str, StageResult]) -> dict[str, object]:
    """name -> matplotlib figure, for what this run has."""
    out: dict[str, object] = {"stages": stages_figure(stage_rows(summary))}
    if "aggregate_vstar" in by_stage:
        out["vstar"] = vstar_figure(storage.read_parquet(by_stage["aggregate_vstar"].outputs["vstar"]),
                                    summary["config"]["reference"]["n_samples"])
    if "train_online" in by_stage and "metrics" in by_stage["train_online"].outputs:
        history = storage.read_parquet(by_stage["train_online"].outputs["metrics"])
        if history.height:
            out["training"] = training_figure(history)
    accuracies = benchmark_accuracies(summary["metrics"])
    if accuracies:
        out["accuracy"] = accuracy_figure(accuracies)
    return out


def publish_figures(ctx: RunContext, tracker, summary: Mapping, by_stage: Mapping[str, StageResult]) -> list[str]:
    """Every figure as <run>/figures/<name>.png and in the parent's (and its stage's) MLflow run."""
    import matplotlib.pyplot as plt

    written = []
    for name, fig in figures(summary, by_stage).items():
        try:
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=110)
            storage.write_bytes(storage.join(ctx.run_uri, FIGURES, f"{name}.png"), buf.getvalue())
            runs = [ctx.parent_run_id]
            stage = by_stage.get(FIGURE_STAGE[name] or "")
            if stage is not None and stage.mlflow_run_id:
                runs.append(stage.mlflow_run_id)
            for run in runs:
                tracker.log_figure(run, fig, f"{FIGURES}/{name}.png")
            written.append(name)
        except Exception as exc:  # a figure is for people; the run's results stand without it
            warn(f"figure {name}", exc)
        finally:
            plt.close(fig)
    return written


# -- per-prompt tables ----------------------------------------------------------------------------

def per_prompt_table(results: pl.DataFrame) -> pl.DataFrame:
    """evaluate's rows (one per model, benchmark and prompt) as one row per benchmark and prompt:
    prompt, gold, and each model's greedy response and reward side by side."""
    keys = ["benchmark", "prompt_id", "prompt", "answer"]
    out = None
    for model in ("reference", "trained"):
        part = results.filter(pl.col("model") == model)
        if part.height == 0:
            continue
        part = part.select(*keys, pl.col("response").alias(f"{model}_response"), pl.col("reward").alias(f"{model}_reward"))
        out = part if out is None else out.join(part, on=keys, how="full", coalesce=True)
    return (out if out is not None else results.select(keys)).rename({"answer": "gold"})


# -- Prefect --------------------------------------------------------------------------------------

def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) from `parts`.

    >>> artifact_key("apo-summary", "Run_2026.12")
    'apo-summary-run-2026-12'
    """
    text = "-".join(parts).lower()
    return "-".join(filter(None, "".join(c if c.isalnum() else "-" for c in text).split("-")))


def in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def prefect_link(ctx: RunContext, experiment_id: str) -> None:
    """A link artifact from the flow run to its MLflow run, made when the run starts (a tracking
    server only: a local SQLite store has no address)."""
    url = mlflow_run_url(ctx, experiment_id)
    if not in_prefect_run() or url is None:
        return
    from prefect.artifacts import create_link_artifact

    try:
        create_link_artifact(link=url, link_text="MLflow run",
                             key=artifact_key("apo-mlflow", ctx.config.run_id or "run"), description="the run in MLflow")
    except Exception as exc:
        warn("Prefect link artifact", exc)


def prefect_summary(ctx: RunContext, summary: Mapping, text: str, experiment_id: str) -> None:
    """The flow run's markdown artifact (the description and the MLflow link) and a table
    artifact of stage times; versioned by the run id's key, so a retrain's history is kept."""
    if not in_prefect_run():
        return
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    run_id = ctx.config.run_id or "run"
    try:
        create_markdown_artifact(markdown=f"{text}\n\n{mlflow_run_link(ctx, experiment_id)}\n", key=artifact_key("apo-summary", run_id),
                                 description=f"apo run {run_id}: accuracy, V*, stage costs")
        create_table_artifact(table=stage_rows(summary), key=artifact_key("apo-stage-times", run_id),
                              description=f"apo run {run_id}: seconds and peak RSS per stage")
    except Exception as exc:
        warn("Prefect artifacts", exc)


class Progress:
    """A Prefect progress artifact of the current flow run (0-100%), updated at most once a second
    and at the end; outside a Prefect run, or when the API refuses, nothing (and no error)."""

    def __init__(self, description: str):
        self.id, self._last = None, 0.0
        if not in_prefect_run():
            return
        try:
            from prefect.artifacts import create_progress_artifact

            self.id = create_progress_artifact(progress=0.0, description=description)
        except Exception as exc:
            warn("progress artifact", exc)

    def update(self, done: float, total: float) -> None:
        now = time.monotonic()
        if self.id is None or (done < total and now - self._last < 1.0):
            return
        self._last = now
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.id, progress=min(100.0, 100.0 * done / max(total, 1e-9)))
        except Exception as exc:
            warn("progress update", exc)
            self.id = None
