"""A Ray runtime shared by the integration tests, and helpers to read a run's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.encode import read_panoptic_png


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
