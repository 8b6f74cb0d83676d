import errno
import json
import time

import numpy as np
import pytest
import pyarrow.parquet as pq

from pipeline.coco import image_id, rebuild, write_panoptic_json
from pipeline.encode import read_panoptic_png
from pipeline.labels import Category
from pipeline.shards import (ShardOutput, _parquet_bytes, committed_count, committed_keys, iter_committed,
                             remove_uncommitted, write_shard)
from pipeline.storage import DamagedOutput, OutputStore
from schemas import tables

CATEGORIES = (Category(0, 1, "sky", False, (0, 0, 255), "stuff"), Category(1, 7, "disc", True, (255, 0, 0), "thing"))


def _batch(keys, errors=()):
    ids = np.zeros((4, 5), np.uint8)
    ids[:2] = 1
    ids[3, 3:] = 2
    n = len(keys)
    segs = json.dumps([[1, 0, 0.9, 10, 0, 0, 5, 2], [2, 1, 0.8, 2, 3, 3, 2, 1]])
    column = np.empty(n, dtype=object)
    column[:] = [ids] * n
    return {"key": np.asarray(keys), "uri": np.asarray([f"/in/{k}" for k in keys]),
            "width": np.full(n, 5), "height": np.full(n, 4), "segment_ids": column,
            "segments": np.asarray([segs] * n),
            "error_stage": np.asarray(["decode" if k in errors else "" for k in keys]),
            "error_type": np.asarray(["NotAnImage" if k in errors else "" for k in keys]),
            "error_message": np.asarray(["bad bytes" if k in errors else "" for k in keys]),
            "preview": np.zeros(n, dtype=bool)}


def test_shard_writes_pngs_tables_and_commits(tmp_path):
    store = OutputStore(str(tmp_path))
    status = write_shard(_batch(["a.jpg", "sub/b.png", "bad.jpg"], errors={"bad.jpg"}),
                         ShardOutput(store, CATEGORIES, "run1", "m"))
    assert status["ok"].tolist() == [True, True, False]
    assert read_panoptic_png((tmp_path / "panoptic/sub/b.png.png").read_bytes())[3, 4] == 2
    images = pq.read_table(tmp_path / "tables/images").to_pylist()
    assert sorted(r["key"] for r in images) == ["a.jpg", "sub/b.png"]
    assert images[0]["segments"][1] == {"id": 2, "category_id": 7, "label": "disc", "isthing": True,
                                        "score": np.float32(0.8), "area": 2, "bbox": [3, 3, 2, 1]}
    errors = pq.read_table(tmp_path / "tables/errors").to_pylist()
    assert errors == [{"key": "bad.jpg", "uri": "/in/bad.jpg", "stage": "decode", "error_type": "NotAnImage",
                       "message": "bad bytes", "run_id": "run1"}]
    assert committed_keys(store) == {"a.jpg", "sub/b.png", "bad.jpg"}


def test_errors_part_without_commit_record_is_ignored_and_removed(tmp_path):
    store = OutputStore(str(tmp_path))
    write_shard(_batch(["bad.jpg"], errors={"bad.jpg"}), ShardOutput(store, CATEGORIES, "r", "m"))
    (images_part,) = (tmp_path / "tables/images").iterdir()
    # as if killed between the errors part and the commit record, while writing the latter
    images_part.rename(images_part.with_name(images_part.name + ".1f2e3d.tmp"))
    assert committed_keys(store) == set()
    assert remove_uncommitted(store) == 1
    assert not list((tmp_path / "tables/errors").iterdir()) and not list((tmp_path / "tables/images").iterdir())


