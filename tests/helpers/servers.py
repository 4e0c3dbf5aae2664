"""Loopback servers the test fixtures start: a free port, and waiting until one answers."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from typing import Callable


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, timeout: float, on_failure: Callable[[str], None],
                  poll: float = 0.2) -> None:
    """Return once `url` answers; call `on_failure(reason)` (which must raise, e.g. pytest.fail)
    if `proc` exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if proc.poll() is not None:
                on_failure(f"the server exited with status {proc.returncode} before {url} answered")
            if time.monotonic() > deadline:
                on_failure(f"{url} did not answer within {timeout:.0f} s")
            time.sleep(poll)


def stop_group(proc: subprocess.Popen, grace: float = 30) -> None:
    """End a server started with start_new_session=True and every process it forked (uvicorn
    workers, services): SIGTERM to its group, SIGKILL after `grace` seconds."""
    import os
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)
