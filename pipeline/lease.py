"""`_state/lease.json`: one run at a time on an output.

Two runs on one output (a scheduled run that starts before the last one ended) would both list
the same pending images and segment them twice. So a run holds a lease, which it renews while it
works and deletes when it ends. Another run refuses to start while the lease is live: renewed
within EXPIRES_SECONDS and, when the holder is on this host, its process still alive. So a rerun
after a kill on the same host starts at once, and one on another host once the lease expires.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from pipeline.storage import OutputStore

LEASE = "_state/lease.json"
RENEW_SECONDS = 15.0
EXPIRES_SECONDS = 90.0
# Two runs that take over an expired lease at once both write theirs: the later write wins, and
# each reads the lease back after this long to learn whether it was the later one. (Of two runs
# that find no lease, the store lets only one create it.)
SETTLE_SECONDS = 0.5


class OutputBusy(RuntimeError):
    """Another run is writing to this output."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read(store: OutputStore) -> dict | None:
    try:
        lease = json.loads(store.read_bytes(LEASE))
    except FileNotFoundError:
        return None
    except ValueError:  # not ours to interpret (writes are atomic, so not a cut-off one): no holder
        return None
    return lease if isinstance(lease, dict) and {"run_id", "started", "host", "pid", "renewed"} <= lease.keys() else None


def held_by(store: OutputStore, run_id: str) -> bool:
    """Whether the output's lease names run `run_id`. A run's write task that finds otherwise
    outlived its driver (killed) or its lease (the run went unseen, and another took the output
    over, perhaps finished and left): the run now holding it may be redoing its images."""
    lease = _read(store)
    return lease is not None and lease["run_id"] == run_id


def _holder(store: OutputStore, now: float) -> dict | None:
    """The live lease on the output, if any."""
    lease = _read(store)
    if lease is None or now - lease["renewed"] > EXPIRES_SECONDS:
        return None
    if lease["host"] == socket.gethostname() and not _alive(lease["pid"]):
        return None
    return lease


def _busy(store: OutputStore, holder: dict, now: float) -> OutputBusy:
    return OutputBusy(
        f"{store.root} is being written by run {holder['run_id']} (started {holder['started']} on "
        f"{holder['host']}, process {holder['pid']}; last seen {now - holder['renewed']:.0f} s ago). Two runs "
        f"on one output would segment the same images twice: wait for it to end, or, if it is dead, "
        f"for its lease to expire ({EXPIRES_SECONDS:.0f} s after it was last seen)")


@contextmanager
def hold_lease(store: OutputStore, run_id: str, started: str) -> Iterator[Callable[[], None]]:
    """Hold the output's lease for the body of the `with`; OutputBusy if another run holds it.

    Yields a check that raises OutputBusy once another run has taken the lease over: this run went
    unseen past EXPIRES_SECONDS (a suspended machine, a storage outage), the other found it
    expired, and both would now segment the same images. The renewals stop then, so as not to
    overwrite the other's lease."""
    holder = _holder(store, time.time())
    if holder is not None:
        raise _busy(store, holder, time.time())
    lease = {"run_id": run_id, "started": started, "host": socket.gethostname(), "pid": os.getpid()}

    def renewed() -> bytes:
        return json.dumps(lease | {"renewed": time.time()}).encode()

    def renew() -> None:
        store.write_bytes(LEASE, renewed())

    if not store.create_bytes(LEASE, renewed()):  # a lease is there: an expired one, or a rival's just made
        holder = _holder(store, time.time())
        if holder is not None:
            raise _busy(store, holder, time.time())
        renew()
    time.sleep(SETTLE_SECONDS)
    holder = _holder(store, time.time())
    if holder is not None and holder["run_id"] != run_id:
        raise _busy(store, holder, time.time())
    stop = threading.Event()
    taken: list[str] = []  # who holds the output instead: set once this run has lost it

    def keep_renewing() -> None:
        while not stop.wait(RENEW_SECONDS):
            try:
                current = _read(store)
                if current is None or current["run_id"] != run_id:  # gone: taken over, and that run ended
                    taken.append("another run" if current is None else
                                 f"run {current['run_id']} (on {current['host']}, process {current['pid']})")
                    return
                renew()
            except OSError:  # storage unreachable for a moment: the next renewal may succeed
                pass

    def check() -> None:
        if taken:
            raise OutputBusy(
                f"stopped: {taken[0]} took over {store.root} after this run went unseen for over "
                f"{EXPIRES_SECONDS:.0f} s; what this run committed is kept, and that run goes on with the rest")

    renewer = threading.Thread(target=keep_renewing, name="lease-renewer", daemon=True)
    renewer.start()
    try:
        yield check
    finally:
        stop.set()
        renewer.join()
        mine = _read(store)
        if mine is not None and mine["run_id"] == run_id:  # not a lease taken over after ours expired
            store.delete(LEASE)
