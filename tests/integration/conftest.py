"""A Ray runtime shared by the integration tests, and helpers to read a run's outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.encode import read_panoptic_png
from tests.ports import free_port


@pytest.fixture(scope="session")
def ray_runtime():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def images_table(output: Path) -> list[dict]:
    return pq.read_table(output / "tables" / "images").to_pylist()


def segment_maps(output: Path) -> dict[str, np.ndarray]:
    """key -> (H, W) int32 segment ids read back from the run's panoptic PNGs."""
    return {row["key"]: read_panoptic_png((output / row["panoptic_png"]).read_bytes()) for row in images_table(output)}


def coco(output: Path) -> dict:
    return json.loads((output / "coco" / "panoptic.json").read_text())


def ray_ports(*names: str, taken: set[int]) -> list[str]:
    """`ray start` flags giving each named port a free one, none in `taken` (added to): the test
    session's own Ray runtime already holds the defaults (its job agent's 52365 among them)."""
    return [f"--{name}={free_port(taken)}" for name in names]


def stop_process_group(process: subprocess.Popen) -> None:
    """Stop a process started with `start_new_session` and everything it started (a Ray node
    under `ray start --block`): `ray stop` would stop every Ray on the machine."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=30)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue
