"""Object storage faults: transient errors are retried with backoff within a bound, permanent ones
fail at once, and an S3 endpoint killed in the middle of a stage either comes back in time (the
stage completes) or does not (the stage fails in one line, publishes nothing, and a rerun with the
same run id resumes). The endpoint is a real moto S3 server process on loopback (`durable_s3`)."""

from __future__ import annotations

import errno
import threading

import pytest

from tasks import storage
from tests.faults.conftest import prefect_run_logs, run_flow
from tests.test_flow import tiny_config

pytestmark = pytest.mark.usefixtures("default_policy")


@pytest.fixture
def default_policy():
    yield
    storage.configure()  # tests set their own policies; leave the default for the next one


def client_error(status: int, code: str):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def s3fs_translated(status: int, code: str) -> OSError:
    """The error s3fs raises for a ClientError (its own translation, cause attached)."""
    from s3fs.errors import translate_boto_error

    return translate_boto_error(client_error(status, code))


TRANSIENT = {
    "connection refused": lambda: ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
    "connection reset": lambda: ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    "socket timeout": lambda: TimeoutError("timed out"),
    "botocore endpoint unreachable": lambda: __import__("botocore.exceptions").exceptions.EndpointConnectionError(endpoint_url="http://s3"),
    "botocore read timeout": lambda: __import__("botocore.exceptions").exceptions.ReadTimeoutError(endpoint_url="http://s3"),
    "HTTP 500 InternalError (via s3fs)": lambda: s3fs_translated(500, "InternalError"),
    "HTTP 503 SlowDown (via s3fs)": lambda: s3fs_translated(503, "SlowDown"),
    "HTTP 503 ServiceUnavailable": lambda: client_error(503, "ServiceUnavailable"),
    "HTTP 429 throttling": lambda: client_error(429, "Throttling"),
}
PERMANENT = {
    "HTTP 403 AccessDenied (via s3fs)": lambda: s3fs_translated(403, "AccessDenied"),
    "HTTP 403 InvalidAccessKeyId": lambda: client_error(403, "InvalidAccessKeyId"),
    "HTTP 404 NoSuchKey (via s3fs)": lambda: s3fs_translated(404, "NoSuchKey"),
    "HTTP 404 NoSuchBucket": lambda: client_error(404, "NoSuchBucket"),
    "HTTP 400 InvalidArgument": lambda: client_error(400, "InvalidArgument"),
    "local file missing": lambda: FileNotFoundError(errno.ENOENT, "No such file"),
    "local disk full": lambda: OSError(errno.ENOSPC, "No space left on device"),
    "bad value": lambda: ValueError("not a Parquet file"),
}


@pytest.mark.parametrize("name", sorted(TRANSIENT))
def test_transient_errors_are_retried_until_they_clear(name, monkeypatch, capsys, record_fault):
    sleeps: list[float] = []
    monkeypatch.setattr(storage.time, "sleep", sleeps.append)
    storage.configure(attempts=5, base_delay_s=0.5, max_delay_s=60)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise TRANSIENT[name]()
        return "data"

    assert storage.with_retries("read", "s3://bucket/run/x.parquet", flaky) == "data"
    assert len(calls) == 3 and len(sleeps) == 2
    assert 0.375 <= sleeps[0] <= 0.5 and 0.75 <= sleeps[1] <= 1.0  # exponential backoff (with jitter)
    logged = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[storage]")]
    assert len(logged) == 2 and all("read s3://bucket/run/x.parquet" in line for line in logged)
    assert "retry 1/4" in logged[0] and "retry 2/4" in logged[1]
    record_fault("storage", f"{name} twice on a read", "retried with backoff (0.5 s, 1 s), each retry logged with op and URI; read succeeded")


@pytest.mark.parametrize("name", sorted(PERMANENT))
def test_permanent_errors_fail_at_once(name, monkeypatch, capsys, record_fault):
    monkeypatch.setattr(storage.time, "sleep", lambda s: pytest.fail("slept before a permanent error"))
    error = PERMANENT[name]()
    calls = []

    def broken():
        calls.append(1)
        raise error

    with pytest.raises(type(error)) as info:
        storage.with_retries("write", "s3://bucket/run/x.parquet", broken)
    assert info.value is error and len(calls) == 1
    assert "[storage]" not in capsys.readouterr().out
    record_fault("storage", name, f"not retried: {type(error).__name__} raised on the first try")


