import json
import os
import subprocess
import sys
import time

import pytest

from pipeline import lease
from pipeline.lease import LEASE, OutputBusy, hold_lease
from pipeline.state import clear_outputs
from pipeline.storage import OutputStore


@pytest.fixture(autouse=True)
def fast(monkeypatch):
    monkeypatch.setattr(lease, "SETTLE_SECONDS", 0.0)


def plant(store: OutputStore, holder: dict, age: float, run_id: str = "other-run") -> None:
    store.write_bytes(LEASE, json.dumps({"run_id": run_id, "started": "2026-12-02T10:00:00Z", **holder,
                                         "renewed": time.time() - age}).encode())


def here(**changes) -> dict:
    """This process as a lease names its holder, with `changes`."""
    return lease._process(os.getpid()) | changes


ELSEWHERE = {"host": "some-other-node", "pid": 1}


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_second_run_is_refused_while_the_first_holds_the_lease_and_admitted_after(tmp_path):
    store = OutputStore(str(tmp_path))
    with hold_lease(store, "first", "2026-12-02T10:00:00Z"):
        with pytest.raises(OutputBusy, match=r"being written by run first \(started 2026-12-02T10:00:00Z"):
            with hold_lease(store, "second", "now"):
                pass
        assert json.loads(store.read_bytes(LEASE))["run_id"] == "first"  # the refused run took nothing
    assert not store.exists(LEASE)
    with hold_lease(store, "second", "now"):
        pass


def test_the_lease_is_released_when_the_run_fails(tmp_path):
    store = OutputStore(str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        with hold_lease(store, "first", "now"):
            raise KeyboardInterrupt
    assert not store.exists(LEASE)


def test_a_live_holder_on_another_host_blocks_until_its_lease_expires(tmp_path):
    store = OutputStore(str(tmp_path))
    plant(store, here(host="some-other-node"), age=30)
    with pytest.raises(OutputBusy, match="some-other-node.*last seen 30 s ago"):
        with hold_lease(store, "mine", "now"):
            pass
    plant(store, here(host="some-other-node"), age=lease.EXPIRES_SECONDS + 1)
    with hold_lease(store, "mine", "now"):
        assert json.loads(store.read_bytes(LEASE))["run_id"] == "mine"


def test_a_killed_holder_on_this_host_frees_the_output_at_once(tmp_path):
    store = OutputStore(str(tmp_path))
    plant(store, here(), age=1)
    with pytest.raises(OutputBusy):
        with hold_lease(store, "mine", "now"):
            pass
    plant(store, here(pid=dead_pid()), age=1)
    with hold_lease(store, "mine", "now"):
        pass


def test_a_holder_of_this_host_name_in_another_container_or_machine_is_waited_for(tmp_path):
    """Containers on the host's network share its host name, each with its own pids; so may machines."""
    store = OutputStore(str(tmp_path))
    for other in (here(pid=dead_pid(), pid_namespace=1), here(pid=dead_pid(), boot="another-boot")):
        plant(store, other, age=1)
        with pytest.raises(OutputBusy, match=f"process {other['pid']}"):
            with hold_lease(store, "mine", "now"):
                pass


def test_a_holder_this_user_may_not_see_in_proc_is_waited_for(tmp_path, monkeypatch):
    """/proc mounted with hidepid hides other users' processes: a live holder, not an ended one."""
    store = OutputStore(str(tmp_path))
    start_time = lease._start_time

    def hidden(pid: int) -> str:
        if pid != os.getpid():
            raise PermissionError(13, "Permission denied", f"/proc/{pid}/stat")
        return start_time(pid)

    monkeypatch.setattr(lease, "_start_time", hidden)
    plant(store, here(pid=1), age=1)  # pid 1 runs
    with pytest.raises(OutputBusy, match="process 1;"):
        with hold_lease(store, "mine", "now"):
            pass


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="process start times come from /proc")
def test_a_holder_whose_pid_another_process_took_frees_the_output_at_once(tmp_path):
    store = OutputStore(str(tmp_path))
    plant(store, here(process_start="1"), age=1)  # this process's pid, another start: the holder ended
    with hold_lease(store, "mine", "now"):
        assert json.loads(store.read_bytes(LEASE))["run_id"] == "mine"


