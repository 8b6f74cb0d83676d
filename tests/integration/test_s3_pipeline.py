"""The job S3 -> S3 against a real S3 server gives the same outputs as a local run."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.encode import read_panoptic_png
from pipeline.model import BUNDLED_DIR
from tests.s3_server import PUBLIC_BUCKET

JOB = Path(__file__).resolve().parents[2] / "jobs" / "segment_bucket.py"
SAMPLES = BUNDLED_DIR.parent / "samples"
NAMES = sorted(p.name for p in SAMPLES.iterdir())[:5]
RUN_METADATA = {"run_id", "uri", "model"}


def run_job(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(JOB), *args], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def s3_runs(s3_server, tmp_path_factory):
    fs = s3_server.filesystem()
    fs.mkdir(PUBLIC_BUCKET)
    fs.mkdir("results")
    fs.mkdir("models")
    for name in NAMES:
        fs.put(str(SAMPLES / name), f"pictures/in/{name}")
    for path in BUNDLED_DIR.iterdir():
        fs.put(str(path), f"models/bundled/{path.name}")
    local_in, versioned = tmp_path_factory.mktemp("local_in"), tmp_path_factory.mktemp("versioned")
    for name in NAMES:
        (local_in / name).write_bytes((SAMPLES / name).read_bytes())
    for i, name in enumerate(NAMES[:2]):  # s3fs cuts S3 paths at "?versionId="
        (versioned / f"x?versionId={i}.jpg").write_bytes((SAMPLES / name).read_bytes())
    fs.pipe("pictures/manifest.txt", "\n".join([*(f"s3://pictures/in/{n}" for n in NAMES[:3]),
                                                *sorted(str(p) for p in versioned.iterdir()),
                                                f"s3://pictures/in/{NAMES[0]}?versionId=1"]).encode())
    local_out, cache = tmp_path_factory.mktemp("local_out"), tmp_path_factory.mktemp("model_cache")
    env = s3_server.env() | {"PANOPTIC_MODEL_CACHE": str(cache)}
    # a public input bucket read without credentials; the private model and label map are read with them
    s3_log = run_job(["--input", f"s3://{PUBLIC_BUCKET}/in", "--output", "s3://results/run1", "--anonymous",
                      "--model", "s3://models/bundled", "--label-map", "s3://models/bundled/label_map.json"], env)
    run_job(["--input", str(local_in), "--output", str(local_out)], {})
    manifest_log = run_job(["--input", "s3://pictures/manifest.txt", "--output", "s3://results/manifest"], env)
    return fs, local_out, cache, s3_log, manifest_log


def _table(data: bytes) -> list[dict]:
    return pq.read_table(io.BytesIO(data)).to_pylist()


def test_s3_outputs_equal_local_outputs(s3_runs):
    fs, local_out, _, _, _ = s3_runs
    s3_rows = [r for p in fs.find("results/run1/tables/images") for r in _table(fs.cat(p))]
    local_rows = pq.read_table(local_out / "tables" / "images").to_pylist()
    strip = lambda rows: sorted(({k: v for k, v in r.items() if k not in RUN_METADATA} for r in rows),
                                key=lambda r: r["key"])
    assert len(s3_rows) == len(NAMES) and strip(s3_rows) == strip(local_rows)
    assert all(len(r["segments"]) >= 2 for r in s3_rows)
    for name in NAMES:
        s3_ids = read_panoptic_png(fs.cat(f"results/run1/panoptic/{name}.png"))
        assert np.array_equal(s3_ids, read_panoptic_png((local_out / "panoptic" / f"{name}.png").read_bytes()))
    coco = json.loads(fs.cat("results/run1/coco/panoptic.json"))
    assert len(coco["images"]) == len(NAMES)
    assert json.loads(fs.cat("results/run1/report.json"))["run"]["ok"] == len(NAMES)


def test_s3_checkpoint_is_copied_once_into_the_local_cache(s3_runs):
    _, _, cache, _, _ = s3_runs
    (copied,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert (copied / "model.safetensors").read_bytes() == (BUNDLED_DIR / "model.safetensors").read_bytes()


def test_manifest_on_s3(s3_runs):
    fs = s3_runs[0]
    rows = [r for p in fs.find("results/manifest/tables/images") for r in _table(fs.cat(p))]
    assert sorted(r["key"] for r in rows if r["uri"].startswith("s3://")) == sorted(f"pictures/in/{n}" for n in NAMES[:3])
    # a local name holding "?versionId=" is its own image with its own outputs on an S3 output
    versioned = sorted((r for r in rows if "versionId" in r["key"]), key=lambda r: r["key"])
    assert [r["key"].rsplit("/", 1)[1] for r in versioned] == ["x%3FversionId=0.jpg", "x%3FversionId=1.jpg"]
    for row, name in zip(versioned, NAMES[:2]):
        assert fs.cat(f"results/manifest/{row['panoptic_png']}") == fs.cat(f"results/run1/panoptic/{name}.png")
    # an S3 path holding it is an error row: s3fs would read another object
    (error,) = [r for p in fs.find("results/manifest/tables/errors") for r in _table(fs.cat(p))]
    assert (error["key"], error["stage"], error["error_type"]) == (
        f"pictures/in/{NAMES[0]}%3FversionId=1", "read", "UnsupportedName")


def test_no_secret_in_logs_or_outputs(s3_runs):
    from tests.s3_server import SECRET_KEY

    fs, _, _, s3_log, manifest_log = s3_runs
    for log in (s3_log, manifest_log):
        assert SECRET_KEY not in log.stdout + log.stderr
    for path in fs.find("results"):
        assert SECRET_KEY.encode() not in fs.cat(path)


def test_s3_listing_streams_page_by_page(s3_server, monkeypatch):
    """The first key arrives after one LIST request of 1,000 keys, not after the whole prefix."""
    import s3fs

    from pipeline.listing import iter_inputs
    from pipeline.remote import StorageConfig

    fs = s3_server.filesystem()
    fs.mkdir("paged")
    fs.pipe({f"paged/many/img_{i:05d}.jpg": b"x" for i in range(2100)})
    requests: list[str] = []
    call_s3 = s3fs.S3FileSystem.call_s3

    def counting(self, method, *args, **kwargs):  # the real call, counted
        requests.append(method)
        return call_s3(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", counting)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.env()["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.env()["AWS_SECRET_ACCESS_KEY"])
    keys = iter_inputs("s3://paged/many", StorageConfig(endpoint_url=s3_server.endpoint))
    assert next(keys) == ("img_00000.jpg", "s3://paged/many/img_00000.jpg")
    assert requests.count("list_objects_v2") == 1
    assert len(list(keys)) == 2099 and requests.count("list_objects_v2") == 3


def test_s3_atomic_write_publishes_nothing_when_the_writer_fails(s3_server, monkeypatch):
    """A COCO rebuild that fails half-way leaves the previous file, on S3 as locally: the stream
    is staged locally and uploaded only once written whole."""
    from pipeline.remote import StorageConfig
    from pipeline.storage import OutputStore

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, s3_server.env()[name])
    fs = s3_server.filesystem()
    fs.mkdir("atomic")
    store = OutputStore("s3://atomic/run", StorageConfig(endpoint_url=s3_server.endpoint))
    store.write_bytes("coco/panoptic.json", b'{"complete": true}')
    size = 12 << 20
    with pytest.raises(RuntimeError, match="mid-assembly"):
        with store.open_atomic("coco/panoptic.json") as f:
            f.write(b"x" * size)
            raise RuntimeError("mid-assembly")
    assert fs.cat("atomic/run/coco/panoptic.json") == b'{"complete": true}'
    assert not fs.call_s3("list_multipart_uploads", Bucket="atomic").get("Uploads")  # none begun
    with store.open_atomic("coco/panoptic.json") as f:
        f.write(b"y" * size)
    assert fs.cat("atomic/run/coco/panoptic.json") == b"y" * size


def test_s3_create_bytes_is_exclusive_and_two_runs_found_no_lease_one_gets_it(s3_server, monkeypatch):
    """The lease's creation is a conditional PUT (If-None-Match), refused when the object exists."""
    from pipeline import lease
    from pipeline.remote import StorageConfig
    from pipeline.storage import OutputStore

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, s3_server.env()[name])
    s3_server.filesystem().mkdir("leases")
    store = OutputStore("s3://leases/run", StorageConfig(endpoint_url=s3_server.endpoint))
    assert store.create_bytes("_state/x.json", b"first") and not store.create_bytes("_state/x.json", b"second")
    assert store.read_bytes("_state/x.json") == b"first"

    monkeypatch.setattr(lease, "SETTLE_SECONDS", 0.0)  # the store alone decides
    with lease.hold_lease(store, "first", "now"):
        holder, looks = lease._holder, []  # the second run looked before the first had created its lease
        monkeypatch.setattr(lease, "_holder", lambda *a: holder(*a) if looks.append(1) or len(looks) > 1 else None)
        with pytest.raises(lease.OutputBusy, match="run first"):
            with lease.hold_lease(store, "second", "now"):
                pass
        assert json.loads(store.read_bytes(lease.LEASE))["run_id"] == "first"


