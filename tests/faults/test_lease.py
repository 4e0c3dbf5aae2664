"""The run lease (tasks/lease.py) on its own: one holder per run id on a local folder, on S3 and on
a Prefect server; takeovers of a crashed, an expired and a stuck holder; a displaced holder
publishes nothing. The pipeline-level cases (two `apo run` processes, two Prefect flow runs) are
in test_two_writers.py."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from tasks import lease, storage


def fake_holder(run_uri: str, number: int, **fields) -> dict:
    """Lease file `number` as another process wrote it (defaults: alive, this host, renewed now)."""
    import psutil

    now = time.time()
    record = {"run_id": "r", "token": f"other-{number}", "host": socket.gethostname(), "pid": psutil.Process().ppid(),
              "pid_started": psutil.Process(psutil.Process().ppid()).create_time(), "flow_run_id": None,
              "since": now - 60, "renewed": now, "expires": now + 120, "ttl_s": 120, "released": False, **fields}
    storage.write_json(record, storage.join(lease.lease_dir(run_uri), f"{number:06d}.json"))
    return record


def test_a_second_holder_is_refused_with_the_first_named(tmp_path, record_fault):
    run = str(tmp_path / "r")
    first = lease.RunLease(run, "r", ttl_s=30).acquire()
    with pytest.raises(lease.LeaseHeld) as refused:
        lease.RunLease(run, "r", ttl_s=30).acquire()
    message = str(refused.value)
    assert f"pid {first.record['pid']} on host {socket.gethostname()}" in message and "since" in message
    assert "\n" not in message and "--take-over" in message
    first.release()
    second = lease.RunLease(run, "r", ttl_s=30).acquire()  # a released lease is free at once
    assert second.number == 2 and [u.rsplit("/", 1)[-1] for u in storage.listing(lease.lease_dir(run))] == ["000002.json"]
    second.release()
    record_fault("concurrency", "a second holder for a run id while the first holds its lease",
                 f"refused in one line naming the holder ({message.split(';')[0].replace(str(tmp_path), '<root>')}); "
                 "after the first released it, the lease was free at once")


def test_a_crashed_holder_on_this_host_is_taken_over_at_once(tmp_path, capsys, record_fault):
    run = str(tmp_path / "r")
    gone = subprocess.run([sys.executable, "-c", "import os, psutil; p = psutil.Process(); print(p.pid, p.create_time())"],
                          capture_output=True, text=True, check=True).stdout.split()
    fake_holder(run, 4, pid=int(gone[0]), pid_started=float(gone[1]))
    taken = lease.RunLease(run, "r", ttl_s=30).acquire()
    assert taken.number == 5
    assert f"took over run r: its holder, pid {gone[0]} on host {socket.gethostname()}" in capsys.readouterr().out
    taken.release()
    record_fault("concurrency", "the lease holder was SIGKILLed (its process is gone, on the same host), lease not expired",
                 "the next process took the lease over at once and logged whom it displaced")


def test_a_remote_holder_is_waited_for_until_its_lease_expires(tmp_path, capsys, record_fault):
    run = str(tmp_path / "r")
    fake_holder(run, 1, host="gpu-node-7", pid=12345)
    with pytest.raises(lease.LeaseHeld, match="pid 12345 on host gpu-node-7"):
        lease.RunLease(run, "r", ttl_s=30).acquire()
    fake_holder(run, 1, host="gpu-node-7", pid=12345, expires=time.time() - 1)
    taken = lease.RunLease(run, "r", ttl_s=30).acquire()
    assert "lease of pid 12345 on host gpu-node-7" in capsys.readouterr().out and taken.number == 2
    taken.release()
    record_fault("concurrency", "the holder runs on another host (its process cannot be checked from here)",
                 "refused while its lease was renewed; taken over once it expired, the takeover logged")


def test_take_over_forces_a_live_holder_and_the_displaced_one_publishes_nothing(tmp_path, capsys, record_fault):
    run = str(tmp_path / "r")
    stuck = lease.RunLease(run, "r", ttl_s=30).acquire()
    forced = lease.RunLease(run, "r", ttl_s=30, take_over=True).acquire()
    assert "forced (take_over)" in capsys.readouterr().out
    with pytest.raises(lease.LeaseLost, match="taken over"):
        stuck.verify()
    with pytest.raises(lease.LeaseLost):
        lease.verify(run, stuck.record["token"])  # what run_stage asks before it starts and before its marker
    lease.verify(run, forced.record["token"])
    stuck.release()  # must not mark the new holder's lease released
    assert storage.read_json(forced.uri)["released"] is False
    forced.release()
    assert storage.read_json(forced.uri)["released"] is True
    record_fault("concurrency", "--take-over while a live (stuck) holder keeps renewing",
                 "the lease moved, the takeover was logged; the displaced holder's next check raised LeaseLost "
                 "(no stage start, no marker), and its release left the new lease alone")


def test_renewal_keeps_a_short_lease_alive(tmp_path):
    run = str(tmp_path / "r")
    held = lease.RunLease(run, "r", ttl_s=0.4).acquire()
    first = storage.read_json(held.uri)["expires"]
    time.sleep(1.0)
    assert storage.read_json(held.uri)["expires"] > first + 0.3
    with pytest.raises(lease.LeaseHeld):
        lease.RunLease(run, "r", ttl_s=0.4).acquire()
    held.release()


def test_on_s3_exactly_one_of_simultaneous_acquirers_wins(s3_endpoint, record_fault):
    run = "s3://apo-test/lease-race/r"
    won, refused = [], []
    start = threading.Barrier(4)

    def contender():
        start.wait()
        try:
            won.append(lease.RunLease(run, "r", ttl_s=30).acquire())
        except lease.LeaseHeld as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=contender) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 3, (won, refused)
    assert json.loads(storage.read_bytes(won[0].uri))["token"] == won[0].record["token"]
    won[0].release()
    record_fault("concurrency", "four processes take the lease of one run id on S3 at the same instant",
                 "exactly one created lease 1 (conditional PUT); the other three were refused in one line each")


def test_the_prefect_slot_is_renewed_on_the_server_the_run_was_given(prefect_api, tmp_path, capsys):
    """`apo run` points Prefect at its own local server with temporary settings (a context
    variable): the renewal thread must renew the slot there, not on a server of its own (where
    the lease does not exist: every renewal failed with 410 Gone, and the slot expired mid-run)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = PREFECT_API_URL.value()
    with temporary_settings(updates={PREFECT_API_URL: url}):  # set in this context only, as `apo run` does
        holder = lease.RunLease(str(tmp_path / "r"), "renewed-r", ttl_s=0.4, prefect=True).acquire()
    renewed, real = [], holder.slot.renew
    holder.slot.renew = lambda: real() or renewed.append(PREFECT_API_URL.value())
    deadline = time.monotonic() + 20
    while len(renewed) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    holder.release()
    assert len(renewed) >= 2 and set(renewed) == {url}
    assert "renewing the lease" not in capsys.readouterr().out