def test_the_lease_is_renewed_while_the_run_works(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "RENEW_SECONDS", 0.05)
    store = OutputStore(str(tmp_path))
    with hold_lease(store, "mine", "now"):
        first = json.loads(store.read_bytes(LEASE))["renewed"]
        time.sleep(0.5)
        assert json.loads(store.read_bytes(LEASE))["renewed"] > first


def test_the_renewals_outlast_a_storage_outage(tmp_path, monkeypatch):
    """botocore's connection errors are no OSError: one of them had ended the renewals for good."""
    class EndpointConnectionError(Exception):
        pass

    monkeypatch.setattr(lease, "RENEW_SECONDS", 0.05)
    store = OutputStore(str(tmp_path))
    write, outage = OutputStore.write_bytes, time.monotonic() + 0.3

    def unreachable(self, path, data, seconds=None):
        if path == LEASE and time.monotonic() < outage:
            raise EndpointConnectionError("Could not connect to the endpoint URL")
        return write(self, path, data, seconds)

    with hold_lease(store, "mine", "now"):
        monkeypatch.setattr(OutputStore, "write_bytes", unreachable)
        first = json.loads(store.read_bytes(LEASE))["renewed"]
        time.sleep(0.8)
        assert json.loads(store.read_bytes(LEASE))["renewed"] > first + 0.3


def test_a_run_that_loses_a_simultaneous_start_refuses(tmp_path, monkeypatch):
    """Both found no lease and both wrote one: the one whose write was overwritten gives way."""
    store = OutputStore(str(tmp_path))
    monkeypatch.setattr(lease.time, "sleep", lambda _: plant(store, ELSEWHERE, age=0, run_id="rival"))
    with pytest.raises(OutputBusy, match="rival"):
        with hold_lease(store, "mine", "now"):
            pass
    assert json.loads(store.read_bytes(LEASE))["run_id"] == "rival"


def test_a_run_that_finds_no_lease_but_loses_its_creation_refuses_without_touching_it(tmp_path, monkeypatch):
    """The rival created its lease between this run's look and its write: the store refuses the
    second creation, whatever the timing (no settling wait decides it)."""
    store = OutputStore(str(tmp_path))
    plant(store, ELSEWHERE, age=0, run_id="rival")
    holder, looks = lease._holder, []
    monkeypatch.setattr(lease, "_holder", lambda *a: holder(*a) if looks.append(1) or len(looks) > 1 else None)
    before = store.read_bytes(LEASE)
    with pytest.raises(OutputBusy, match="rival"):
        with hold_lease(store, "mine", "now"):
            pass
    assert store.read_bytes(LEASE) == before


def test_create_bytes_writes_once(tmp_path):
    store = OutputStore(str(tmp_path))
    assert store.create_bytes("_state/x.json", b"first") and not store.create_bytes("_state/x.json", b"second")
    assert store.read_bytes("_state/x.json") == b"first"


def test_overwrite_keeps_the_lease_of_the_run_that_clears(tmp_path):
    store = OutputStore(str(tmp_path))
    with hold_lease(store, "mine", "now"):
        store.write_bytes("_state/settings.json", b"{}")
        store.write_bytes("_state/runs/old.json", b"{}")
        clear_outputs(store)
        assert store.exists(LEASE) and not store.exists("_state/settings.json") and not store.exists("_state/runs")


