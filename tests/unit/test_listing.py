from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.failures import ImageFailure
from pipeline.listing import InputError, iter_inputs, safe_key
from pipeline.read import read_bytes
from pipeline.remote import StorageConfig


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
        ("x?versionId=1.jpg", "x%3FversionId=1.jpg"),  # s3fs cuts S3 paths there
        ("img?id=1", "img?id=1"),
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
    (tmp_path / "list.txt").write_text("\n".join(uris) + "\n")
    (tmp_path / "list.csv").write_text("uri,label\n" + "\n".join(f"{u},x" for u in uris) + "\n")
    pq.write_table(pa.table({"uri": uris}), tmp_path / "list.parquet")
    for name in ("list.txt", "list.csv", "list.parquet"):
        pairs = list(iter_inputs(str(tmp_path / name)))
        assert [u for _, u in pairs] == uris, name
        assert all(not k.startswith("/") for k, _ in pairs)


def test_txt_and_csv_manifests_read_past_a_byte_order_mark_and_a_leading_hash_is_a_name(tmp_path, image_dir):
    (tmp_path / "#1.jpg").write_bytes((image_dir / "img_0.jpg").read_bytes())  # relative entries: a comment?
    (tmp_path / "list.txt").write_bytes(b"\xef\xbb\xbf#1.jpg\n" + f"{image_dir}/img_1.jpg\n".encode())
    (tmp_path / "list.csv").write_bytes(b"\xef\xbb\xbfuri\n#1.jpg\n")
    assert [uri for _, uri in iter_inputs(str(tmp_path / "list.txt"))] == [f"{tmp_path}/#1.jpg", f"{image_dir}/img_1.jpg"]
    assert [uri for _, uri in iter_inputs(str(tmp_path / "list.csv"))] == [f"{tmp_path}/#1.jpg"]


def test_a_missing_input_or_a_file_that_is_no_input_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list(iter_inputs(str(tmp_path / "nope")))
    (tmp_path / "labels.json").write_text("{}")
    with pytest.raises(InputError, match=r"labels.json is a file that is neither an image \(.*\.jpg.*\) nor a manifest"):
        list(iter_inputs(str(tmp_path / "labels.json")))


def test_unprintable_characters_never_share_a_key():
    assert safe_key("\x180E.jpg") != safe_key("\u180e.jpg")
    assert safe_key("\u180e.jpg") == "%E1%A0%8E.jpg"


def test_csv_manifests_with_and_without_header(tmp_path):
    urls = ["https://cdn.example.com/img?id=1", "https://cdn.example.com/img?id=2", "images/3.jpg"]
    (tmp_path / "bare.csv").write_text("\n" + "\n".join(f"{u},cat" for u in urls) + "\n")  # blank first line
    (tmp_path / "named.csv").write_text("label,uri\n" + "\n".join(f"cat,{u}" for u in urls) + "\n")
    (tmp_path / "other.csv").write_text("path\n" + "\n".join(urls) + "\n")
    (tmp_path / "LIST.CSV").write_text("uri,label\n" + "\n".join(f"{u},cat" for u in urls) + "\n")
    pq.write_table(pa.table({"uri": urls}), tmp_path / "LIST.PARQUET")
    expected = urls[:2] + [str(tmp_path / "images" / "3.jpg")]  # relative to the manifest
    for name in ("bare.csv", "named.csv", "other.csv", "LIST.CSV", "LIST.PARQUET"):
        assert [uri for _, uri in iter_inputs(str(tmp_path / name))] == expected, name


def test_manifest_keys_keep_what_names_the_object():
    uris = ["https://cdn.example.com/img?id=1", "https://cdn.example.com/img?id=2#top",
            "s3://bucket/a#1.jpg", "s3://bucket/a#2.jpg", "/data/x?.png"]
    from pipeline.listing import _manifest_key

    assert [_manifest_key(u) for u in uris] == ["cdn.example.com/img?id=1", "cdn.example.com/img?id=2",
                                               "bucket/a#1.jpg", "bucket/a#2.jpg", "data/x?.png"]


def test_an_output_inside_the_input_is_not_listed(tmp_path, image_dir):
    import shutil

    root = tmp_path / "in"
    shutil.copytree(image_dir, root)
    (root / "out" / "panoptic").mkdir(parents=True)
    (root / "out" / "panoptic" / "img_0.jpg.png").write_bytes((image_dir / "img_0.jpg").read_bytes())
    (root / "outside.jpg").write_bytes((image_dir / "img_0.jpg").read_bytes())
    keys = {key for key, _ in iter_inputs(str(root), output=str(root / "out"))}
    assert "outside.jpg" in keys and not any(k.startswith("out/") for k in keys)
    assert "out/panoptic/img_0.jpg.png" in {key for key, _ in iter_inputs(str(root))}
    # once it is an output of this pipeline (it has its settings), no run lists it: a new output
    # for another model beside it must not segment the old one's PNGs and previews
    (root / "out" / "_state").mkdir()
    (root / "out" / "_state" / "settings.json").write_text("{}")
    keys = {key for key, _ in iter_inputs(str(root))}
    assert "outside.jpg" in keys and not any(k.startswith("out/") for k in keys)
    assert {key for key, _ in iter_inputs(str(root / "out"))} == {"panoptic/img_0.jpg.png"}  # named itself