def test_every_shard_has_an_errors_part_and_only_those_with_rows_are_read(tmp_path, monkeypatch):
    """A query of tables/errors/*.parquet finds a table on every output; runs, which read the errors
    parts several times, skip the empty ones by their listed size; --retry-failed empties a part."""
    from pipeline.shards import forget_failures

    store = OutputStore(str(tmp_path))
    for keys in (["a.jpg", "b.jpg"], ["c.jpg"], ["bad.jpg", "d.jpg"]):
        write_shard(_batch(keys, errors={"bad.jpg"}), ShardOutput(store, CATEGORIES, "r", "m"))
    names = {p.name for p in (tmp_path / "tables/images").iterdir()}
    assert {p.name for p in (tmp_path / "tables/errors").iterdir()} == names and len(names) == 3
    fetched = []
    read_many = OutputStore.read_many
    monkeypatch.setattr(OutputStore, "read_many", lambda self, parts: fetched.extend(parts) or read_many(self, parts))
    assert committed_keys(store) == {"a.jpg", "b.jpg", "c.jpg", "bad.jpg", "d.jpg"}
    assert sum(p.startswith("tables/errors/") for p in fetched) == 1  # the part with a row
    assert forget_failures(store) == 1
    assert {p.name for p in (tmp_path / "tables/errors").iterdir()} == names  # emptied, not deleted
    assert pq.read_table(tmp_path / "tables/errors").num_rows == 0
    assert committed_keys(store) == {"a.jpg", "b.jpg", "c.jpg", "d.jpg"}


def test_coco_rebuild(tmp_path):
    store = OutputStore(str(tmp_path))
    write_shard(_batch(["a.jpg"]), ShardOutput(store, CATEGORIES, "r", "m"))
    write_shard(_batch(["b.jpg"]), ShardOutput(store, CATEGORIES, "r", "m"))
    totals = write_panoptic_json(store, CATEGORIES)
    data = json.loads((tmp_path / "coco/panoptic.json").read_text())
    assert [im["file_name"] for im in sorted(data["images"], key=lambda i: i["file_name"])] == ["a.jpg", "b.jpg"]
    assert {a["image_id"] for a in data["annotations"]} == {image_id("a.jpg"), image_id("b.jpg")}
    assert data["annotations"][0]["segments_info"][0]["category_id"] == 1
    assert [c["id"] for c in data["categories"]] == [1, 7]
    assert totals.images == 2 and totals.pixels == {1: 20, 7: 4} and totals.segments == {1: 2, 7: 2}


def test_coco_is_rebuilt_only_when_the_committed_parts_changed(tmp_path):
    store = OutputStore(str(tmp_path))
    out = ShardOutput(store, CATEGORIES, "r", "m")
    write_shard(_batch(["a.jpg"]), out)
    first = rebuild(store, CATEGORIES, instances=False)
    panoptic = tmp_path / "coco/panoptic.json"
    panoptic.write_text("as built")  # a marker: a rebuild would overwrite it
    again = rebuild(store, CATEGORIES, instances=False)  # a rerun that found nothing new
    assert panoptic.read_text() == "as built" and again == first and first.images == 1
    write_shard(_batch(["b.jpg"]), out)  # a new part
    assert rebuild(store, CATEGORIES, instances=False).images == 2 and panoptic.read_text() != "as built"
    # --retry-failed redoes a failed shard's keys: a part of the same name, with other contents
    write_shard(_batch(["c.jpg"], errors={"c.jpg"}), out)
    assert rebuild(store, CATEGORIES, instances=False).images == 2
    panoptic.write_text("as built")
    write_shard(_batch(["c.jpg"]), out)
    assert rebuild(store, CATEGORIES, instances=False).images == 3
    assert len(json.loads(panoptic.read_text())["images"]) == 3
    panoptic.unlink()  # or deleted by hand, or never asked for
    assert rebuild(store, CATEGORIES, instances=True).images == 3
    assert panoptic.exists() and (tmp_path / "coco/instances.json").exists()


