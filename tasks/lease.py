"""One writer per run id: the run's lease in its artifact folder, and on a Prefect server a
concurrency limit named after the run id.

The lease is a numbered file, `<run>/_lease/<n>.json`, created with exclusive create (a hard link
of a complete temp file locally, a conditional PUT on S3), so of two processes that both see
lease n free exactly one creates n + 1; the same protocol holds for every worker and pod that
reaches the artifact root. The holder rewrites its own file to renew it (every ttl/4) and marks
it released at the end. Lease n is free when it is released, expired (its holder stopped
renewing: a remote holder that is gone), or held by a process that no longer exists on this
host (a crash: a resume right after it does not wait), or when `take_over` forces it; every
takeover is printed with the holder it displaced.

Stages fence their publication on it: `verify(ctx)` before a stage starts and before its
marker is written, so a displaced writer never publishes. Where the flow runs against a Prefect
API, a global concurrency limit `apo-run-<run id>` of one slot is created and taken strictly
with a lease of the same ttl (renewed together), then released and deleted; its lease id is
kept in the lease file, so a takeover frees the displaced holder's slot too.
"""

from __future__ import annotations

import contextvars
import datetime as _dt
import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager, suppress
from typing import Any, Iterator

import psutil

from . import storage

LEASE_DIR = "_lease"


class LeaseHeld(RuntimeError):
    """Another process holds the run id; the message names it (host, pid or flow run, since when)."""


class LeaseLost(RuntimeError):
    """This process's lease was taken over: it must not publish anything more."""


def _now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _number(uri: str) -> int | None:
    name = uri.rsplit("/", 1)[-1]
    stem = name.removesuffix(".json")
    return int(stem) if name.endswith(".json") and stem.isdigit() else None


def lease_dir(run_uri: str) -> str:
    return storage.join(run_uri, LEASE_DIR)


def newest(run_uri: str) -> tuple[int, dict | None, str | None]:
    """(number, record, uri) of the newest lease file of the run; (0, None, None) when none."""
    numbered = sorted((n, u) for u in storage.listing(lease_dir(run_uri)) if (n := _number(u)) is not None)
    if not numbered:
        return 0, None, None
    n, uri = numbered[-1]
    try:
        return n, storage.read_json(uri), uri
    except FileNotFoundError:  # removed between the listing and the read: a newer one exists
        return newest(run_uri)


def describe(record: dict) -> str:
    """The holder in words: host, pid, flow run, since when."""
    who = f"pid {record.get('pid')} on host {record.get('host')}"
    if record.get("flow_run_id"):
        who += f" (Prefect flow run {record['flow_run_id']})"
    return f"{who}, since {_iso(record.get('since', 0))}, lease renewed {_iso(record.get('renewed', 0))}"


def _process_gone(record: dict) -> bool:
    """True when the holder ran on this host and its process (pid and start time) is gone."""
    if record.get("host") != socket.gethostname():
        return False
    try:
        proc = psutil.Process(int(record.get("pid", -1)))
        return abs(proc.create_time() - float(record.get("pid_started", 0))) > 1.0
    except (psutil.NoSuchProcess, ValueError):
        return True


def _left_by_this_process(record: dict) -> bool:
    """True for a lease of this very process that it no longer holds (an earlier flow run in it
    could not mark it released, e.g. while storage was down)."""
    mine = record.get("host") == socket.gethostname() and record.get("pid") == os.getpid()
    return mine and record.get("token") not in _live


def free_because(record: dict | None, take_over: bool) -> str | None:
    """Why lease `record` may be taken ("" when it is simply free), None when it is held."""
    if record is None or record.get("released"):
        return ""
    if _process_gone(record):
        return f"its holder, {describe(record)}, is gone"
    if _left_by_this_process(record):
        return f"it was left unreleased by an earlier run in this process ({describe(record)})"
    if record.get("expires", 0) < _now():
        return f"the lease of {describe(record)} expired at {_iso(record['expires'])}"
    if take_over:
        return f"forced (take_over) from {describe(record)}"
    return None


