import os

import pytest

from pipeline.local_paths import FOLDER, NotOnEveryNode, absolute, check_every_node_sees, probes, seen


def test_absolute_resolves_local_paths_against_this_folder_and_leaves_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute("out") == str(tmp_path / "out")
    assert absolute("./a/../out/") == str(tmp_path / "out")
    assert absolute("file://out") == str(tmp_path / "out")
    assert absolute("file:///data/out") == "/data/out"
    assert absolute("~/out") == os.path.expanduser("~/out")
    assert absolute("s3://bucket/out") == "s3://bucket/out"
    assert absolute("https://host/x.jpg?id=1") == "https://host/x.jpg?id=1"
    assert absolute("simplecache::/data/x.png") == "simplecache::/data/x.png"


def test_seen_tells_files_by_size_folders_and_nothing(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"12345")
    assert seen([str(tmp_path / "a.jpg"), str(tmp_path), str(tmp_path / "missing")]) == [5, FOLDER, None]


def test_a_node_that_sees_otherwise_is_named_with_the_flag_and_both_views(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"12345")
    checks = probes([("--input", str(tmp_path / "in")), ("--input", str(tmp_path / "in" / "a.jpg"))])
    same = seen([c.path for c in checks])
    check_every_node_sees(checks, {"10.0.0.1 (aaaa)": same, "10.0.0.2 (bbbb)": same})

    (tmp_path / "in" / "a.jpg").write_bytes(b"123")  # another copy of the input, another file
    with pytest.raises(NotOnEveryNode, match=r"^--input: node 10.0.0.2 \(bbbb\) sees a file of 3 bytes at .*a\.jpg, "
                                             r"where the driver sees a file of 5 bytes\."):
        check_every_node_sees(checks, {"10.0.0.1 (aaaa)": same, "10.0.0.2 (bbbb)": seen([c.path for c in checks])})
    with pytest.raises(NotOnEveryNode, match="sees nothing at .*, where the driver sees a folder"):
        check_every_node_sees(checks, {"10.0.0.3 (cccc)": [None, None]})