def test_damaged_outputs_files_a_rerun_reads(tmp_path):
    """Written atomically, they are only damaged from outside: coco/'s cache is built again; a
    committed part that cannot be read is named, with what to do, instead of a traceback."""
    store = OutputStore(str(tmp_path))
    write_shard(_batch(["a.jpg"]), ShardOutput(store, CATEGORIES, "r", "m"))
    rebuild(store, CATEGORIES, instances=False)
    built = (tmp_path / "_state/coco.json").read_text()
    for damaged in ('{"source": "ab', built.replace('"images_by_run"', '"images_cy_run"')):  # cut off, a bit flipped
        (tmp_path / "_state/coco.json").write_text(damaged)
        assert rebuild(store, CATEGORIES, instances=False).images == 1
    (part,) = (tmp_path / "tables/images").iterdir()
    data = part.read_bytes()
    flipped = bytearray(data)
    flipped[33] ^= 1  # one bit of the keys' page: without the pages' CRCs, read as another key
    part.write_bytes(bytes(flipped))
    with pytest.raises(DamagedOutput, match=f"{part} cannot be read"):
        committed_keys(store)
    part.write_bytes(data[:8] + bytes(52) + data[60:])  # its data pages: Arrow raises a plain OSError
    with pytest.raises(DamagedOutput, match=f"{part} cannot be read .*Delete it, and the next run processes"):
        committed_keys(store)
    part.write_bytes(data[:100])  # cut off: its footer gone
    for read in (committed_count, committed_keys, lambda s: rebuild(s, CATEGORIES, instances=False)):
        with pytest.raises(DamagedOutput, match=f"{part} cannot be read .*Delete it, and the next run processes"):
            read(store)


def test_a_shard_written_again_overwrites_its_parts(tmp_path):
    """Ray runs a write task again when its worker dies after the commit: same keys, same parts."""
    store, out = OutputStore(str(tmp_path)), ShardOutput(OutputStore(str(tmp_path)), CATEGORIES, "r", "m")
    for _ in range(2):
        write_shard(_batch(["a.jpg", "bad.jpg"], errors={"bad.jpg"}), out)
    assert len(list((tmp_path / "tables/images").iterdir())) == 1
    assert len(list((tmp_path / "tables/errors").iterdir())) == 1
    assert committed_count(store) == 2


def test_coco_counts_a_key_committed_in_two_shards_once(tmp_path):
    """Two runs on one output at once can commit one key in two shards: the COCO files stay valid."""
    store = OutputStore(str(tmp_path))
    out = ShardOutput(store, CATEGORIES, "r", "m")
    write_shard(_batch(["a.jpg", "b.jpg"]), out)
    write_shard(_batch(["b.jpg", "c.jpg"]), out)
    totals = write_panoptic_json(store, CATEGORIES)
    data = json.loads((tmp_path / "coco/panoptic.json").read_text())
    assert sorted(im["file_name"] for im in data["images"]) == ["a.jpg", "b.jpg", "c.jpg"]
    assert sorted(a["image_id"] for a in data["annotations"]) == sorted(image_id(k) for k in ("a.jpg", "b.jpg", "c.jpg"))
    assert totals.images == 3 and totals.segments == {1: 3, 7: 3}


