"""The driver loop: counts, timings, progress, the --max-error-ratio stop, and SIGTERM."""

import signal
import threading

import numpy as np
import pytest

from pipeline.report import RunCounts
from pipeline.run import MIN_IMAGES_FOR_ERROR_RATIO, Terminated, _drive, _sigterm_interrupts


def _batch(ok: list[bool]) -> dict:
    n = len(ok)
    return {"ok": np.asarray(ok), "error_type": np.asarray(["" if o else "NotAnImage" for o in ok]),
            "seconds_prepare": np.full(n, 0.1), "seconds_infer": np.full(n, 0.2), "seconds_write": np.full(n, 0.3)}


def test_counts_and_stage_seconds():
    counts = RunCounts()
    assert _drive(iter([_batch([True, False]), _batch([True] * 3)]), counts, print, max_error_ratio=0.5,
                  still_held=lambda: None)
    assert (counts.ok, counts.failed, counts.error_types["NotAnImage"]) == (4, 1, 1)
    assert counts.stage_seconds["seconds_infer"] == np.float64(0.2) * 5


def test_stops_once_the_error_ratio_is_exceeded_and_not_before_enough_images():
    counts = RunCounts()
    bad = [_batch([False] * 5) for _ in range(10)]
    assert not _drive(iter(bad), counts, print, max_error_ratio=0.5, still_held=lambda: None)
    assert counts.processed == MIN_IMAGES_FOR_ERROR_RATIO  # stopped at the first check that counts
    counts = RunCounts()
    assert _drive(iter([_batch([False] * 5)]), counts, print, max_error_ratio=0.5,
                  still_held=lambda: None)  # too few to judge


def test_a_lost_lease_stops_the_loop_at_the_next_result():
    from pipeline.lease import OutputBusy

    def lost() -> None:
        if counts.processed:
            raise OutputBusy("taken over")

    counts = RunCounts()
    with pytest.raises(OutputBusy):
        _drive(iter([_batch([True] * 4) for _ in range(3)]), counts, print, max_error_ratio=0.5, still_held=lost)
    assert counts.processed == 4


def test_progress_comes_while_no_shard_has_committed_yet():
    lines, ticked = [], threading.Event()

    def progress(line: str) -> None:
        lines.append(line)
        ticked.set()

    def slow_start():  # a model loading for minutes: no result yet
        assert ticked.wait(10)
        yield _batch([True] * 3)

    counts = RunCounts()
    assert _drive(slow_start(), counts, progress, max_error_ratio=0.5, still_held=lambda: None, every_seconds=0.05)
    assert lines[0].startswith("progress: 0 images done in ")
    assert counts.ok == 3


def test_sigterm_interrupts_inside_and_the_previous_handler_is_back_after():
    def previous(signum, frame):
        raise AssertionError("the previous handler ran inside")

    found = signal.signal(signal.SIGTERM, previous)
    try:
        with pytest.raises(Terminated), _sigterm_interrupts():
            signal.raise_signal(signal.SIGTERM)  # runs the handler before it returns
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, found)


def test_a_shard_its_write_task_did_not_commit_stops_the_run():
    from pipeline.lease import OutputBusy
    from pipeline.shards import NOT_COMMITTED

    counts, lost = RunCounts(), _batch([False] * 3)
    lost["error_type"] = np.full(3, NOT_COMMITTED)
    with pytest.raises(OutputBusy, match="could not land while this run surely held the output's lease"):
        _drive(iter([_batch([True] * 2), lost, _batch([True])]), counts, print, max_error_ratio=0.5,
               still_held=lambda: None)
    assert (counts.ok, counts.failed) == (2, 0)


def test_a_stopped_run_is_recorded_or_a_warning_says_why_not(tmp_path, monkeypatch):
    """The store may be what stopped the run: its record is best effort, and never hides the error."""
    import json

    from pipeline import run as run_module
    from pipeline.storage import OutputStore

    store, lines = OutputStore(str(tmp_path)), []
    run_module._record_stopped(store, {"run_id": "r1", "interrupted": "now"}, (), lines.append)
    recorded = json.loads((tmp_path / "_state" / "runs" / "r1.json").read_text())
    assert recorded["interrupted"] == "now" and recorded["counts"] == {"ok": 0, "failed": 0} and not lines

    def unreachable(*_):
        raise OSError("no route to the store")

    monkeypatch.setattr(run_module, "record_run", unreachable)
    run_module._record_stopped(store, {"run_id": "r2"}, (), lines.append)
    assert lines == [f"warning: this run's record in {tmp_path}/_state/runs is missing (OSError: no route to the store)"]
