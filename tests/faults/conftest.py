"""The fault suite's shared record: each case says what fault it injected and what the pipeline
did; `docs/reliability.md` is rendered from those records (tests/faults/report.py).

`record_fault(category, fault, outcome)` queues one row; the rows reach
`tests/faults/.results/results.jsonl` (with the test's nodeid and passed=True) only when the test
passes, so the document never lists a fault whose test failed. The file is truncated once per
pytest session; when every collected test of the whole fault suite passed, the session's end
regenerates the document.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FAULTS_DIR = Path(__file__).resolve().parent
RESULTS = FAULTS_DIR / ".results" / "results.jsonl"
CATEGORIES = ("kill", "concurrency", "stop", "disk", "storage", "bad-input", "secrets", "corruption")

_state = {"truncated": False, "outcomes": {}}


def _append(rows: list[dict]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    mode = "a" if _state["truncated"] else "w"
    _state["truncated"] = True
    with open(RESULTS, mode) as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"_fault_report_{report.when}", report)


@pytest.fixture
def record_fault(request):
    """record(category, fault, outcome): one row of docs/reliability.md, kept if the test passes."""
    rows: list[dict] = []

    def record(category: str, fault: str, outcome: str) -> None:
        if category not in CATEGORIES:
            raise ValueError(f"record_fault: category {category!r} unknown; valid: {', '.join(CATEGORIES)}")
        rows.append({"category": category, "fault": fault, "outcome": outcome, "test": request.node.nodeid})

    yield record
    call = getattr(request.node, "_fault_report_call", None)
    if rows and call is not None and call.passed:
        _append([{**row, "passed": True} for row in rows])


def pytest_runtest_logreport(report):
    # a test counts as passed when its setup, call and teardown all passed (a skip is not a pass)
    _state["outcomes"][report.nodeid] = _state["outcomes"].get(report.nodeid, True) and report.passed


def pytest_sessionfinish(session, exitstatus):
    """Regenerate docs/reliability.md when the whole fault suite ran and passed."""
    items = [i for i in session.items if Path(str(i.fspath)).resolve().is_relative_to(FAULTS_DIR)]
    modules = {Path(str(i.fspath)).resolve() for i in items}
    every_module = set(FAULTS_DIR.glob("test_*.py")) <= modules
    all_passed = items and all(_state["outcomes"].get(i.nodeid) for i in items)
    if every_module and all_passed and not session.config.option.keyword and not session.config.option.markexpr:
        from tests.faults.report import render

        render()


# A moto S3 server that survives being killed: it records every request it serves and, when
# restarted on the same port, replays them into its backend before it accepts connections
# (a real object store keeps its objects through an outage; moto alone would lose them).
_DURABLE_MOTO = r"""
import os, socket, sys
port, recording = int(sys.argv[1]), sys.argv[2]
os.environ["MOTO_ENABLE_RECORDING"] = "True"
os.environ["MOTO_RECORDER_FILEPATH"] = recording
from moto.moto_api import recorder
from moto.server import ThreadedMotoServer, main
if os.path.exists(recording) and os.path.getsize(recording):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        warm_port = sock.getsockname()[1]
    warm = ThreadedMotoServer(ip_address="127.0.0.1", port=warm_port, verbose=False)
    warm.start()
    recorder.replay_recording(target_host=f"http://127.0.0.1:{warm_port}")  # same process: same backend
    warm.stop()
main(["-H", "127.0.0.1", "-p", str(port)])
"""


class DurableS3:
    """A moto S3 endpoint on a fixed loopback port that a test can kill and restart."""

    def __init__(self, workdir: Path):
        from tests.helpers.servers import free_port

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.recording = workdir / "moto-recording.jsonl"
        self.log = workdir / "moto.log"
        self.process = None

    def start(self, timeout: float = 90.0) -> None:
        import subprocess
        import sys

        from tests.helpers.servers import wait_for_http

        with open(self.log, "a") as log:
            self.process = subprocess.Popen([sys.executable, "-c", _DURABLE_MOTO, str(self.port), str(self.recording)],
                                            stdout=log, stderr=subprocess.STDOUT)

        def failed(reason: str) -> None:
            self.stop()
            pytest.fail(f"moto S3 server did not start on {self.endpoint}: {reason}: {self.log.read_text()[-500:]}")

        wait_for_http(f"{self.endpoint}/moto-api/", self.process, timeout, failed, poll=0.1)

    def stop(self) -> None:
        """SIGKILL: the endpoint vanishes mid-request, as in a crash or a network cut."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self.process = None


@pytest.fixture
def durable_s3(tmp_path, monkeypatch):
    """A DurableS3 started with bucket `apo-faults`; its endpoint and test keys reach s3fs
    through the environment (botocore's own retries off, so apo's retry policy is what runs)."""
    import s3fs

    server = DurableS3(tmp_path)
    server.start()
    for key, value in {"AWS_ACCESS_KEY_ID": "apo-faults-key", "AWS_SECRET_ACCESS_KEY": "apo-faults-secret",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": server.endpoint,
                       "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("apo-faults")
    yield server
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()  # later tests get a client for their own endpoint


def prefect_run_logs(flow_run_id) -> list[str]:
    """Every log line the Prefect API holds for a flow run and its task runs (what the UI shows)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)  # logs are shipped in batches; send what is queued
    lines: list[str] = []
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200, offset=len(lines))
            lines += [log.message for log in page]
            if len(page) < 200:
                return lines


def run_flow(flow, **params):
    """(result or exception, flow run id) of one flow run under the test's Prefect API."""
    state = flow(**params, return_state=True)
    try:
        result = state.result()
    except Exception as exc:  # the run's failure, as the caller would see it
        result = exc
    return result, state.state_details.flow_run_id
