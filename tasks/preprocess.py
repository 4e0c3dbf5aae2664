"""Stage `preprocess`: the prompt set as prompts.parquet (prompt_id, prompt, answer, split),
with bad rows counted per reason (skipped.json) and the sources and template recorded."""

from __future__ import annotations

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from .config import ApoConfig
from apo_core.data import TEMPLATES, PromptRecord, chat_prompt, data_version, embedded_prompt_set, spec_for
from apo_core.modeling import load_tokenizer

from . import storage
from .datasets import content_digests, load_split
from .review import records_dataset
from .stage import RunContext, StageIO, StageResult, fingerprint, run_stage


def load_records(cfg: ApoConfig) -> tuple[list[PromptRecord], dict[str, int], dict]:
    """(records, skipped counts '<split>/<reason>', provenance) for the configured data."""
    data = cfg.data
    if data.name == "embedded":
        if data.template != "chat":
            return embedded_prompt_set(data), {}, {"source": "apo_core.embedded", "template": "embedded"}
        tokenizer = load_tokenizer(cfg.model.path)
        records = embedded_prompt_set(data, lambda content: chat_prompt(tokenizer, content))
        return records, {}, {"source": "apo_core.embedded", "template": "chat", "chat_template": tokenizer.chat_template,
                             "prompt_tokens": prompt_token_stats(records, tokenizer)}
    spec = spec_for(data)
    tokenizer = load_tokenizer(cfg.model.path)
    records: list[PromptRecord] = []
    skipped: dict[str, int] = {}
    sources: dict[str, str] = {}
    for split, path, size in (("train", data.train_path, data.train_size), ("test", data.test_path, data.test_size)):
        try:
            cleaned, uri = load_split(data.name, spec, split, path, size, tokenizer, data.max_prompt_tokens)
        except ValueError as exc:
            raise ValueError(f"preprocess: {exc}") from None
        records += cleaned.records
        skipped.update({f"{split}/{reason}": n for reason, n in cleaned.skipped.items()})
        sources[split] = uri
    provenance = {"sources": sources, "hub_revision": spec.hub_revision, "template": TEMPLATES.get(spec.template, spec.template),
                  "prompt_field": spec.prompt_field, "answer_field": spec.answer_field, "answer_from": spec.answer_from,
                  "prompt_tokens": prompt_token_stats(records, tokenizer)}
    return records, skipped, provenance


def data_versions(records: list[PromptRecord]) -> dict[str, str]:
    """The run's data version (apo_core.data.data_version): of all its prompts, and per split."""
    return {"all": data_version(records), **{s: data_version(r for r in records if r.split == s) for s in ("train", "test")}}


def prompt_token_stats(records: list[PromptRecord], tokenizer) -> dict[str, dict[str, float]]:
    """Rendered prompts' lengths in the model's tokens per split: mean, median, max."""
    out = {}
    for split in sorted({r.split for r in records}):
        prompts = [r.prompt for r in records if r.split == split]
        n = sorted(len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"])
        out[split] = {"mean": round(sum(n) / len(n), 1), "median": float(n[len(n) // 2]), "max": float(n[-1])}
    return out


@task(name="preprocess", cache_policy=NO_CACHE, retries=1)
def preprocess(ctx: RunContext) -> StageResult:
    cfg = ctx.config

    def body(io: StageIO):
        records, skipped, provenance = load_records(cfg)
        df = pl.DataFrame([r.to_row() for r in records], schema={"prompt_id": pl.String, "prompt": pl.String, "answer": pl.String, "split": pl.String})
        overlap = set(df.filter(pl.col("split") == "train")["prompt"]) & set(df.filter(pl.col("split") == "test")["prompt"])
        storage.write_parquet(df, io.path("prompts.parquet"))
        versions = data_versions(records)
        provenance = {**provenance, "data_version": versions}
        storage.write_json({"skipped": skipped, **provenance, "train_test_prompt_overlap": len(overlap)}, io.path("provenance.json"))
        io.tracker.set_tags(io.mlflow_run_id, {f"apo.data_version.{k}": v for k, v in versions.items()})
        metrics = {f"data/{s}": float(n) for s, n in df.group_by("split").len().iter_rows()}
        metrics.update({f"data/skipped/{k}": float(v) for k, v in skipped.items()})
        metrics["data/train_test_overlap"] = float(len(overlap))
        for split, stats in provenance.get("prompt_tokens", {}).items():
            metrics.update({f"data/prompt_tokens_{k}/{split}": v for k, v in stats.items()})
        if skipped:
            print(f"[preprocess] skipped rows: {', '.join(f'{k}={v}' for k, v in sorted(skipped.items()))}")
        if overlap:
            print(f"[preprocess] WARNING: {len(overlap)} held-out prompts also appear in training")
        io.log_metrics(metrics)
        io.tracker.log_dict(io.mlflow_run_id, provenance, "provenance.json")
        io.log_datasets([records_dataset(split, [r for r in records if r.split == split], io.path("prompts.parquet"),
                                         "training" if split == "train" else "evaluation") for split in ("train", "test")])
        return metrics, {"prompts": io.path("prompts.parquet"), "provenance": io.path("provenance.json")}

    uses_model = cfg.data.name != "embedded" or cfg.data.template == "chat"  # its tokenizer renders or counts the prompts
    fp = fingerprint(cfg.data.model_dump(), cfg.model.path if uses_model else None)
    inputs = content_digests({"data.train_path": cfg.data.train_path, "data.test_path": cfg.data.test_path})
    return run_stage(ctx, "preprocess", fp, body, inputs)