def test_coco_json_text_is_what_json_dumps_writes(tmp_path):
    """The annotations are formatted from the tables' columns, not through dicts: the text must
    be exactly json.dumps of the dicts, for any key, score and number of segments."""
    store = OutputStore(str(tmp_path))
    weird = 'we"ird\\ünïcode €.jpg'
    keys = [["a.jpg", weird, "none.jpg"], ["big.jpg", "a.jpg"], ["a.jpg"]]  # a.jpg: thrice
    segments = {weird: [], "none.jpg": [],
                "big.jpg": [{"id": i + 1, "category_id": 7 if i % 2 else 1, "label": "x", "isthing": bool(i % 2),
                             "score": 1 / (i + 3), "area": 2**40 + i, "bbox": [i, 2 * i, 3, 4]} for i in range(5)]}
    for part, names in enumerate(keys):
        rows = [{"key": k, "uri": k, "run_id": f"r{part}", "width": 9, "height": 8, "panoptic_png": f"panoptic/{k}.png",
                 "model": "m", "segments": segments.get(k, [{"id": 1, "category_id": 7, "label": "x",
                                                              "isthing": True, "score": 0.5, "area": 1,
                                                              "bbox": [0, 0, 1, 1]}]),
                 "semantic_png": None, "instances": None} for k in names]
        store.write_bytes(f"tables/images/{part}.parquet", _parquet_bytes(rows, tables.IMAGES))
    totals = write_panoptic_json(store, CATEGORIES)
    first = {}
    for table in iter_committed(store, "tables/images"):
        for row in table.to_pylist():
            first.setdefault(row["key"], row)
    rows = list(first.values())
    images = [{"id": image_id(r["key"]), "file_name": r["key"], "width": r["width"], "height": r["height"]}
              for r in rows]
    annotations = [{"image_id": image_id(r["key"]), "file_name": r["panoptic_png"].removeprefix("panoptic/"),
                    "segments_info": [{"id": s["id"], "category_id": s["category_id"], "area": s["area"],
                                       "bbox": s["bbox"], "iscrowd": 0, "score": s["score"]} for s in r["segments"]]}
                   for r in rows]
    expected = ('{"images": [\n' + ",\n".join(map(json.dumps, images)) + '],\n"annotations": [\n'
                + ",\n".join(map(json.dumps, annotations)) + '],\n"categories": '
                + json.dumps([c.coco() for c in CATEGORIES]) + "}\n")
    assert len(rows) == 4 and sum(len(a["segments_info"]) for a in annotations) == 6
    assert (tmp_path / "coco/panoptic.json").read_text() == expected
    assert totals.images == 4 and totals.images_by_run == {"r0": 3, "r1": 1}
    assert totals.segments == {1: 3, 7: 3} and totals.pixels == {1: 3 * 2**40 + 6, 7: 2 * 2**40 + 5}


def test_a_preview_whose_input_is_gone_is_skipped(tmp_path):
    """The input is re-read for its preview; if it vanished since, the result still commits."""
    store = OutputStore(str(tmp_path))
    batch = _batch(["gone.jpg"]) | {"preview": np.ones(1, dtype=bool)}
    status = write_shard(batch, ShardOutput(store, CATEGORIES, "r", "m"))
    assert status["ok"].tolist() == [True] and committed_keys(store) == {"gone.jpg"}
    assert not (tmp_path / "previews").exists()


def test_an_image_whose_output_name_is_taken_fails_alone_at_writing(tmp_path):
    """`a.jpg` writes the file panoptic/a.jpg.png, where `a.jpg.png/b.jpg` needs a folder: whichever
    comes second fails, with an error row; the rest of the shard commits."""
    store = OutputStore(str(tmp_path))
    for keys, clashing in ((["a.jpg", "a.jpg.png/b.jpg", "c.jpg"], "a.jpg.png/b.jpg"),
                           (["x.jpg.png/y.jpg", "x.jpg"], "x.jpg")):
        status = write_shard(_batch(keys), ShardOutput(store, CATEGORIES, "run1", "m"))
        assert status["ok"].tolist() == [key != clashing for key in keys]
    errors = pq.read_table(tmp_path / "tables/errors").to_pylist()
    assert [(e["key"], e["stage"], e["error_type"]) for e in errors] == [
        ("a.jpg.png/b.jpg", "write", "FileExistsError"), ("x.jpg", "write", "IsADirectoryError")]
    assert all(e["message"].startswith("another input's output has this name") for e in errors)
    assert committed_keys(store) == {"a.jpg", "a.jpg.png/b.jpg", "c.jpg", "x.jpg.png/y.jpg", "x.jpg"}
    assert sorted(r["key"] for r in pq.read_table(tmp_path / "tables/images").to_pylist()) == [
        "a.jpg", "c.jpg", "x.jpg.png/y.jpg"]


