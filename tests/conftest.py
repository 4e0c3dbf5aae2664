"""Shared fixtures: an isolated Prefect home, a tiny random Qwen2 with the project's byte
tokenizer (for mechanics), and the committed embedded reference model (for learning)."""

import os
import tempfile

# Prefect reads settings at import: isolate it before any test module imports it.
_PREFECT_HOME = tempfile.mkdtemp(prefix="apo-prefect-home-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_API_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{_PREFECT_HOME}/prefect.db")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("APO_CACHE_DIR", os.path.join(_PREFECT_HOME, "apo-cache"))

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers.servers import free_port, stop_group, wait_for_http  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer Qwen2 (head_dim 32) with the byte tokenizer, saved like a real checkpoint."""
    from apo_core.modeling import save_random_qwen2
    from apo_core.tokenizer import build_byte_tokenizer

    path = tmp_path_factory.mktemp("tiny-model")
    save_random_qwen2(path, dict(vocab_size=264, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=1, intermediate_size=128, max_position_embeddings=256),
                      build_byte_tokenizer())
    return path


@pytest.fixture(scope="session")
def prefect_api():
    """One Prefect API (temporary local server) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def shared_data():
    """The workplace's reference data: `shared/data` beside the checkout, or $APO_SHARED_DATA.
    Missing data fails the test (it is part of what CI provides), it never skips it."""
    from pathlib import Path

    candidates = [os.environ.get("APO_SHARED_DATA"), Path(__file__).resolve().parents[2] / "shared" / "data"]
    for path in candidates:
        if path and (Path(path) / "gsm8k" / "test.jsonl").exists():
            return Path(path)
    pytest.fail(f"shared data not found at {candidates[1]} (set APO_SHARED_DATA to its folder)")


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API on loopback (moto's server, in its own process as a real endpoint would be:
    in-process it would import Flask, whose context proxies break vLLM's start-up) with a bucket
    `apo-test`; credentials and the endpoint reach s3fs through the environment only."""
    import subprocess
    import sys

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"

    def failed(reason: str) -> None:
        server.kill()
        pytest.fail(f"moto S3 server did not start on {endpoint}: {reason}")

    wait_for_http(f"{endpoint}/moto-api/", server, 60, failed)
    env = {"AWS_ACCESS_KEY_ID": "apo-test-key", "AWS_SECRET_ACCESS_KEY": "apo-test-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("apo-test")
    yield endpoint
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="session")
def mlflow_server(s3_endpoint, tmp_path_factory):
    """A real MLflow tracking server over HTTP on loopback: runs and the model registry in SQLite,
    artifacts in the S3 bucket under s3://apo-test/mlflow. `--no-serve-artifacts`: the server
    hands out s3:// artifact locations and clients (tests, pipeline stages) write to the bucket
    themselves, so both the server and this process get MLFLOW_S3_ENDPOINT_URL. Yields the URI."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    port = free_port()
    home = tmp_path_factory.mktemp("mlflow-server")
    # no job runner: it only serves MLflow's GenAI jobs and would add a dozen worker processes
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow_cli = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    log = open(home / "server.log", "wb")
    server = subprocess.Popen(
        [mlflow_cli, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{home}/mlflow.db",
         "--default-artifact-root", "s3://apo-test/mlflow", "--no-serve-artifacts"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=home, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"

    def failed(reason: str) -> None:
        server.kill()
        tail = (home / "server.log").read_text(errors="replace")[-2000:]
        pytest.fail(f"MLflow server did not start on {uri}: {reason}\n{tail}")

    wait_for_http(f"{uri}/health", server, 180, failed, poll=0.5)  # the first start migrates the SQLite schema (tens of s)
    saved = os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    os.environ["MLFLOW_S3_ENDPOINT_URL"] = s3_endpoint
    try:
        yield uri
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_S3_ENDPOINT_URL", None)
        else:
            os.environ["MLFLOW_S3_ENDPOINT_URL"] = saved
        stop_group(server)  # the server forks uvicorn workers
        log.close()


@pytest.fixture(scope="session")
def prefect_ui(tmp_path_factory):
    """A real Prefect server with its UI, on loopback (`prefect server start`, its own home and
    SQLite database), for tests that look at what the UI shows. Yields its base URL; the API is
    under `<url>/api`."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    port = free_port()
    home = tmp_path_factory.mktemp("prefect-ui")
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({
        "PREFECT_HOME": str(home / "home"), "PREFECT_UI_ENABLED": "true",
        # the UI's pages call this address; by default it is built from PREFECT_SERVER_API_PORT (4200), not --port
        "PREFECT_UI_API_URL": f"{url}/api",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # SQLite on a busy 2-core machine: wait for the write lock instead of answering 503
        "PREFECT_SERVER_DATABASE_TIMEOUT": "60", "PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT": "60",
    })
    prefect_cli = Path(sys.executable).parent / "prefect"
    log = open(home / "server.log", "wb")
    server = subprocess.Popen([str(prefect_cli), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, cwd=home, start_new_session=True)

    def failed(reason: str) -> None:
        os.killpg(server.pid, signal.SIGKILL)
        tail = (home / "server.log").read_text(errors="replace")[-2000:]
        pytest.fail(f"Prefect server did not start on {url}: {reason}\n{tail}")

    wait_for_http(f"{url}/api/health", server, 180, failed, poll=0.5)  # a new database is migrated first
    try:
        yield url
    finally:
        stop_group(server)  # uvicorn and the server's services are its children
        log.close()


@pytest.fixture(scope="session")
def served_run(prefect_ui, mlflow_server, tiny_model_dir):
    """The tiny pipeline once for the session, tracked on the `mlflow_server` fixture (artifacts and
    registry included) and orchestrated by the `prefect_ui` server, so both UIs can show it.
    Returns the flow's summary dict."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    from flows.apo import apo
    from tests.test_flow import tiny_config

    cfg = tiny_config("s3://apo-test/served", tiny_model_dir, **{
        "run_id": "served", "train.steps": 2, "tracking.mlflow_tracking_uri": mlflow_server,
        "registry.enabled": "true", "registry.model_name": "served-model"})
    with temporary_settings(updates={PREFECT_API_URL: f"{prefect_ui}/api", PREFECT_UI_URL: prefect_ui}):
        return apo(config=cfg)


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the session (tests/helpers/browser.py). The system's chromium and
    chromedriver are part of what CI provides: missing, they fail the test, never skip it."""
    from tests.helpers.browser import Browser, missing_programs

    missing = missing_programs()
    if missing:
        pytest.fail(f"{' and '.join(missing)} not on PATH: .ci/run installs them "
                    "(apt-get install chromium chromium-driver)", pytrace=False)
    session = Browser()
    try:
        yield session
    finally:
        session.close()
