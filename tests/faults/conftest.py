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
CATEGORIES = ("kill", "storage", "bad-input", "secrets", "corruption")

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
