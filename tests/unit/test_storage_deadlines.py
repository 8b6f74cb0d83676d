"""A store that takes connections and never answers (a hung proxy or load balancer) fails every
request within its deadline: of the output, instead of holding the run for ever, and of an input,
as that image's error row, instead of minutes of retries per image."""

import socket
import time

import pytest

from pipeline import remote
from pipeline.failures import ImageFailure
from pipeline.labels import LabelMapError, load_categories
from pipeline.model import ModelError, ModelSource, local_dir
from pipeline.read import read_bytes
from pipeline.remote import StorageConfig, StorageTimeout
from pipeline.storage import OutputStore


@pytest.fixture
def silent_endpoint(monkeypatch):
    """An http:// endpoint whose kernel accepts connections that nothing ever reads or answers."""
    for name, value in {"AWS_ACCESS_KEY_ID": "AKIASILENT", "AWS_SECRET_ACCESS_KEY": "silent-secret",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def _stream(store: OutputStore) -> None:
    with store.open_atomic("coco/panoptic.json") as f:  # as the COCO JSON is written
        f.write(b'{"images": []}')


@pytest.mark.parametrize("request_", [
    lambda s: s.write_bytes("panoptic/a.png", b"png"),  # a PUT: waits for "100 Continue", which botocore never gives up on
    lambda s: s.create_bytes("_state/lease.json", b"{}"),
    lambda s: s.read_bytes("_state/lease.json"),
    lambda s: s.read_many(["tables/images/a.parquet", "tables/images/b.parquet"]),
    lambda s: s.list("tables/images"),
    lambda s: s.exists("_state/settings.json"),
    lambda s: s.delete("_state/lease.json"),
    lambda s: s.delete_tree("panoptic"),
    _stream,
], ids=["write", "create", "read", "read_many", "list", "exists", "delete", "delete_tree", "stream"])
def test_each_request_to_a_store_that_never_answers_fails_within_its_deadline(request_, silent_endpoint, monkeypatch):
    monkeypatch.setattr(remote, "REQUEST_SECONDS", 1.0)
    store = OutputStore("s3://bucket/out", StorageConfig(endpoint_url=silent_endpoint))
    started = time.monotonic()
    with pytest.raises(StorageTimeout, match=r"did not finish within 1 s \(\w+ of s3://bucket/out/"):
        request_(store)
    assert time.monotonic() - started < 10


def test_a_write_is_given_the_time_its_caller_has_left(silent_endpoint):
    """A shard's commit must land before its run's lease could expire: it gets what is left of that."""
    store = OutputStore("s3://bucket/out", StorageConfig(endpoint_url=silent_endpoint))
    started = time.monotonic()
    with pytest.raises(StorageTimeout, match="within 0 s"):
        store.write_bytes("tables/images/a.parquet", b"part", seconds=0.3)
    assert time.monotonic() - started < 5


def test_an_input_the_store_never_sends_is_that_images_error(silent_endpoint, monkeypatch):
    monkeypatch.setattr(remote, "REQUEST_SECONDS", 1.0)
    started = time.monotonic()
    with pytest.raises(ImageFailure) as failed:
        read_bytes("s3://bucket/in/a.jpg", StorageConfig(endpoint_url=silent_endpoint))
    assert (failed.value.stage, failed.value.error_type) == ("read", "StorageTimeout")
    assert "did not finish within 1 s (cat_file of s3://bucket/in/a.jpg)" in failed.value.message
    assert time.monotonic() - started < 10


def test_a_model_or_label_map_the_store_never_sends_fails_within_its_deadline(silent_endpoint, monkeypatch, tmp_path):
    monkeypatch.setattr(remote, "REQUEST_SECONDS", 1.0)
    storage = StorageConfig(endpoint_url=silent_endpoint)
    started = time.monotonic()
    with pytest.raises(ModelError, match=r"^model s3://models/m could not be copied: .* within 1 s \(ls of s3://models/m\)"):
        local_dir(ModelSource("s3://models/m", storage))  # a ModelError: what an inference actor reports as one line
    with pytest.raises(LabelMapError, match=r"^--label-map s3://models/labels.json cannot be read: StorageTimeout: .* "
                                            r"within 1 s \(cat_file of s3://models/labels.json\)"):
        load_categories({0: "a"}, tmp_path, "s3://models/labels.json", storage)
    assert time.monotonic() - started < 20