def test_an_image_whose_output_name_the_file_system_refuses_fails_alone(tmp_path, monkeypatch):
    """exFAT, FAT and SMB refuse `?` or `:` in names with EINVAL (simulated: this machine mounts none of them)."""
    store = OutputStore(str(tmp_path))
    write = OutputStore.write_bytes

    def refusing(self, path, data, seconds=None):
        if ":" in path:
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return write(self, path, data, seconds)

    monkeypatch.setattr(OutputStore, "write_bytes", refusing)
    status = write_shard(_batch(["a:b.jpg", "c.jpg"]), ShardOutput(store, CATEGORIES, "run1", "m"))
    assert status["ok"].tolist() == [False, True]
    (error,) = pq.read_table(tmp_path / "tables/errors").to_pylist()
    assert (error["key"], error["stage"], error["error_type"]) == ("a:b.jpg", "write", "OSError")
    assert error["message"].startswith("this file system refuses a character of the output's name")


def test_a_preview_whose_name_is_taken_is_skipped_and_the_image_stands(tmp_path):
    """previews/<key>.jpg can clash where panoptic/<key>.png cannot: `a.jpg` and `a.jpg.jpg/b.jpg`."""
    from PIL import Image

    (tmp_path / "in" / "a.jpg.jpg").mkdir(parents=True)
    for key in ("a.jpg", "a.jpg.jpg/b.jpg"):
        Image.new("RGB", (5, 4), (10, 20, 30)).save(tmp_path / "in" / key, format="JPEG")
    store = OutputStore(str(tmp_path / "out"))
    batch = _batch(["a.jpg", "a.jpg.jpg/b.jpg"])
    batch["uri"] = np.asarray([str(tmp_path / "in" / k) for k in batch["key"]])
    batch["preview"] = np.ones(2, dtype=bool)
    status = write_shard(batch, ShardOutput(store, CATEGORIES, "run1", "m"))
    assert status["ok"].tolist() == [True, True]
    assert (tmp_path / "out/previews/a.jpg.jpg").is_file()  # the first preview; the second had no room
    assert (tmp_path / "out/panoptic/a.jpg.jpg/b.jpg.png").is_file()


def test_a_shard_of_a_leased_run_commits_only_while_its_run_holds_the_output(tmp_path):
    """A write task that outlived its driver (kill -9) or its run's lease must not commit images
    that the run now holding the output lists as pending, nor those of a run that has finished;
    nor once its own lease is so old that another run could find it expired before the commit lands."""
    from pipeline.lease import CLOCK_MARGIN_SECONDS, EXPIRES_SECONDS, LEASE

    store = OutputStore(str(tmp_path))
    lease = {"started": "now", "host": "h", "pid": 1}
    leased = ShardOutput(store, CATEGORIES, "run1", "m", leased=True)
    unseen = EXPIRES_SECONDS - CLOCK_MARGIN_SECONDS + 1  # renewed this long ago: about to expire for another run
    for holder, age in (("run2", 0), (None, 0), ("run1", unseen)):
        if holder:
            store.write_bytes(LEASE, json.dumps(lease | {"run_id": holder, "renewed": time.time() - age}).encode())
        else:
            store.delete(LEASE)
        status = write_shard(_batch(["a.jpg", "bad.jpg"], errors={"bad.jpg"}), leased)
        assert committed_keys(store) == set() and not (tmp_path / "tables").exists()
        assert not (tmp_path / "panoptic").exists()
        assert status["ok"].tolist() == [False, False] and set(status["error_type"]) == {"NotCommitted"}
    store.write_bytes(LEASE, json.dumps(lease | {"run_id": "run1", "renewed": time.time() - unseen + 5}).encode())
    write_shard(_batch(["a.jpg", "bad.jpg"], errors={"bad.jpg"}), leased)
    assert committed_keys(store) == {"a.jpg", "bad.jpg"}
    store.delete(LEASE)  # a tool writing shards outside a run: no lease involved
    write_shard(_batch(["c.jpg"]), ShardOutput(store, CATEGORIES, "tool", "m"))
    assert committed_keys(store) == {"a.jpg", "bad.jpg", "c.jpg"}


