"""The demo images end to end on a real Ray runtime with the bundled (trained) checkpoint."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.decode import decode_image
from pipeline.labels import load_categories
from pipeline.listing import iter_inputs
from pipeline.pq import PanopticQuality
from pipeline.model import BUNDLED_DIR
from pipeline.run import ExecutionConfig, RunConfig, run
from tests.integration.conftest import coco, images_table, segment_maps

SAMPLES = BUNDLED_DIR.parent / "samples"
PanopticResultRows = dict[str, tuple[np.ndarray, list[dict]]]


@pytest.fixture(scope="module")
def batched_run(ray_runtime, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("batched")
    run(RunConfig(input=str(SAMPLES), output=str(output), previews=4,
                  execution=ExecutionConfig(batch_size=8, shard_size=5)))
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


def agreement(a: PanopticResultRows, b: PanopticResultRows, categories: dict[int, bool]) -> float:
    """PQ of segmentation `a` taking `b` as ground truth."""
    quality = PanopticQuality(categories)
    for key, (ids, segments) in b.items():
        quality.add(ids, segments, *a[key])
    return quality.result()["all"].pq


def pipeline_results(output: Path) -> PanopticResultRows:
    maps = segment_maps(output)
    return {r["key"]: (maps[r["key"]], r["segments"]) for r in images_table(output)}


def reference_results(keys) -> PanopticResultRows:
    """processor -> model -> transformers' post_process_panoptic_segmentation, one image at a time."""
    from transformers import AutoImageProcessor, MaskFormerForInstanceSegmentation

    processor = AutoImageProcessor.from_pretrained(BUNDLED_DIR)
    model = MaskFormerForInstanceSegmentation.from_pretrained(BUNDLED_DIR, use_safetensors=True).eval()
    categories = load_categories(model.config.id2label, BUNDLED_DIR)
    results = {}
    for key in keys:
        rgb = decode_image((SAMPLES / key).read_bytes())
        with torch.inference_mode():
            outputs = model(**processor(images=[rgb], return_tensors="pt"))
        ref = processor.post_process_panoptic_segmentation(outputs, target_sizes=[rgb.shape[:2]],
                                                           label_ids_to_fuse=set())[0]
        ids = ref["segmentation"].numpy().astype(np.int64).clip(min=0)
        results[key] = (ids, [{"id": i["id"], "category_id": categories[i["label_id"]].id}
                              for i in ref["segments_info"]])
    return results


def test_parity_with_the_reference(single_run, batched_run):
    ours = pipeline_results(single_run)
    reference = reference_results(sorted(ours))
    assert all(len(segments) >= 2 for _, segments in reference.values())
    isthing = {c["id"]: bool(c["isthing"]) for c in coco(single_run)["categories"]}
    assert agreement(ours, reference, isthing) >= 0.99
    assert agreement(pipeline_results(batched_run), reference, isthing) >= 0.99


def test_mixed_size_batches_equal_batch_size_one(batched_run, single_run):
    """Images of several shapes in one batch get the results they get alone."""
    batched, single = pipeline_results(batched_run), pipeline_results(single_run)
    assert_real_segments(images_table(single_run))
    assert batched.keys() == single.keys()
    assert len({ids.shape for ids, _ in single.values()}) >= 5  # the batches really mixed sizes
    same = sum(int((category_map(*batched[k]) == category_map(*single[k])).sum()) for k in single)
    assert same / sum(ids.size for ids, _ in single.values()) >= 0.999
    isthing = {c["id"]: bool(c["isthing"]) for c in coco(single_run)["categories"]}
    assert agreement(batched, single, isthing) >= 0.99


def category_map(ids: np.ndarray, segments: list[dict]) -> np.ndarray:
    lut = np.zeros(int(ids.max()) + 1, dtype=np.int64)
    for s in segments:
        lut[s["id"]] = s["category_id"]
    return lut[ids]


def test_report_counts(batched_run):
    import json

    report = json.loads((batched_run / "report.json").read_text())
    assert report["run"]["ok"] == report["dataset"]["images"] == len(images_table(batched_run))
    assert report["run"]["failed"] == 0 and report["run"]["images_per_second"] > 0


