"""The `apo` flow: the A*-PO pipeline as its list of stages."""

from __future__ import annotations

from prefect import flow

from apo_core.config import ApoConfig
from tasks.aggregate_vstar import aggregate_vstar
from tasks.evaluate import evaluate
from tasks.preprocess import preprocess
from tasks.run import finish_run, start_run
from tasks.sample_reference import sample_reference
from tasks.train_online import train_online


@flow(name="apo", log_prints=True)
def apo(config: ApoConfig = ApoConfig()) -> dict:
    """preprocess -> sample_reference -> aggregate_vstar (+filter) -> train_online -> evaluate."""
    ctx = start_run(config)
    prompts = preprocess(ctx)
    samples = sample_reference(ctx, prompts)
    vstar = aggregate_vstar(ctx, samples)
    trained = train_online(ctx, prompts, vstar)
    results = evaluate(ctx, prompts, trained)
    return finish_run(ctx, [prompts, samples, vstar, trained, results])