def held_by(run_id: str, record: dict) -> LeaseHeld:
    return LeaseHeld(f"run {run_id} is being written by {describe(record)}; wait for it, or pass --take-over if it is stuck")


def check_free(run_uri: str, run_id: str, take_over: bool = False) -> None:
    """Raise LeaseHeld when the run's lease is held now (a look, taking nothing: `apo run` asks
    before it starts a flow run at all; the flow then takes the lease for real)."""
    _, record, _ = newest(run_uri)
    if free_because(record, take_over) is None:
        raise held_by(run_id, record)


class PrefectSlot:
    """The run id's global concurrency limit on the Prefect server: one slot, held with a lease."""

    def __init__(self, run_id: str, ttl_s: float, flow_run_id: str | None):
        self.name = f"apo-run-{run_id}"
        self.ttl_s = max(ttl_s, 60.0)  # the shortest lease Prefect's server grants
        self.flow_run_id = flow_run_id
        self.lease_id: str | None = None

    def take(self, displaced_lease_id: str | None) -> None:
        import httpx
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
        from prefect.client.schemas.objects import ConcurrencyLeaseHolder
        from prefect.exceptions import ObjectAlreadyExists

        with get_client(sync_client=True) as client:
            with suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=self.name, limit=1))
            if displaced_lease_id:
                self._release(client, displaced_lease_id)
            holder = ConcurrencyLeaseHolder(type="flow_run", id=self.flow_run_id) if self.flow_run_id else None
            try:
                response = client.increment_concurrency_slots_with_lease(
                    names=[self.name], slots=1, mode="concurrency", lease_duration=self.ttl_s, holder=holder)
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code == 423:
                    raise LeaseHeld(f"run id taken: Prefect concurrency limit {self.name!r} is held by another "
                                    "flow run (pass take_over to force it)") from None
                raise
            self.lease_id = str(response.json()["lease_id"])

    @staticmethod
    def _release(client, lease_id: str) -> None:
        import httpx
        from prefect.exceptions import ObjectNotFound

        try:
            client.release_concurrency_slots_with_lease(uuid.UUID(lease_id))
        except ObjectNotFound:  # expired and revoked already
            pass
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 404:
                raise

    def renew(self) -> None:
        from prefect.client.orchestration import get_client

        if self.lease_id:
            with get_client(sync_client=True) as client:
                client.renew_concurrency_lease(uuid.UUID(self.lease_id), lease_duration=self.ttl_s)

    def release(self) -> None:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        with get_client(sync_client=True) as client:
            if self.lease_id:
                self._release(client, self.lease_id)
            with suppress(ObjectNotFound):
                client.delete_global_concurrency_limit_by_name(self.name)