def test_a_shards_writes_get_only_the_time_its_runs_lease_surely_holds(tmp_path, monkeypatch):
    """Each write of a leased shard is given until its lease could be found expired (less the
    clocks' margin), and one cut off by that commits nothing: a commit landing later could follow
    a takeover by another run, which lists the shard's images as pending."""
    from pipeline.lease import CLOCK_MARGIN_SECONDS, EXPIRES_SECONDS, LEASE
    from pipeline.remote import StorageTimeout

    store = OutputStore(str(tmp_path))
    store.write_bytes(LEASE, json.dumps({"run_id": "run1", "started": "now", "host": "h", "pid": 1,
                                         "renewed": time.time() - (EXPIRES_SECONDS - CLOCK_MARGIN_SECONDS - 5)}).encode())
    given, write = [], OutputStore.write_bytes

    def recorded(self, path, data, seconds=None):
        given.append((path.split("/")[0], seconds))
        if hang and path.startswith("tables/images"):
            raise StorageTimeout("a request to the storage endpoint did not finish")
        return write(self, path, data, seconds)

    monkeypatch.setattr(OutputStore, "write_bytes", recorded)
    leased = ShardOutput(store, CATEGORIES, "run1", "m", leased=True)
    for hang in (True, False):
        given.clear()
        status = write_shard(_batch(["a.jpg", "bad.jpg"], errors={"bad.jpg"}), leased)
        assert [where for where, _ in given] == ["panoptic", "tables", "tables"]  # the PNG, errors, images parts
        assert all(3 < seconds <= 5 for _, seconds in given), given
        if hang:
            assert set(status["error_type"]) == {"NotCommitted"} and committed_keys(store) == set()
    assert status["ok"].tolist() == [True, False] and committed_keys(store) == {"a.jpg", "bad.jpg"}


def test_a_shard_slower_than_one_lease_period_commits_while_its_run_renews_the_lease(tmp_path, monkeypatch):
    """The fence read at the shard's start passes while it writes; the renewals move it on."""
    from pipeline import lease, shards

    monkeypatch.setattr(lease, "EXPIRES_SECONDS", 1.6)
    monkeypatch.setattr(lease, "CLOCK_MARGIN_SECONDS", 0.4)  # writes must land 1.2 s after a renewal
    monkeypatch.setattr(lease, "RENEW_SECONDS", 0.1)
    monkeypatch.setattr(shards, "REQUEST_SECONDS", 1.0)  # so: the lease is read again within 1 s of its fence
    monkeypatch.setattr(shards, "FENCE_READ_SECONDS", 0.1)
    monkeypatch.setattr(lease, "SETTLE_SECONDS", 0.0)
    store, write = OutputStore(str(tmp_path)), OutputStore.write_bytes

    def slow(self, path, data, seconds=None):
        if path.startswith("panoptic/"):
            time.sleep(0.4)
        return write(self, path, data, seconds)

    monkeypatch.setattr(OutputStore, "write_bytes", slow)
    keys = [f"{i}.jpg" for i in range(6)]  # 2.4 s of PNGs: twice the fence
    with lease.hold_lease(store, "run1", "now") as still_held:
        status = write_shard(_batch(keys), ShardOutput(store, CATEGORIES, "run1", "m", leased=True))
        still_held()
    assert status["ok"].all() and committed_keys(store) == set(keys)


def test_a_lease_unread_mid_shard_keeps_the_fence_read_before(tmp_path, monkeypatch):
    """A failed read of the lease between a shard's writes is no reason to fail the task: the
    fence already read still holds. (The read before the commit raises: see write_shard.)"""
    from pipeline import shards
    from pipeline.lease import LEASE

    store = OutputStore(str(tmp_path))
    store.write_bytes(LEASE, json.dumps({"run_id": "run1", "started": "now", "host": "h", "pid": 1,
                                         "renewed": time.time()}).encode())
    fence = shards._Fence(ShardOutput(store, CATEGORIES, "run1", "m", leased=True))
    fence.at, fence.read_at = time.time() + 3, time.monotonic() - shards.FENCE_READ_SECONDS

    def unreachable(*_):
        raise OSError("no route to the store")

    monkeypatch.setattr(shards, "write_deadline", unreachable)
    assert 2 < fence.seconds() <= 3
    with pytest.raises(OSError):
        fence.read()
