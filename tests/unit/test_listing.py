from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.listing import InputError, iter_inputs, safe_key


@pytest.mark.parametrize(
    "relative, expected",
    [
        ("a/b.jpg", "a/b.jpg"),
        ("../../etc/passwd.jpg", "%2E%2E/%2E%2E/etc/passwd.jpg"),
        ("/abs.jpg", "%00/abs.jpg"),
        ("a\\..\\b.jpg", "a%5C..%5Cb.jpg"),
        ("100%.png", "100%25.png"),
        ("x/./y.png", "x/%2E/y.png"),
        ("name with spaces é.jpg", "name with spaces é.jpg"),
        ("tab\there.jpg", "tab%09here.jpg"),
    ],
)
def test_safe_key_never_climbs_out(relative, expected):
    key = safe_key(relative)
    assert key == expected
    assert not key.startswith("/")
    assert ".." not in key.split("/") and "." not in key.split("/")


def test_folder_listing_keeps_subfolders_and_skips_non_images(image_dir):
    pairs = dict(iter_inputs(str(image_dir)))
    assert "notes.txt" not in pairs
    assert len(pairs) == 6
    assert pairs["sub dir/img_5.png"] == str(image_dir / "sub dir" / "img_5.png")
    assert all(Path(uri).is_file() for uri in pairs.values())


def test_manifests(tmp_path, image_dir):
    uris = [str(p) for p in sorted(image_dir.glob("*.jpg"))]
    (tmp_path / "list.txt").write_text("# images\n" + "\n".join(uris) + "\n")
    (tmp_path / "list.csv").write_text("uri,label\n" + "\n".join(f"{u},x" for u in uris) + "\n")
    pq.write_table(pa.table({"uri": uris}), tmp_path / "list.parquet")
    for name in ("list.txt", "list.csv", "list.parquet"):
        pairs = list(iter_inputs(str(tmp_path / name)))
        assert [u for _, u in pairs] == uris, name
        assert all(not k.startswith("/") for k, _ in pairs)


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list(iter_inputs(str(tmp_path / "nope")))
