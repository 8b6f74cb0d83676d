import json

import numpy as np
from PIL import Image

from pipeline.encode import read_panoptic_png
from pipeline.scenes import generate_scenes, scene


def test_scenes_are_deterministic_and_varied():
    a, b = scene(3, 5), scene(3, 5)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.segment_ids, b.segment_ids)
    shapes = {scene(3, i).segment_ids.shape for i in range(12)}
    assert len(shapes) == 12
    ratios = [h / w for h, w in shapes]
    assert min(ratios) < 0.8 and max(ratios) > 1.25


def test_written_ground_truth_is_consistent(tmp_path):
    out = generate_scenes(tmp_path, count=6, seed=2)
    data = json.loads((out / "panoptic.json").read_text())
    assert len(data["images"]) == 6 and {c["isthing"] for c in data["categories"]} == {0, 1}
    kinds = set()
    for image, annotation in zip(data["images"], data["annotations"]):
        assert (out / "images" / image["file_name"]).is_file()
        ids = read_panoptic_png((out / "panoptic" / annotation["file_name"]).read_bytes())
        assert ids.shape == (image["height"], image["width"])
        segments = {s["id"]: s for s in annotation["segments_info"]}
        assert set(np.unique(ids)) - {0} == set(segments)
        for seg_id, s in segments.items():
            assert s["area"] == int((ids == seg_id).sum())
            kinds.add(s["category_id"])
    assert kinds >= {1, 2} and len(kinds & {3, 4, 5}) >= 2  # both stuff and several thing kinds


def test_same_seed_writes_the_same_bytes_as_real_jpeg_and_png(tmp_path):
    a = generate_scenes(tmp_path / "a", count=3, seed=7)
    b = generate_scenes(tmp_path / "b", count=3, seed=7)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    formats = {Image.open(p).format for p in (a / "images").iterdir()}
    assert formats == {"JPEG", "PNG"}