def test_duckdb_over_the_tables_matches_the_report(batched_run):
    import json

    import duckdb

    report = json.loads((batched_run / "report.json").read_text())
    rows = duckdb.sql(
        f"""SELECT s.label, sum(s.area) AS pixels, count(*) AS segments
            FROM read_parquet('{batched_run}/tables/images/*.parquet'), unnest(segments) AS t(s)
            GROUP BY 1"""
    ).fetchall()
    assert len(rows) >= 4
    assert {label: int(pixels) for label, pixels, _ in rows} == report["dataset"]["pixels_per_category"]
    assert {label: int(n) for label, _, n in rows} == report["dataset"]["segments_per_category"]
    # no image failed, and the errors table is there all the same, empty: a scheduled query of it works
    errors = duckdb.sql(f"SELECT count(*) FROM read_parquet('{batched_run}/tables/errors/*.parquet')").fetchall()
    assert errors == [(report["dataset"]["errors"],)] == [(0,)]


def test_report_has_stage_timings(batched_run):
    import json

    stages = json.loads((batched_run / "report.json").read_text())["run"]["stage_seconds"]
    assert set(stages) == {"prepare", "infer", "write"} and all(v > 0 for v in stages.values())


def test_previews_render_in_a_browser(batched_run, tmp_path):
    """The contact sheet opens from disk in headless Chromium and shows the overlays."""
    import os
    import shutil
    import subprocess

    from PIL import Image

    assert len(list((batched_run / "previews").glob("*.jpg"))) == 4
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium package")
        pytest.skip("chromium not installed (CI installs it)")
    shot = tmp_path / "sheet.png"
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1400,900",
         "--virtual-time-budget=5000", (batched_run / "previews" / "index.html").as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # The page background is a flat light grey; rendered overlays bring many distinct colours.
    colours = {tuple(c) for c in pixels.reshape(-1, 3)[::7]}
    assert len(colours) > 500


def test_fusing_stuff_gives_one_segment_per_stuff_class_and_the_same_labels(ray_runtime, batched_run, tmp_path):
    """`--label-ids-to-fuse stuff`: COCO panoptic's one segment per stuff class and image. Fusing
    merges ids only: every pixel keeps its category. The bundled model never finds two segments of
    one stuff class, so here boxes, of which some scenes have several, are declared stuff."""
    label_map = json.loads((BUNDLED_DIR / "label_map.json").read_text())
    for category in label_map["categories"]:
        category["isthing"] = int(category["isthing"] and category["name"] != "box")
    (tmp_path / "label_map.json").write_text(json.dumps(label_map))
    output = tmp_path / "out"
    run(RunConfig(input=str(SAMPLES), output=str(output), label_map=str(tmp_path / "label_map.json"),
                  fuse_stuff=True))

    def categories(output: Path) -> dict[str, tuple[np.ndarray, list[dict]]]:
        maps = segment_maps(output)
        result = {}
        for row in images_table(output):
            lut = np.zeros(max(s["id"] for s in row["segments"]) + 1, np.int64)
            for s in row["segments"]:
                lut[s["id"]] = s["category_id"]
            result[row["key"]] = (lut[maps[row["key"]]], row["segments"])
        return result

    fused, unfused = categories(output), categories(batched_run)
    stuff = {c["id"] for c in label_map["categories"] if not c["isthing"]}
    repeated = {key for key, (_, segments) in unfused.items()
                if max(Counter(s["category_id"] for s in segments if s["category_id"] in stuff).values()) > 1}
    assert len(repeated) >= 2  # the case is exercised: unfused, images with several segments of one stuff class
    for key, (pixels, segments) in fused.items():
        assert np.array_equal(pixels, unfused[key][0])
        of_stuff = [s["category_id"] for s in segments if s["category_id"] in stuff]
        assert of_stuff and len(of_stuff) == len(set(of_stuff))
        assert len(segments) < len(unfused[key][1]) if key in repeated else len(segments) == len(unfused[key][1])
    settings = json.loads((output / "_state" / "settings.json").read_text())
    # recorded as the ids, in the settings' shape of earlier versions: their outputs resume
    assert settings["postprocess"] == {"threshold": 0.5, "mask_threshold": 0.5, "overlap_mask_area_threshold": 0.8,
                                       "label_ids_to_fuse": [0, 1, 3], "tasks": ["panoptic"]}