def test_new_weights_at_the_same_s3_uri_are_copied_again(s3_server, monkeypatch, tmp_path, untrained_model):
    """A scheduled job's model directory updated in place: the cache must not serve the old weights."""
    from pipeline.model import ModelError, ModelSource, local_dir, weights_digest
    from pipeline.remote import StorageConfig

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, s3_server.env()[name])
    monkeypatch.setenv("PANOPTIC_MODEL_CACHE", str(tmp_path / "cache"))
    fs = s3_server.filesystem()
    fs.mkdir("updated")
    for name in ("config.json", "preprocessor_config.json"):
        fs.put(str(untrained_model / name), f"updated/m/{name}")
    (weights,) = untrained_model.glob("*.safetensors")
    fs.pipe("updated/m/pytorch_model.bin", b"\x80\x04pickle")  # never copied: the safetensors are used
    source = ModelSource("s3://updated/m", StorageConfig(endpoint_url=s3_server.endpoint))
    with pytest.raises(ModelError, match="only pickle .bin files"):
        local_dir(source)
    assert not (tmp_path / "cache").exists()  # refused before anything was copied
    with pytest.raises(ModelError, match="is a file, not a checkpoint directory"):
        local_dir(ModelSource("s3://updated/m/pytorch_model.bin", StorageConfig(endpoint_url=s3_server.endpoint)))
    fs.put(str(weights), f"updated/m/{weights.name}")
    fs.pipe("updated/m/backup.safetensors/weights.safetensors", b"old")  # a folder named like a file
    first = local_dir(source)
    assert sorted(p.name for p in first.iterdir()) == ["config.json", weights.name, "preprocessor_config.json"]
    local_dir.cache_clear()  # a later run: a new process
    assert local_dir(source) == first
    retrained = tmp_path / "retrained.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    save_file({name: tensor + 1 if tensor.is_floating_point() else tensor for name, tensor in tensors.items()},
              str(retrained))
    fs.put(str(retrained), f"updated/m/{weights.name}")
    local_dir.cache_clear()
    second = local_dir(source)
    assert second != first and weights_digest(second) != weights_digest(first)