def stop_message(still_held) -> str:
    """The OutputBusy message `still_held` raises once the renewals have found the lease lost."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            still_held()
        except OutputBusy as exc:
            return str(exc)
        time.sleep(0.05)
    pytest.fail("the lost lease was never noticed")


def test_a_run_whose_lease_was_taken_over_stops_and_leaves_the_new_lease_alone(tmp_path, monkeypatch):
    """Unseen past the expiry (a suspended machine), the run finds another's lease at its next
    renewal: it does not overwrite it, and its check says it must stop."""
    monkeypatch.setattr(lease, "RENEW_SECONDS", 0.05)
    store = OutputStore(str(tmp_path))
    with hold_lease(store, "mine", "now") as still_held:
        still_held()  # held: no error
        plant(store, ELSEWHERE | {"pid": 12345}, age=0, run_id="newer")
        assert "run newer (on some-other-node, process 12345) took over" in stop_message(still_held)
        time.sleep(0.2)  # renewals would have overwritten it by now
        assert json.loads(store.read_bytes(LEASE))["run_id"] == "newer"
    assert json.loads(store.read_bytes(LEASE))["run_id"] == "newer"  # ending the run leaves it too


def test_a_run_whose_lease_vanished_stops_and_does_not_make_it_again(tmp_path, monkeypatch):
    """The run that took the output over has finished and deleted its lease: the unseen run's
    renewals must not recreate one, as if it still held the output."""
    monkeypatch.setattr(lease, "RENEW_SECONDS", 0.05)
    store = OutputStore(str(tmp_path))
    with hold_lease(store, "mine", "now") as still_held:
        store.delete(LEASE)
        assert "another run took over" in stop_message(still_held)
        time.sleep(0.2)
        assert not store.exists(LEASE)


def test_a_run_whose_renewals_have_not_landed_for_too_long_stops_and_renews_no_more(tmp_path, monkeypatch):
    """Another run may find the lease expired any moment: a renewal landing after it took the
    output over would overwrite its lease, and both runs would commit the same images. So is it
    when the store answers nothing at all, reads included."""
    class ReadTimeoutError(Exception):
        pass

    monkeypatch.setattr(lease, "RENEW_SECONDS", 0.05)
    monkeypatch.setattr(lease, "EXPIRES_SECONDS", 1.6)
    monkeypatch.setattr(lease, "CLOCK_MARGIN_SECONDS", 0.4)  # so: stops 1.2 s after the last renewal landed
    store = OutputStore(str(tmp_path))
    write, read, tries = OutputStore.write_bytes, OutputStore.read_bytes, []

    def silent(self, path, *args, **kwargs):
        tries.append(path)
        raise ReadTimeoutError("Read timeout on endpoint URL")

    with hold_lease(store, "mine", "now") as still_held:
        monkeypatch.setattr(OutputStore, "write_bytes", silent)
        monkeypatch.setattr(OutputStore, "read_bytes", silent)
        started = time.monotonic()
        assert "none of this run's renewals of its lease" in stop_message(still_held)
        assert time.monotonic() - started < 1.6 and tries
        stopped = len(tries)
        time.sleep(0.3)
        assert len(tries) == stopped  # the renewer has stopped trying
        monkeypatch.setattr(OutputStore, "write_bytes", write)
        monkeypatch.setattr(OutputStore, "read_bytes", read)
    # left to expire: another run may be taking it over, and its new lease must not be deleted
    assert json.loads(store.read_bytes(LEASE))["run_id"] == "mine"


def test_a_create_whose_first_try_landed_and_whose_retry_was_refused_takes_its_own_lease(tmp_path, monkeypatch):
    """s3fs retries a PUT whose answer was lost: the retry finds the first try's lease (412)."""
    store = OutputStore(str(tmp_path))
    create = OutputStore.create_bytes
    monkeypatch.setattr(OutputStore, "create_bytes", lambda self, path, data: create(self, path, data) and False)
    with hold_lease(store, "mine", "now"):
        assert json.loads(store.read_bytes(LEASE))["run_id"] == "mine"


def test_releasing_the_lease_in_a_store_that_stopped_answering_is_brief_and_keeps_the_runs_own_error(tmp_path,
                                                                                                   monkeypatch):
    """Ctrl-C, SIGTERM or the storage error that stopped the run is what the user must see, soon."""
    from pipeline.remote import StorageTimeout

    store, given = OutputStore(str(tmp_path)), []

    def silent(self, path, seconds=None):
        given.append(seconds)
        raise StorageTimeout(f"a request to the storage endpoint did not finish within {seconds:.0f} s")

    with pytest.raises(KeyboardInterrupt):
        with hold_lease(store, "mine", "now"):
            monkeypatch.setattr(OutputStore, "read_bytes", silent)
            raise KeyboardInterrupt
    assert given == [lease.RELEASE_SECONDS]