class RunLease:
    """The lease of one run id, held by this process from `acquire` until `release`."""

    def __init__(self, run_uri: str, run_id: str, ttl_s: float = 120.0, take_over: bool = False,
                 flow_run_id: str | None = None, prefect: bool = False):
        self.run_uri, self.run_id, self.ttl_s, self.take_over = run_uri, run_id, ttl_s, take_over
        self.flow_run_id = flow_run_id
        self.slot = PrefectSlot(run_id, ttl_s, flow_run_id) if prefect else None
        self.number = 0
        self.record: dict[str, Any] = {}
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def uri(self) -> str:
        return storage.join(lease_dir(self.run_uri), f"{self.number:06d}.json")

    def _fresh_record(self) -> dict[str, Any]:
        now = _now()
        return {"run_id": self.run_id, "token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                "pid_started": psutil.Process(os.getpid()).create_time(), "flow_run_id": self.flow_run_id,
                "since": now, "renewed": now, "expires": now + self.ttl_s, "ttl_s": self.ttl_s, "released": False}

    def acquire(self) -> "RunLease":
        number, record, _ = newest(self.run_uri)
        why = free_because(record, self.take_over)
        if why is None:
            raise held_by(self.run_id, record)
        if self.slot is not None:
            self.slot.take((record or {}).get("prefect_lease_id") if why else None)
        self.record = {**self._fresh_record(), "prefect_lease_id": self.slot.lease_id if self.slot else None}
        self.number = number + 1
        if not storage.create_bytes(self.uri, json.dumps(self.record).encode()):
            if self.slot is not None:
                self.slot.release()
            _, other, _ = newest(self.run_uri)
            raise LeaseHeld(f"run {self.run_id} was just taken by {describe(other or {})}")
        _live.add(self.record["token"])
        if why:
            print(f"[lease] took over run {self.run_id}: {why}")
        for n, uri in ((_number(u), u) for u in storage.listing(lease_dir(self.run_uri))):
            if n is not None and n < self.number:
                storage.remove(uri)  # superseded
        # the renewals run in the caller's context: a Prefect API set for this run by temporary
        # settings (`apo run`'s local server) is a context variable, which a new thread would not see
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._renew_loop,),
                                        name="apo-lease", daemon=True)
        self._thread.start()
        return self

    def verify(self) -> None:
        """Raise LeaseLost when a newer lease than ours exists (we were taken over)."""
        number, record, _ = newest(self.run_uri)
        if number != self.number or (record or {}).get("token") != self.record.get("token"):
            self.lost = f"lease of run {self.run_id} taken over by {describe(record or {})}"
        if self.lost:
            raise LeaseLost(self.lost)

    def renew(self) -> None:
        self.verify()
        now = _now()
        self.record.update(renewed=now, expires=now + self.ttl_s)
        storage.write_json(self.record, self.uri)
        if self.slot is not None:
            self.slot.renew()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.renew()
            except LeaseLost as exc:
                print(f"[lease] {exc}: this process publishes nothing more")
                return
            except Exception as exc:  # storage or API trouble: keep trying until the lease expires
                print(f"[lease] renewing the lease of run {self.run_id} failed: {type(exc).__name__}: {exc}"[:300])

    def release(self) -> None:
        """Stop renewing and mark the lease released; a displaced holder leaves everything to the new one."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        _live.discard(self.record.get("token"))
        if self.slot is not None and self.lost is None:
            try:
                self.slot.release()
            except Exception as exc:  # the slot's own lease expires with the ttl
                print(f"[lease] releasing Prefect limit {self.slot.name} failed: {type(exc).__name__}: {exc}"[:300])
        if self.lost is None and self.number:
            try:
                number, record, _ = newest(self.run_uri)
                if number == self.number and (record or {}).get("token") == self.record.get("token"):
                    storage.write_json({**self.record, "released": True, "released_at": _now()}, self.uri)
            except Exception as exc:  # e.g. a full disk: this process's end frees the lease anyway (takeover)
                print(f"[lease] could not mark the lease of run {self.run_id} released: {type(exc).__name__}: {exc}"[:300])


_held: dict[str, RunLease] = {}  # run URI -> the lease this process holds on it (through `hold`)
_live: set[str] = set()  # tokens of every lease this process holds, until it releases them


@contextmanager
def hold(run_uri: str, run_id: str, ttl_s: float, take_over: bool = False) -> Iterator[RunLease]:
    """Hold the run's lease around a block (the whole pipeline run)."""
    from prefect.runtime import flow_run

    flow_run_id = str(flow_run.id) if flow_run.id else None
    lease = RunLease(run_uri, run_id, ttl_s, take_over, flow_run_id, prefect=flow_run_id is not None).acquire()
    _held[run_uri] = lease
    try:
        yield lease
    finally:
        _held.pop(run_uri, None)
        lease.release()


def verify(run_uri: str, token: str | None) -> None:
    """Raise LeaseLost unless the run's newest lease is the one with `token` (no token: no lease
    to check, e.g. a stage run by hand). In the holder's process its own record decides."""
    if token is None:
        return
    lease = _held.get(run_uri)
    if lease is not None and lease.record.get("token") == token:
        lease.verify()
        return
    _, record, _ = newest(run_uri)
    if record is None or record.get("token") != token or record.get("released"):
        raise LeaseLost(f"lease of {storage.redact(run_uri)} is no longer this run's: "
                        f"{describe(record) if record else 'no lease'}")