def test_retries_stop_at_the_attempt_bound_and_the_delay_bound(monkeypatch, record_fault):
    sleeps: list[float] = []
    monkeypatch.setattr(storage.time, "sleep", sleeps.append)

    def down():
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    storage.configure(attempts=4, base_delay_s=0.5, max_delay_s=60)
    with pytest.raises(storage.StorageError) as info:
        storage.with_retries("write", "s3://bucket/run/x.parquet", down)
    assert len(sleeps) == 3 and "failed after 4 attempts" in str(info.value)
    assert isinstance(info.value.__cause__, ConnectionRefusedError)

    sleeps.clear()
    storage.configure(attempts=100, base_delay_s=1.0, max_delay_s=10.0)
    with pytest.raises(storage.StorageError) as info:
        storage.with_retries("write", "s3://bucket/run/x.parquet", down)
    assert sum(sleeps) <= 10.0 + 1e-9 and len(sleeps) < 10  # 1 + 2 + 4 + (the rest of the 10 s budget)
    message = str(info.value)
    assert message.startswith("storage: write s3://bucket/run/x.parquet failed after") and "\n" not in message
    record_fault("storage", "endpoint refusing connections for good (attempts=4; then attempts=100 with max_delay_s=10)",
                 "gave up after 4 attempts / within 10 s of backoff with one line: storage: write <uri> failed after N attempts")


def test_retry_logs_and_errors_carry_no_credentials(monkeypatch, capsys, record_fault):
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    storage.configure(attempts=2, base_delay_s=0.1, max_delay_s=1)
    uri = "s3://AKIAFAKEUSERINFO:s3cr3t-in-url@bucket/data.jsonl?X-Amz-Credential=AKIAFAKEQUERY&X-Amz-Signature=deadbeef&part=1"

    def down():
        raise ConnectionResetError(errno.ECONNRESET, "reset")

    with pytest.raises(storage.StorageError) as info:
        storage.with_retries("read", uri, down)
    text = capsys.readouterr().out + str(info.value)
    for secret in ("AKIAFAKEUSERINFO", "s3cr3t-in-url", "AKIAFAKEQUERY", "deadbeef"):
        assert secret not in text
    assert "s3://***@bucket/data.jsonl?X-Amz-Credential=***&X-Amz-Signature=***&part=1" in text
    record_fault("secrets", "credentials in a data URI (user:password@, signed query) while storage fails",
                 "retry log lines and the final error show the URI with *** in their place")


def test_a_local_write_that_fails_midway_leaves_no_file(tmp_path, monkeypatch, record_fault):
    target = tmp_path / "stage" / "samples.parquet"
    storage.write_bytes(str(target), b"old complete file")

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "replace", disk_full)
    with pytest.raises(storage.DiskFull, match=f"no space left on device writing 25 bytes to {target}"):
        storage.write_bytes(str(target), b"new file that never lands")
    assert target.read_bytes() == b"old complete file"
    assert [p.name for p in target.parent.iterdir()] == ["samples.parquet"]  # no temp file left behind
    record_fault("storage", "disk full while publishing a local file (rename fails)",
                 "one line (DiskFull: no space left on device writing <bytes> to <path>, MiB free); the previous complete "
                 "file stays; no partial or temp file left; not retried")


def test_a_missing_object_on_a_live_endpoint_is_not_retried(durable_s3, capsys):
    storage.configure(attempts=5, base_delay_s=0.5, max_delay_s=60)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("s3://apo-faults/nothing/here.parquet")
    assert storage.exists("s3://apo-faults/nothing/here.parquet") is False
    assert "[storage]" not in capsys.readouterr().out


# -- the endpoint killed during a stage ---------------------------------------------------------

def _kill_endpoint_on_first_write_under(monkeypatch, server, folder: str, restart_after: float | None):
    """Kill the S3 server just before the first write into `folder` (so that write meets the
    outage), and start it again `restart_after` seconds later (None: leave it down)."""
    real_write = storage.write_bytes
    fired = threading.Event()
    restarter: list[threading.Thread] = []

    def write_bytes(uri: str, data: bytes) -> None:
        if f"/{folder}/" in uri and not fired.is_set():
            fired.set()
            server.stop()
            if restart_after is not None:
                timer = threading.Timer(restart_after, server.start)
                timer.start()
                restarter.append(timer)
        real_write(uri, data)

    monkeypatch.setattr(storage, "write_bytes", write_bytes)
    return fired, restarter


def _s3_config(tmp_path, model_dir, run_id: str, **storage_policy):
    policy = {f"storage.{k}": v for k, v in storage_policy.items()}
    return tiny_config("s3://apo-faults/runs", model_dir, **{
        "run_id": run_id, "train.steps": 2, "data.train_size": 16, "data.test_size": 8,
        "tracking.mlflow_tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", **policy})


