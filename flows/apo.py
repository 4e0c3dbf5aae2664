"""The `apo` flow: the A*-PO pipeline as its list of stages.

`execution: local` runs each stage as a task of this flow; `work-pool` submits each as its own
flow run on its work pool and waits for it (flows/dispatch.py, flows/stages.py).
"""

from __future__ import annotations

from prefect import flow

from tasks.config import ApoConfig, ConfigError
from flows.dispatch import stages_for
from tasks.register import register_model
from tasks.run import finish_run, pipeline_run, read_config


@flow(name="apo", log_prints=True)
def apo(config: ApoConfig = ApoConfig(), config_uri: str | None = None, take_over: bool = False) -> dict:
    """preprocess -> sample_reference -> aggregate_vstar (+filter) -> train_online -> evaluate.

    `config_uri`: read the config from this YAML file (any fsspec URI, e.g. s3://...) instead,
    as the scheduled `apo/retrain` deployment does. `take_over`: run even though another
    process holds this run id's lease (one that is stuck); the takeover is logged."""
    if config_uri:
        if config != ApoConfig():
            raise ConfigError("config: give either config or config_uri, not both")
        config = read_config(config_uri)
    with pipeline_run(config, take_over) as ctx:  # the run id's lease, the MLflow parent run, config.json
        stages = stages_for(ctx)  # tasks in this process, or flow runs on the work pools
        prompts = stages.preprocess(ctx)
        samples = stages.sample_reference(ctx, prompts)
        vstar = stages.aggregate_vstar(ctx, samples)
        trained = stages.train_online(ctx, prompts, vstar)
        results = stages.evaluate(ctx, prompts, trained)
        register_model(ctx, trained, results)  # MLflow registry: `champion` moves only when the new model wins
        return finish_run(ctx, [prompts, samples, vstar, trained, results])
