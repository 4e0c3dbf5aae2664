"""`apo run` as users start it: the console script, its own local Prefect API, and its exit."""

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

APO = Path(sys.executable).parent / "apo"  # the console script `make run` calls
SERVER_APP = "prefect.server.api.server:create_app"


def tiny_run_args(root, model_dir, run_id="cli"):
    sets = {"artifact_root": root, "model.path": model_dir, "data.train_size": 8, "data.test_size": 4,
            "reference.n_samples": 2, "reference.max_new_tokens": 8, "train.max_new_tokens": 8, "eval.max_new_tokens": 8,
            "train.steps": 1, "train.rollout_batch_size": 4, "train.minibatch_size": 4, "eval.evaluate_reference": False}
    return ["run", "--run-id", run_id, *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]


def fresh_env(home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db", **extra}


def api_servers_of(home: Path) -> list[int]:
    """pids of Prefect API server processes whose PREFECT_HOME is `home`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if SERVER_APP in (proc / "cmdline").read_bytes().decode(errors="replace") and \
                    f"PREFECT_HOME={home}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return pids


def gone_within(home: Path, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while api_servers_of(home):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_apo_run_starts_its_own_api_and_leaves_nothing_running(tiny_model_dir, tmp_path):
    home = tmp_path / "prefect"
    out = subprocess.run([str(APO), *tiny_run_args(tmp_path / "art", tiny_model_dir)], env=fresh_env(home),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "A*-PO run cli" in out.stdout and "held-out greedy accuracy" in out.stdout
    # the flow ran against the server this command started on PREFECT_HOME's database
    with sqlite3.connect(home / "prefect.db") as db:
        assert db.execute("select state_type from flow_run").fetchall() == [("COMPLETED",)]
    assert gone_within(home, 15), "the local Prefect API server outlived `apo run`"


def test_a_bad_config_fails_in_one_line_before_starting_anything(tmp_path):
    home = tmp_path / "prefect"
    out = subprocess.run([str(APO), "run", "--set", "train.lr=-1"], env=fresh_env(home), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("apo: ") and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (home / "prefect.db").exists() and not api_servers_of(home)


def test_a_configured_api_is_used_and_none_is_started(prefect_api, tiny_model_dir, tmp_path):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    home = tmp_path / "prefect"
    env = fresh_env(home, PREFECT_API_URL=PREFECT_API_URL.value())
    proc = subprocess.Popen([str(APO), *tiny_run_args(tmp_path / "art", tiny_model_dir, run_id="configured")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen_local = False
    while proc.poll() is None:
        seen_local |= bool(api_servers_of(home))
        time.sleep(0.5)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    assert not seen_local and not (home / "prefect.db").exists()

    async def completed_runs():
        async with get_client() as client:
            return [r for r in await client.read_flow_runs() if r.state and r.state.is_completed()]

    names = {r.name for r in asyncio.run(completed_runs())}
    assert any(f"Flow run '{name}'" in stderr + stdout for name in names)