def test_many_committed_parts_read_the_same_on_s3_as_locally(s3_server, monkeypatch, tmp_path):
    """Parts are fetched several at a time: every one, once, in order, under a root that holds
    glob characters (fsspec's `cat` would expand them); unchanged parts are known by their ETags."""
    from pipeline.coco import rebuild
    from pipeline.remote import StorageConfig
    from pipeline.shards import FETCH_PARTS, ShardOutput, committed_count, committed_errors, committed_keys, write_shard
    from pipeline.storage import OutputStore
    from tests.unit.test_shards_coco import CATEGORIES, _batch

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, s3_server.env()[name])
    s3_server.filesystem().mkdir("many-parts")
    shards = 2 * FETCH_PARTS + 5
    keys = [f"img{i:03d}.jpg" for i in range(shards)]
    failed = set(keys[::7])
    seen = []
    for store in (OutputStore("s3://many-parts/out[1]", StorageConfig(endpoint_url=s3_server.endpoint)),
                  OutputStore(str(tmp_path / "out[1]"))):
        for key in keys:  # a shard per image: one part each
            write_shard(_batch([key], errors=failed & {key}), ShardOutput(store, CATEGORIES, "run1", "m"))
        totals = rebuild(store, CATEGORIES, instances=False)
        seen.append((committed_keys(store), committed_count(store), committed_errors(store), totals.images,
                     json.loads(store.read_bytes("coco/panoptic.json"))))
        store.write_bytes("coco/panoptic.json", b"as built")  # a marker: a rebuild would overwrite it
        assert rebuild(store, CATEGORIES, instances=False) == totals  # the parts' versions have not changed
        assert store.read_bytes("coco/panoptic.json") == b"as built"
    assert seen[0] == seen[1]
    done, count, errors, images, coco_json = seen[0]
    assert done == set(keys) and count == shards and errors == {("run1", "NotAnImage"): len(failed)}
    assert images == len(coco_json["images"]) == shards - len(failed)


