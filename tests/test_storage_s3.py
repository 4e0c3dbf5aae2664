"""The pipeline with its artifact root in S3 (moto's S3 server on loopback, reached through
s3fs with the endpoint and keys from the environment)."""

import polars as pl

from tests.test_flow import STAGE_FILES, tiny_config


def test_pipeline_on_an_s3_artifact_root(prefect_api, s3_endpoint, tiny_model_dir, tmp_path):
    import s3fs

    from flows.apo import apo

    cfg = tiny_config("s3://apo-test/runs", tiny_model_dir, **{
        "run_id": "s3run", "train.steps": 2, "tracking.mlflow_tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"})
    summary = apo(config=cfg)
    fs = s3fs.S3FileSystem()
    for stage, (name, columns) in STAGE_FILES.items():
        assert fs.exists(f"apo-test/runs/s3run/{stage}/_COMPLETE.json"), stage
        with fs.open(f"apo-test/runs/s3run/{stage}/{name}", "rb") as f:
            assert columns <= set(pl.read_parquet(f).columns), stage
    assert fs.exists("apo-test/runs/s3run/train_online/model/model.safetensors")
    assert fs.exists("apo-test/runs/s3run/train_online/checkpoints/step_000002/trainer_state.pt")
    assert fs.exists("apo-test/runs/s3run/summary.json")
    assert summary["artifacts"]["evaluate"] == "s3://apo-test/runs/s3run/evaluate"
    # stage 1 published to the reference-sample store beside the runs, in the bucket
    entries = fs.glob("apo-test/runs/_reference/v1/*/manifests/*.json")
    assert entries and summary["metrics"]["reference/sampled"] == 24 * 2
    # the keys live in the environment only: nothing written to the bucket carries them
    for path in fs.find("apo-test/runs/s3run"):
        if path.endswith((".json", ".yaml", ".txt")):
            assert b"apo-test-secret" not in fs.cat_file(path), path

    again = apo(config=cfg)
    assert again["stages_recomputed"] == []
