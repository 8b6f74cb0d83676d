"""`_state/lease.json`: one run at a time on an output.

Two runs on one output (a scheduled run that starts before the last one ended) would both list
the same pending images and segment them twice. So a run holds a lease, which it renews while it
works and deletes when it ends. Another run refuses to start while the lease is live: renewed
within EXPIRES_SECONDS and, when the holder is a process of this machine and PID namespace, that
process still running. So a rerun after a kill on the same machine starts at once, and one on another
machine or in another container once the lease expires.

A run writes its lease, its shards' PNGs and their commits only while no other run can have found
its lease expired: each such write is given until then (`write_deadline`) and cancelled after. A
run whose renewals have not landed in time stops; its images are left to the next run. So a run
that went unseen (a storage outage, a hung request) does not commit an image that the run which
took the output over has listed as pending, and commits it too. The client cancels; a store, or
a proxy that buffered the body, may still apply a write it had whole, and a machine suspended in
the middle of a write resumes it with its deadline unspent (Python times deadlines on the
monotonic clock, which stops during a suspend): those duplicates are not excluded.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from pipeline.remote import REQUEST_SECONDS
from pipeline.storage import OutputStore

LEASE = "_state/lease.json"
RENEW_SECONDS = 15.0
EXPIRES_SECONDS = 90.0
# Two runs that take over an expired lease at once both write theirs: the later write wins, and
# each reads the lease back after this long to learn whether it was the later one. (Of two runs
# that find no lease, the store lets only one create it.)
SETTLE_SECONDS = 0.5
# Taken off every lease's remaining life for the clocks of the nodes involved (the driver that
# renews it, the node that commits, the machine of a run that takes over), which may differ.
CLOCK_MARGIN_SECONDS = 15.0
# What releasing the lease at the end of a run may take, at most per request.
RELEASE_SECONDS = 10.0


class OutputBusy(RuntimeError):
    """Another run is writing to this output."""


def _process(pid: int) -> dict:
    """Who process `pid` of this machine is: its host name and pid and, on Linux, what makes those
    unambiguous. A host name is not: containers on the host's network share it, and so may machines
    (the boot id tells them apart). Nor is a pid: a container numbers its processes in its own PID
    namespace, and a pid is reused once its process ends (its start time tells them apart)."""
    identity: dict = {"host": socket.gethostname(), "pid": pid}
    try:
        identity["boot"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        identity["pid_namespace"] = os.stat("/proc/self/ns/pid").st_ino
        identity["process_start"] = _start_time(pid)
    except OSError:  # no /proc (macOS): the host name and pid alone
        pass
    return identity


def _start_time(pid: int) -> str:
    """Field 22 of /proc/<pid>/stat: the process's start, in clock ticks since boot."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2:].split()[19]  # after the name, which may hold spaces and parentheses


def _ended_here(lease: dict) -> bool:
    """Whether the lease's holder is a process of this machine and PID namespace that has ended.
    A holder seen elsewhere, or not known as precisely as this process knows itself, may be alive."""
    here = _process(os.getpid())
    if any(lease.get(name) != here.get(name) for name in ("host", "boot", "pid_namespace")):
        return False
    if not _exists(lease["pid"]):
        return True
    if "process_start" not in here:
        return False
    try:
        return _start_time(lease["pid"]) != lease.get("process_start")  # the pid reused
    except OSError:  # hidden from this user (/proc mounted with hidepid), or ended meanwhile
        return not _exists(lease["pid"])


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read(store: OutputStore, seconds: float | None = None) -> dict | None:
    try:
        lease = json.loads(store.read_bytes(LEASE, seconds=seconds))
    except FileNotFoundError:
        return None
    except ValueError:  # not ours to interpret (writes are atomic, so not a cut-off one): no holder
        return None
    return lease if isinstance(lease, dict) and {"run_id", "started", "host", "pid", "renewed"} <= lease.keys() else None


def _fence(renewed: float) -> float:
    """When writes must have landed for a lease renewed at `renewed` (epoch seconds): before
    another run could find it expired, less CLOCK_MARGIN_SECONDS."""
    return renewed + EXPIRES_SECONDS - CLOCK_MARGIN_SECONDS


def write_deadline(store: OutputStore, run_id: str, seconds: float | None = None) -> float:
    """When run `run_id`'s writes to the output must have landed (epoch seconds): already past
    when it must not write. A write task that finds the lease naming another run, or none,
    outlived its driver (killed) or its lease (the run went unseen, and another took the output
    over, perhaps finished and left): the run now holding it may be redoing its images.
    `seconds`: how long reading the lease may take."""
    lease = _read(store, seconds=seconds)
    return _fence(lease["renewed"]) if lease is not None and lease["run_id"] == run_id else 0.0


def _holder(store: OutputStore, now: float) -> dict | None:
    """The live lease on the output, if any."""
    lease = _read(store)
    if lease is None or now - lease["renewed"] > EXPIRES_SECONDS:
        return None
    if _ended_here(lease):
        return None
    return lease