def test_the_prefect_limit_is_taken_strictly_and_a_takeover_frees_the_crashed_holders_slot(prefect_api, tmp_path, record_fault):
    from prefect.client.orchestration import get_client

    run = str(tmp_path / "r")
    holder = lease.RunLease(run, "prefect-r", ttl_s=30, prefect=True).acquire()
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name("apo-run-prefect-r")
        assert (limit.limit, limit.active_slots) == (1, 1)
    # another artifact root, same run id and server: the server's limit refuses it
    with pytest.raises(lease.LeaseHeld, match="Prefect concurrency limit 'apo-run-prefect-r'"):
        lease.RunLease(str(tmp_path / "elsewhere"), "prefect-r", ttl_s=30, prefect=True).acquire()
    # the holder crashes (its renewals stop, its slot stays taken) and a resume on this host takes over
    holder._stop.set()
    record = storage.read_json(holder.uri)
    storage.write_json({**record, "pid": 1, "pid_started": 0.0}, holder.uri)  # pid 1 started at another time: gone
    resumed = lease.RunLease(run, "prefect-r", ttl_s=30, prefect=True).acquire()
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("apo-run-prefect-r").active_slots == 1
    resumed.release()
    with get_client(sync_client=True) as client:
        names = [lim.name for lim in client.read_global_concurrency_limits()]
    assert "apo-run-prefect-r" not in names
    record_fault("concurrency", "a Prefect server is used: a second holder on another artifact root; then the holder crashes",
                 "the limit apo-run-<run id> (1 slot, leased) refused the second holder; the resume released the crashed "
                 "holder's slot, took one, and deleted the limit at the end")