def test_a_single_image_is_an_input_and_names_with_double_colons_are_read(tmp_path, image_dir):
    from pipeline.read import read_bytes
    from pipeline.remote import StorageConfig

    odd = tmp_path / "a::b.jpg"
    odd.write_bytes((image_dir / "img_0.jpg").read_bytes())
    assert list(iter_inputs(str(odd))) == [("a::b.jpg", str(odd))]
    assert read_bytes(str(odd), StorageConfig()) == odd.read_bytes()


def test_relative_manifest_entries_are_relative_to_the_manifest(tmp_path, image_dir, monkeypatch):
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "list.txt").write_text(f"../{image_dir.name}/img_0.jpg\n")
    (tmp_path / image_dir.name).symlink_to(image_dir)
    monkeypatch.chdir(image_dir)  # a worker's working directory has nothing to do with the manifest
    ((key, uri),) = iter_inputs(str(tmp_path / "lists" / "list.txt"))
    assert uri == str(tmp_path / image_dir.name / "img_0.jpg") and Path(uri).read_bytes()
    assert key == uri.lstrip("/")  # keyed by the file it names


def test_symlinked_folders_are_followed_once(tmp_path, image_dir):
    root = tmp_path / "in"
    root.mkdir()
    (root / "linked").symlink_to(image_dir)
    (root / "linked_again").symlink_to(image_dir)  # the same folder under a second name: listed once
    (root / "loop").symlink_to(root)  # a cycle ends
    keys = [key for key, _ in iter_inputs(str(root))]
    assert "linked/img_0.jpg" in keys and "linked/sub dir/img_5.png" in keys
    assert len(keys) == len(set(keys)) == len([k for k in keys if k.startswith("linked/")])


def test_long_names_get_keys_an_output_can_be_named_after():
    first, second = safe_key("a/" + "x" * 300 + "1.jpg"), safe_key("a/" + "x" * 300 + "2.jpg")
    assert first != second and first == safe_key("a/" + "x" * 300 + "1.jpg")  # distinct, stable
    for key in (first, second, safe_key("漢" * 100 + ".png")):
        name = key.split("/")[-1]
        assert len(name.encode()) <= 200 and name.endswith((".jpg", ".png")) and "~" in name
    assert "~" in safe_key("x" * 197 + ".jpg")  # 201 bytes
    assert safe_key("y" * 196 + ".jpg") == "y" * 196 + ".jpg"  # 200 bytes: kept as it is


def test_a_local_name_that_is_not_utf8_is_listed_readably(tmp_path):
    import os

    os.mkdir(os.fsencode(tmp_path / "in"))
    open(os.fsencode(tmp_path / "in") + b"/caf\xe9.jpg", "wb").close()
    ((key, uri),) = iter_inputs(str(tmp_path / "in"))
    assert key == "caf%E9.jpg"
    assert uri.encode("utf-8") and uri.endswith("caf\\xe9.jpg")  # the tables hold UTF-8 only
    (tmp_path / "in" / "caf\\xe9.jpg").write_bytes(b"another file, named as the escaped text literally")
    with pytest.raises(ImageFailure) as failed:  # not read in its place, nor "missing"
        read_bytes(uri, StorageConfig())
    assert (failed.value.error_type, failed.value.message) == (
        "UnsupportedName", "the file's path is not UTF-8 (its name, or a folder's), which the tables cannot hold "
        "(shown with its bytes escaped): rename it")


def test_keys_root_is_the_resolved_folder_the_keys_are_relative_to(tmp_path, image_dir):
    from pipeline.listing import keys_root

    (tmp_path / "link").symlink_to(image_dir)
    (tmp_path / "list.txt").write_text(str(next(image_dir.glob("*.jpg"))) + "\n")
    root = str(image_dir.resolve())
    assert keys_root(str(image_dir)) == keys_root(f"{image_dir}/./") == keys_root(str(tmp_path / "link")) == root
    assert keys_root(str(next(image_dir.glob("*.jpg")))) == root  # a single image: its folder
    assert keys_root(str(tmp_path / "list.txt")) == "manifest"
    assert keys_root("s3://bucket/images/") == "s3://bucket/images"


