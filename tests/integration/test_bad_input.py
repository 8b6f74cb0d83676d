"""Bad input never stops the job and is never lost; unusual but valid images are segmented."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.model import BUNDLED_DIR
from pipeline.run import RunConfig, run
from pipeline.scenes import scene
from tests.conftest import bomb_png
from tests.integration.conftest import images_table, segment_maps

FAKE_SECRET = "zz-FAKE-secret-Qm3RtY8u-do-not-print"
GOOD = ["scene_0001.jpg", "scene_0002.jpg", "scene_0003.png"]


def _save(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _exif_rotated(rgb: np.ndarray) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(Image.fromarray(rgb), "JPEG", exif=exif.tobytes(), quality=92)


def unusual_files() -> dict[str, bytes]:
    rgb = scene(11, 0).image
    image = Image.fromarray(rgb)
    return {
        "gray.png": _save(image.convert("L"), "PNG"),
        "palette.png": _save(image.convert("P"), "PNG"),
        "rgba.png": _save(image.convert("RGBA"), "PNG"),
        "la.png": _save(image.convert("LA"), "PNG"),
        "cmyk.jpg": _save(image.convert("CMYK"), "JPEG"),
        "deep16.png": _save(Image.fromarray(rgb[..., 1].astype(np.uint16) * 257), "PNG"),
        "rotated.jpg": _exif_rotated(rgb),
        "progressive.jpg": _save(image, "JPEG", progressive=True),
        "image.webp": _save(image, "WEBP"),
        "image.bmp": _save(image, "BMP"),
        "image.tiff": _save(image, "TIFF"),
        "name with spaces é ü.jpg": _save(image, "JPEG"),
    }


BROKEN = {  # file name -> (stage, error_type)
    "empty.jpg": (b"", ("decode", "EmptyFile")),
    "truncated.jpg": (None, ("decode", None)),
    "notes.jpg": (b"this is text, not a JPEG\n" * 20, ("decode", "NotAnImage")),
    "bomb.png": (None, ("decode", "TooManyPixels")),
    "tiny.png": (None, ("preprocess", "TooSmall")),
}


def broken_files() -> dict[str, bytes]:
    files = {name: data for name, (data, _) in BROKEN.items() if data is not None}
    files["truncated.jpg"] = _save(Image.fromarray(scene(11, 1).image), "JPEG")[:3000]
    files["bomb.png"] = bomb_png()
    files["tiny.png"] = _save(Image.new("RGB", (1, 1)), "PNG")
    return files


@pytest.fixture(scope="module")
def runs(ray_runtime, tmp_path_factory):
    samples = BUNDLED_DIR.parent / "samples"
    clean_in, mixed_in = tmp_path_factory.mktemp("clean_in"), tmp_path_factory.mktemp("mixed_in")
    for name in GOOD:
        shutil.copy(samples / name, clean_in / name)
        shutil.copy(samples / name, mixed_in / name)
    for name, data in {**unusual_files(), **broken_files()}.items():
        (mixed_in / name).write_bytes(data)
    clean, mixed = tmp_path_factory.mktemp("clean"), tmp_path_factory.mktemp("mixed")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKEFORTESTS0000")
    lines: list[str] = []
    run(RunConfig(input=str(clean_in), output=str(clean)), progress=lines.append)
    run(RunConfig(input=str(mixed_in), output=str(mixed), max_error_ratio=0.9), progress=lines.append)
    monkeypatch.undo()
    return clean, mixed, lines


def test_every_broken_file_is_an_error_row(runs):
    _, mixed, _ = runs
    errors = {r["key"]: r for r in pq.read_table(mixed / "tables" / "errors").to_pylist()}
    assert set(errors) == set(BROKEN)
    for name, (_, (stage, error_type)) in BROKEN.items():
        assert errors[name]["stage"] == stage, errors[name]
        assert errors[name]["message"]
        if error_type:
            assert errors[name]["error_type"] == error_type, errors[name]


def test_unusual_valid_images_are_segmented(runs):
    _, mixed, _ = runs
    rows = {r["key"]: r for r in images_table(mixed)}
    assert set(rows) == set(GOOD) | set(unusual_files())
    height, width = scene(11, 0).image.shape[:2]
    for name in unusual_files():
        assert len(rows[name]["segments"]) >= 2, name
        expected = (height, width) if name != "rotated.jpg" else (width, height)
        assert (rows[name]["height"], rows[name]["width"]) == expected, name
    assert (mixed / "panoptic" / "name with spaces é ü.jpg.png").is_file()


def test_good_images_are_unaffected_by_bad_neighbours(runs):
    clean, mixed, _ = runs
    clean_maps, mixed_maps = segment_maps(clean), segment_maps(mixed)
    for name in GOOD:
        assert np.array_equal(clean_maps[name], mixed_maps[name]), name
        assert (clean / "panoptic" / f"{name}.png").read_bytes() == (mixed / "panoptic" / f"{name}.png").read_bytes()


def test_report_counts_errors(runs):
    import json

    _, mixed, lines = runs
    report = json.loads((mixed / "report.json").read_text())
    assert report["run"]["failed"] == len(BROKEN)
    assert report["dataset"]["errors"] == len(BROKEN)
    assert report["run"]["error_types"]["TooManyPixels"] == 1
    # the console says why and where to look, after the done line of the mixed run
    (summary,) = [line for line in lines if line.startswith("failed images by error: ")]
    for kind, n in report["run"]["error_types"].items():
        assert f"{kind} {n}" in summary
    assert f"{mixed}/tables/errors" in summary


def test_no_secret_in_any_output_or_log(runs):
    clean, mixed, lines = runs
    for root in (clean, mixed):
        for path in root.rglob("*"):
            if path.is_file():
                assert FAKE_SECRET.encode() not in path.read_bytes(), path
    assert not any(FAKE_SECRET in line for line in lines)
