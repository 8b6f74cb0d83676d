"""The demo images end to end on a real Ray runtime with the bundled (trained) checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import PostprocessConfig
from pipeline.listing import iter_inputs
from pipeline.model import BUNDLED_DIR
from pipeline.run import ExecutionConfig, RunConfig, run
from tests.integration.conftest import coco, images_table, segment_maps

SAMPLES = BUNDLED_DIR.parent / "samples"


@pytest.fixture(scope="module")
def batched_run(ray_runtime, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("batched")
    run(RunConfig(input=str(SAMPLES), output=str(output), execution=ExecutionConfig(batch_size=8, shard_size=5)))
    return output


@pytest.fixture(scope="module")
def single_run(ray_runtime, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("single")
    run(RunConfig(input=str(SAMPLES), output=str(output), execution=ExecutionConfig(batch_size=1)))
    return output


def assert_real_segments(rows: list[dict]) -> None:
    """Guard: a checkpoint that segments nothing would make every other assertion vacuous."""
    for row in rows:
        assert len(row["segments"]) >= 2, row["key"]
    kinds = {s["isthing"] for row in rows for s in row["segments"]}
    labels = {s["label"] for row in rows for s in row["segments"]}
    assert kinds == {True, False} and len(labels) >= 4


def test_every_input_has_one_png_and_one_row(batched_run):
    keys = sorted(k for k, _ in iter_inputs(str(SAMPLES)))
    rows = images_table(batched_run)
    assert sorted(r["key"] for r in rows) == keys
    assert len(keys) >= 10
    pngs = sorted(str(p.relative_to(batched_run / "panoptic"))[: -len(".png")]
                  for p in (batched_run / "panoptic").rglob("*.png"))
    assert pngs == keys


def test_png_ids_match_segments_with_area_and_bbox(batched_run):
    rows = images_table(batched_run)
    assert_real_segments(rows)
    maps = segment_maps(batched_run)
    for row in rows:
        ids = maps[row["key"]]
        assert ids.shape == (row["height"], row["width"])
        segments = {s["id"]: s for s in row["segments"]}
        assert set(np.unique(ids)) - {0} == set(segments)
        for seg_id, s in segments.items():
            ys, xs = np.nonzero(ids == seg_id)
            assert s["area"] == len(ys)
            assert list(s["bbox"]) == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_coco_panoptic_json_structure(batched_run):
    data = coco(batched_run)
    rows = {r["key"]: r for r in images_table(batched_run)}
    ids = [im["id"] for im in data["images"]]
    assert len(ids) == len(set(ids)) == len(rows)
    assert {im["file_name"] for im in data["images"]} == set(rows)
    by_image = {a["image_id"]: a for a in data["annotations"]}
    assert len(by_image) == len(data["annotations"]) == len(ids)
    category_ids = {c["id"] for c in data["categories"]}
    assert all({"id", "name", "isthing"} <= set(c) for c in data["categories"])
    maps = segment_maps(batched_run)
    for image in data["images"]:
        annotation = by_image[image["id"]]
        png = batched_run / "panoptic" / annotation["file_name"]
        assert png.is_file() and annotation["file_name"] == image["file_name"] + ".png"
        ids_in_png = set(np.unique(maps[image["file_name"]])) - {0}
        assert {s["id"] for s in annotation["segments_info"]} == ids_in_png
        assert all(s["category_id"] in category_ids for s in annotation["segments_info"])


def test_mixed_size_batches_equal_batch_size_one(batched_run, single_run):
    batched, single = segment_maps(batched_run), segment_maps(single_run)
    assert_real_segments(images_table(single_run))
    assert batched.keys() == single.keys()
    sizes = {m.shape for m in single.values()}
    assert len(sizes) >= 5  # the batches really mixed sizes
    for key in single:
        assert np.array_equal(batched[key], single[key]), key


def test_report_counts(batched_run):
    import json

    report = json.loads((batched_run / "report.json").read_text())
    assert report["run"]["ok"] == report["dataset"]["images"] == len(images_table(batched_run))
    assert report["run"]["failed"] == 0 and report["run"]["images_per_second"] > 0
