"""Deterministic fail points: `failpoint(name)` SIGKILLs this process when the environment
variable APO_FAILPOINTS names that point, so the fault suite (tests/faults/) can kill a real
pipeline run at an exact place and check that a resume loses nothing.

    APO_FAILPOINTS=sample_reference.mid_shard:2 apo run ...    # killed in shard 2 of stage 1

`name:N` fires at the N-th time the point is reached in this process (default 1); `name:N:term`
sends SIGTERM instead and carries on (an eviction: the process must stop by itself); several
points are separated by commas. Without the variable a fail point costs one dict lookup.

Points (each one line in the stage code):
  <stage>.before_marker               the stage's outputs written, its _COMPLETE.json not yet (tasks/stage.py)
  <stage>.after_marker                the stage's marker written: between two stages (tasks/stage.py)
  sample_reference.mid_shard          a shard's samples drawn and scored, its part not yet written
  sample_reference.after_shard        a shard's part written, the next shard not started
  train_online.after_step             a rollout step done (weights updated), its checkpoint (if any) not yet
  train_online.checkpoint_unpublished a checkpoint written under its temporary name, not yet renamed
  train_online.after_checkpoint       a checkpoint published
  evaluate.after_model                one model evaluated (the reference first), the next not yet
  run.before_summary                  every stage complete, summary.json not yet written
with <stage> one of preprocess, sample_reference, aggregate_vstar, train_online, evaluate.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "APO_FAILPOINTS"


def _armed(spec: str) -> dict[str, tuple[int, signal.Signals]]:
    points: dict[str, tuple[int, signal.Signals]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, rest = item.partition(":")
        nth, _, how = rest.partition(":")
        points[name] = (int(nth) if nth else 1, signal.SIGTERM if how == "term" else signal.SIGKILL)
    return points


_ARMED = _armed(os.environ.get(ENV, ""))
_hits: Counter[str] = Counter()


def failpoint(name: str) -> None:
    """SIGKILL (or SIGTERM) this process if APO_FAILPOINTS arms `name` and this is its armed hit."""
    if name not in _ARMED:
        return
    _hits[name] += 1
    nth, sig = _ARMED[name]
    if _hits[name] == nth:
        print(f"[faults] fail point {name} (hit {_hits[name]}): {sig.name} pid {os.getpid()}", flush=True)
        os.kill(os.getpid(), sig)