def test_deletes_name_keys_exactly_under_a_root_with_glob_characters(s3_server, monkeypatch, tmp_path,
                                                                     untrained_model):
    """fsspec's `rm` and `get` expand glob characters on S3: `--overwrite` of `s3://b/r?` would
    delete `s3://b/r1` too, and a model under `s3://b/m[2]` could not be copied."""
    from pipeline.model import ModelSource, local_dir
    from pipeline.remote import StorageConfig
    from pipeline.state import SETTINGS, clear_outputs
    from pipeline.storage import OutputStore

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, s3_server.env()[name])
    fs = s3_server.filesystem()
    fs.mkdir("globs")
    storage = StorageConfig(endpoint_url=s3_server.endpoint)
    stores = [OutputStore(f"s3://globs/{name}", storage) for name in ("r1", "r?", "r*", "r[1]")]
    for store in stores:
        for relative in ("tables/images/a.parquet", "panoptic/sub/a.jpg.png", "report.json", SETTINGS,
                         *(f"previews/{i}.jpg" for i in range(3))):
            store.write_bytes(relative, store.root.encode())
        store.check_writable()  # writes and deletes a probe
    for store in stores[1:]:
        store.delete("report.json")
        clear_outputs(store)
        assert store.find("") == []
        assert sorted(stores[0].find("")) == ["_state/settings.json", "panoptic/sub/a.jpg.png", "previews/0.jpg",
                                              "previews/1.jpg", "previews/2.jpg", "report.json",
                                              "tables/images/a.parquet"]

    monkeypatch.setenv("PANOPTIC_MODEL_CACHE", str(tmp_path / "cache"))
    for path in untrained_model.iterdir():
        fs.put(str(path), f"globs/m[2]/{path.name}")
    copied = local_dir(ModelSource("s3://globs/m[2]", storage))
    assert sorted(p.name for p in copied.iterdir()) == sorted(p.name for p in untrained_model.iterdir())
    assert not list((tmp_path / "cache").glob(".partial-*"))


def test_another_output_inside_an_s3_input_is_not_listed(s3_server, image_dir, monkeypatch):
    """S3 lists keys in byte order, an output's `_state/` before its `panoptic/` and `previews/`."""
    from pipeline.listing import iter_inputs
    from pipeline.remote import StorageConfig

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, s3_server.env()[name])
    fs = s3_server.filesystem()
    fs.mkdir("nested")
    image = str(image_dir / "img_0.jpg")
    for key in ("in/a.jpg", "in/old/_state/settings.json", "in/old/panoptic/a.jpg.png", "in/old/previews/a.jpg.jpg",
                "in/older.jpg", "in/zz/b.jpg"):
        fs.put(image, f"nested/{key}")
    keys = {key for key, _ in iter_inputs("s3://nested/in", StorageConfig(endpoint_url=s3_server.endpoint))}
    assert keys == {"a.jpg", "older.jpg", "zz/b.jpg"}


def test_an_input_missing_from_the_bucket_is_an_error_row_saying_so(s3_server, monkeypatch):
    """s3fs's FileNotFoundError holds only the path: the row's message says what it means."""
    from pipeline.failures import ImageFailure
    from pipeline.read import read_bytes
    from pipeline.remote import StorageConfig

    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    s3_server.filesystem().mkdir("sparse")
    with pytest.raises(ImageFailure) as failed:
        read_bytes("s3://sparse/gone.jpg", StorageConfig(endpoint_url=s3_server.endpoint))
    assert (failed.value.stage, failed.value.error_type, failed.value.message) == (
        "read", "FileNotFoundError", "does not exist: sparse/gone.jpg")