def test_short_outage_during_a_stage_is_ridden_out(prefect_api, durable_s3, tiny_model_dir, tmp_path, monkeypatch,
                                                   record_fault):
    # no capsys here: Prefect's console log handler would keep its (then closed) stream
    from flows.apo import apo

    cfg = _s3_config(tmp_path, tiny_model_dir, "outage-short", attempts=12, base_delay_s=0.25, max_delay_s=60)
    fired, restarter = _kill_endpoint_on_first_write_under(monkeypatch, durable_s3, "sample_reference", restart_after=1.0)
    summary, flow_run_id = run_flow(apo, config=cfg)
    assert fired.is_set()
    restarter[0].join()
    out = "\n".join(prefect_run_logs(flow_run_id))
    retries = [line for line in out.splitlines() if line.startswith("[storage] write s3://apo-faults/runs/outage-short/sample_reference/")]
    assert retries, "the outage was not met by a retried write"
    assert "apo-faults-secret" not in out and "apo-faults-key" not in out
    assert summary["stages_recomputed"] == ["preprocess", "sample_reference", "aggregate_vstar", "train_online", "evaluate"]
    samples = storage.read_parquet("s3://apo-faults/runs/outage-short/sample_reference/samples.parquet")
    assert samples.height == 16 * 2
    for stage, uri in summary["artifacts"].items():  # every published stage matches its manifest
        marker = storage.read_json(storage.join(uri, "_COMPLETE.json"))
        assert storage.manifest_mismatch(uri, marker["manifest"]) is None, stage
    record_fault("storage", "S3 endpoint (moto server process) SIGKILLed at the first write of sample_reference, back after ~1 s + restart",
                 f"the write was retried {len(retries)} times with backoff, then the stage and the run completed; every manifest matches")


def test_long_outage_fails_the_stage_cleanly_and_a_rerun_resumes(prefect_api, durable_s3, tiny_model_dir, tmp_path,
                                                                 monkeypatch, record_fault):
    from flows.apo import apo

    cfg = _s3_config(tmp_path, tiny_model_dir, "outage-long", attempts=3, base_delay_s=0.2, max_delay_s=1)
    run = "s3://apo-faults/runs/outage-long"
    fired, _ = _kill_endpoint_on_first_write_under(monkeypatch, durable_s3, "sample_reference", restart_after=None)
    error, flow_run_id = run_flow(apo, config=cfg)
    assert fired.is_set() and isinstance(error, storage.StorageError), error
    message = str(error)
    assert "\n" not in message and message.startswith(f"storage: write {run}/sample_reference/")
    assert "failed after 3 attempts" in message and "apo-faults-secret" not in message
    logs = prefect_run_logs(flow_run_id)
    assert sum(line.startswith(f"[storage] write {run}/sample_reference/") for line in logs) == 2  # 2 retries, then gave up

    monkeypatch.undo()  # the real write_bytes again; the environment is re-set below
    for key, value in {"AWS_ACCESS_KEY_ID": "apo-faults-key", "AWS_SECRET_ACCESS_KEY": "apo-faults-secret",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": durable_s3.endpoint, "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(key, value)
    durable_s3.start()  # the endpoint comes back, with every object it held
    prep_marker = storage.read_json(f"{run}/preprocess/_COMPLETE.json")
    assert storage.manifest_mismatch(f"{run}/preprocess", prep_marker["manifest"]) is None  # earlier output intact
    assert not storage.exists(f"{run}/sample_reference/_COMPLETE.json")  # nothing published by the stage that gave up
    assert not storage.exists(f"{run}/sample_reference/samples.parquet")
    assert not storage.exists(f"{run}/aggregate_vstar")

    summary = apo(config=cfg)  # same run id: resumes
    assert summary["stage_status"]["preprocess"] == "skipped"
    assert summary["stages_recomputed"] == ["sample_reference", "aggregate_vstar", "train_online", "evaluate"]
    assert storage.read_json(f"{run}/preprocess/_COMPLETE.json") == prep_marker
    assert storage.read_parquet(f"{run}/sample_reference/samples.parquet").height == 16 * 2
    assert storage.exists(f"{run}/evaluate/_COMPLETE.json")
    record_fault("storage", "S3 endpoint SIGKILLed at the first write of sample_reference and kept down (policy: 3 attempts, 1 s)",
                 "stage failed with one line (storage: write <uri> failed after 3 attempts ...), no marker or samples published, "
                 "preprocess output unchanged; the rerun with the same run id skipped preprocess and completed")


def test_a_folder_rewritten_under_the_same_uri_is_downloaded_again(s3_endpoint, tmp_path, monkeypatch, record_fault):
    import s3fs

    monkeypatch.setenv("APO_CACHE_DIR", str(tmp_path / "cache"))
    fs = s3fs.S3FileSystem()
    uri = "s3://apo-test/rewritten/model"
    fs.pipe({"apo-test/rewritten/model/config.json": b'{"v": 1}', "apo-test/rewritten/model/weights.bin": b"old weights"})
    first = storage.localize_dir(uri)
    assert (first / "weights.bin").read_bytes() == b"old weights"
    assert storage.localize_dir(uri) == first  # unchanged content: the cached copy
    fs.pipe({"apo-test/rewritten/model/weights.bin": b"new weights, same path"})
    fs.invalidate_cache()
    second = storage.localize_dir(uri)
    assert second != first and (second / "weights.bin").read_bytes() == b"new weights, same path"
    assert not first.exists()  # the copy of the old content is gone
    record_fault("storage", "a model folder on S3 rewritten under the same URI after a run had downloaded it",
                 "the cache key (each file's path, size and ETag from the listing) changed, so the folder was "
                 "downloaded again instead of served stale; the copy of the old content was removed")