def _busy(store: OutputStore, holder: dict, now: float) -> OutputBusy:
    return OutputBusy(
        f"{store.root} is being written by run {holder['run_id']} (started {holder['started']} on "
        f"{holder['host']}, process {holder['pid']}; last seen {now - holder['renewed']:.0f} s ago). Two runs "
        f"on one output would segment the same images twice: wait for it to end, or, if it is dead, "
        f"for its lease to expire ({EXPIRES_SECONDS:.0f} s after it was last seen)")


def check_free(store: OutputStore) -> None:
    """OutputBusy if another run holds the output now: refused before a run starts Ray for nothing.
    (Only `hold_lease` takes the output, atomically.)"""
    holder = _holder(store, time.time())
    if holder is not None:
        raise _busy(store, holder, time.time())


@contextmanager
def hold_lease(store: OutputStore, run_id: str, started: str) -> Iterator[Callable[[], None]]:
    """Hold the output's lease for the body of the `with`; OutputBusy if another run holds it.

    Yields a check that raises OutputBusy once this run has lost the lease: another run took it
    over (this run went unseen past EXPIRES_SECONDS: a suspended machine, a storage outage, and
    the other found it expired), or the renewals have not landed for so long that another run
    may. Both would now segment the same images. The renewals stop then, so as not to overwrite
    the other's lease."""
    check_free(store)
    lease = {"run_id": run_id, "started": started, **_process(os.getpid())}

    def stamped(renewed: float) -> bytes:
        return json.dumps(lease | {"renewed": renewed}).encode()

    landed = time.time()  # the stamp of the newest renewal known to have landed
    if not store.create_bytes(LEASE, stamped(landed)):  # a lease is there: an expired one, or a rival's just made
        holder = _holder(store, time.time())
        if holder is not None and holder["run_id"] != run_id:  # (its own: a retried create whose first try landed)
            raise _busy(store, holder, time.time())
        landed = time.time()
        store.write_bytes(LEASE, stamped(landed))
    time.sleep(SETTLE_SECONDS)
    holder = _holder(store, time.time())
    if holder is not None and holder["run_id"] != run_id:
        raise _busy(store, holder, time.time())
    stop = threading.Event()
    lost: list[str] = []  # why this run no longer holds the output: set once it has lost it

    def unseen() -> bool:
        """Whether another run may now find the lease expired: no renewal has landed in time. A
        renewal landing after that could overwrite the lease of a run taking over."""
        if time.time() < _fence(landed):
            return False
        lost.append(f"none of this run's renewals of its lease on {store.root} landed for "
                    f"{EXPIRES_SECONDS - CLOCK_MARGIN_SECONDS:.0f} s (a suspended machine, or a slow or unreachable "
                    f"store), so another run may take the output over; what this run committed is kept, and a "
                    f"rerun goes on with the rest")
        return True

    def keep_renewing() -> None:
        nonlocal landed
        while not stop.wait(RENEW_SECONDS) and not unseen():
            try:
                current = _read(store)
                if current is None or current["run_id"] != run_id:  # gone: taken over, and that run ended
                    taken_by = "another run" if current is None else \
                        f"run {current['run_id']} (on {current['host']}, process {current['pid']})"
                    lost.append(f"{taken_by} took over {store.root} after this run went unseen for over "
                                f"{EXPIRES_SECONDS:.0f} s; what this run committed is kept, and that run goes "
                                f"on with the rest")
                    return
                renewed = time.time()
                if stop.is_set() or unseen():  # stopped while reading: the run is releasing the lease
                    return
                store.write_bytes(LEASE, stamped(renewed), seconds=min(_fence(landed) - renewed, REQUEST_SECONDS))
                landed = renewed
            # storage unreachable or slow for a moment (botocore's EndpointConnectionError is no OSError): the
            # next renewal may succeed, and a renewer that ended here would let the lease expire under a live run
            except Exception:
                pass

    def check() -> None:
        if lost:
            raise OutputBusy(f"stopped: {lost[0]}")

    renewer = threading.Thread(target=keep_renewing, name="lease-renewer", daemon=True)
    renewer.start()
    try:
        yield check
    finally:
        stop.set()
        renewer.join(RELEASE_SECONDS)
        # Deleted only while it is surely this run's: not once another run may be taking it over
        # (its new lease could land between the read and the delete), nor while a renewal is in
        # flight (it could land after the delete). A lease left behind frees the output at once
        # for a rerun on this machine, and elsewhere once it expires.
        if not lost and not renewer.is_alive() and time.time() + 2 * RELEASE_SECONDS < _fence(landed):
            try:
                mine = _read(store, seconds=RELEASE_SECONDS)
                if mine is not None and mine["run_id"] == run_id:
                    store.delete(LEASE, seconds=RELEASE_SECONDS)
            # the store may be what stopped the run, whose own error is the one to report (or Ctrl-C,
            # SIGTERM, which must not wait on it)
            except Exception:
                pass
