"""The driver loop: counts, timings, and the --max-error-ratio stop."""

import numpy as np
import pytest

from pipeline.report import RunCounts
from pipeline.run import MIN_IMAGES_FOR_ERROR_RATIO, _drive


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
