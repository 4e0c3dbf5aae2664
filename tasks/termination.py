"""SIGTERM (an eviction, a spot preemption, `kubectl delete pod`) during training: stop between two
steps, with a checkpoint of the last step when it can be written within train.grace_s.

Everywhere else a SIGTERM is Prefect's: its flow engine turns it into TerminationSignal, which
ends the stage's and the pipeline's MLflow runs KILLED (tasks/run.py pipeline_run) and the
process with the signal. Inside `deferred()` the first SIGTERM only records its time; the
trainer polls it after every step (apo_core.trainer StopRequested) and the stage then ends the
same way, as Preempted (then an ordinary error: the stop itself is over). A second SIGTERM inside the block goes to the handler that was there
before: stop at once.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from prefect.exceptions import TerminationSignal


class Preempted(RuntimeError):
    """Training stopped for a SIGTERM at a step boundary; the message says what was checkpointed.
    An ordinary error once the stop is done: the flow run ends Failed with it, the MLflow runs
    KILLED (tracking.stopped_from_outside), `apo run` exits 1 (resumable) with it as its last line."""


@contextmanager
def deferred() -> Iterator[Callable[[], float | None]]:
    """Yield a function: seconds since the first SIGTERM inside the block, None before one. Outside
    the main thread (signals cannot be caught there) it always says None."""
    received: list[float] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        if received and callable(previous):
            previous(signum, frame)  # the second one: stop now
        elif received:
            raise TerminationSignal(signum)
        received.append(time.monotonic())
        print("[train_online] SIGTERM: stopping after the step in progress (train.grace_s)", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield lambda: time.monotonic() - received[0] if received else None
    finally:
        signal.signal(signal.SIGTERM, previous)