def test_an_output_inside_the_input_is_found_however_it_is_spelt(tmp_path, image_dir):
    import shutil

    root = tmp_path / "in"
    shutil.copytree(image_dir, root)
    (root / "out").mkdir()
    (root / "out" / "img_0.jpg.png").write_bytes((image_dir / "img_0.jpg").read_bytes())
    (tmp_path / "link").symlink_to(root / "out")
    for output in (f"{root}/./out", f"{root}//out/", str(tmp_path / "link")):
        keys = {key for key, _ in iter_inputs(f"{root}/.", output=output)}
        assert len(keys) == 6 and not any(k.startswith("out/") for k in keys), output
    with pytest.raises(InputError, match="is the input folder itself"):
        list(iter_inputs(str(root), output=f"{root}/"))


@pytest.mark.parametrize("inner", ["previews", "panoptic/sub", "_state", "coco"])
def test_an_input_in_a_folder_runs_write_is_refused(tmp_path, image_dir, inner):
    """--overwrite would delete such an input before the run lists it (and a run would read its own outputs)."""
    import shutil

    output = tmp_path / "out"
    shutil.copytree(image_dir, output / inner)
    with pytest.raises(InputError, match=f"the input lies in {inner.split('/')[0]}/ of --output {output}"):
        list(iter_inputs(str(output / inner), output=str(output)))
    with pytest.raises(InputError, match="the input lies in"):  # a single image there too
        list(iter_inputs(str(output / inner / "img_0.jpg"), output=str(output)))
    shutil.copytree(image_dir, output / "raw")  # beside the outputs: an input like any other
    assert len(list(iter_inputs(str(output / "raw"), output=str(output)))) == 6


def test_relative_entries_of_manifests_in_two_folders_are_two_images(tmp_path, image_dir):
    keys = set()
    for day in ("day1", "day2"):
        (tmp_path / day).mkdir()
        (tmp_path / day / "x.jpg").write_bytes((image_dir / "img_0.jpg").read_bytes())
        (tmp_path / day / "list.txt").write_text("x.jpg\n")
        ((key, uri),) = iter_inputs(str(tmp_path / day / "list.txt"))
        assert uri == str(tmp_path / day / "x.jpg") and key == uri.lstrip("/")
        keys.add(key)
    assert len(keys) == 2


def test_a_parquet_manifest_whose_uri_column_is_not_text_is_an_input_error(tmp_path):
    pq.write_table(pa.table({"id": [1, 2], "path": ["a.jpg", "b.jpg"]}), tmp_path / "list.parquet")
    with pytest.raises(InputError, match=r"column 'id' holds int64, not URIs"):
        list(iter_inputs(str(tmp_path / "list.parquet")))
    for column in (pa.array(["a.jpg", "b.jpg"]).dictionary_encode(), pa.array(["a.jpg", "b.jpg"], pa.large_string())):
        pq.write_table(pa.table({"uri": column}), tmp_path / "list.parquet")  # a pandas category column, say
        assert [key for key, _ in iter_inputs(str(tmp_path / "list.parquet"))] == [
            f"{str(tmp_path).lstrip('/')}/a.jpg", f"{str(tmp_path).lstrip('/')}/b.jpg"]


def test_a_sub_folder_that_cannot_be_listed_is_an_input_whose_read_fails_not_skipped_unseen(tmp_path):
    """os.walk skips a folder it may not list, and its images would go unseen: it is listed as an
    input of its own, whose read fails (its error row), and the run goes on. Root reads any
    folder, so the listing runs without the capability that allows it (setpriv) when root."""
    import os
    import shutil
    import subprocess
    import sys

    (tmp_path / "in" / "locked").mkdir(parents=True)
    (tmp_path / "in" / "a.jpg").write_bytes(b"x")
    (tmp_path / "in" / "locked" / "b.jpg").write_bytes(b"x")
    (tmp_path / "in" / "z.jpg").write_bytes(b"x")
    (tmp_path / "in" / "locked").chmod(0)
    script = ("from pipeline.listing import iter_inputs; from pipeline.read import read_bytes; "
              "from pipeline.remote import StorageConfig; from pipeline.failures import ImageFailure\n"
              f"listed = list(iter_inputs({str(tmp_path / 'in')!r})); print([key for key, _ in listed])\n"
              "try:\n    read_bytes(dict(listed)['locked'], StorageConfig())\n"
              "except ImageFailure as failure:\n    print(failure.stage, failure.error_type)")
    command = [sys.executable, "-c", script]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root reads every folder, and setpriv is not here to drop that capability")
        command = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *command]
    try:
        listed = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    finally:
        (tmp_path / "in" / "locked").chmod(0o755)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == ["['a.jpg', 'z.jpg', 'locked']", "read PermissionError"]
