"""Write one shard of results and commit it.

A shard is one batch of the write stage. Its outputs are written in this order:
  1. panoptic/<key>.png (and semantic/<key>.png with --tasks semantic) for every segmented
     image (named by key: a redo overwrites),
  2. tables/errors/<shard>.parquet (if any image failed),
  3. tables/images/<shard>.parquet: the commit record. A shard is committed when, and only
     when, this file exists; it is written last and atomically.
<shard> is a hash of the shard's keys, so writing a shard again overwrites it.
An errors part without its images part belongs to a shard that was cut off: it is ignored and
removed at the next start, and its keys are redone.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import time
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.decode import decode_image
from pipeline.encode import panoptic_png, png_bytes
from pipeline.failures import WRITE, ImageFailure
from pipeline.labels import Category
from pipeline.lease import write_deadline
from pipeline.memory import release_free_memory
from pipeline.read import read_bytes
from pipeline.previews import write_preview
from pipeline.remote import REQUEST_SECONDS, StorageConfig, StorageTimeout
from pipeline.storage import DamagedOutput, OutputStore
from schemas import tables

T = TypeVar("T")

IMAGES_DIR = "tables/images"
ERRORS_DIR = "tables/errors"
PANOPTIC_DIR = "panoptic"
SEMANTIC_DIR = "semantic"
PART_SUFFIX = ".parquet"
# Committed parts read at once when tables are scanned (resume, COCO rebuild): every run reads
# them all, and one at a time a large output's thousands of parts cost a round trip each.
FETCH_PARTS = 32


@dataclass(frozen=True)
class ShardOutput:
    """Everything the write stage needs: where to write, what the labels mean, which run this is."""

    store: OutputStore
    categories: tuple[Category, ...]
    run_id: str
    model: str
    input_storage: StorageConfig = StorageConfig()  # to re-read the few inputs that get a preview
    tasks: tuple[str, ...] = ("panoptic",)
    leased: bool = False  # written by a run holding the output's lease: it commits only while it does


def part_name(keys: Sequence[str]) -> str:
    """A shard's part name, from its keys: a write task that Ray runs again (its worker died after
    the commit) overwrites its own parts instead of committing the same images twice."""
    return hashlib.sha256("\0".join(sorted(map(str, keys))).encode()).hexdigest()[:32]


def panoptic_png_path(key: str) -> str:
    return f"{PANOPTIC_DIR}/{key}.png"


def _parquet_bytes(rows: list[dict], schema: pa.Schema) -> bytes:
    buffer = io.BytesIO()
    # a CRC per page: a part damaged after its commit is refused when read, not read as other keys
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer, compression="zstd", write_page_checksum=True)
    return buffer.getvalue()


def _segment_rows(segments_json: str, categories: Sequence[Category]) -> list[dict]:
    rows = []
    for seg_id, label_id, score, area, x, y, w, h in json.loads(segments_json):
        category = categories[int(label_id)]
        rows.append({"id": int(seg_id), "category_id": category.id, "label": category.name,
                     "isthing": category.isthing, "score": float(score), "area": int(area),
                     "bbox": [int(x), int(y), int(w), int(h)]})
    return rows


def _instance_rows(instances_json: str, categories: Sequence[Category]) -> list[dict]:
    """Thing instances only: COCO instances are things; stuff lives in the panoptic map."""
    rows = []
    for label_id, score, area, x, y, w, h, counts in json.loads(instances_json):
        category = categories[int(label_id)]
        if category.isthing:
            rows.append({"id": len(rows) + 1, "category_id": category.id, "label": category.name,
                         "score": float(score), "area": int(area), "bbox": [int(x), int(y), int(w), int(h)],
                         "rle": counts})
    return rows


def semantic_png(label_map: np.ndarray, categories: Sequence[Category]) -> bytes:
    """(H, W) model class indices -> PNG of COCO category ids: 8-bit when they fit, else 16-bit."""
    ids = np.array([c.id for c in categories])
    return png_bytes(ids.astype(np.uint8 if ids.max() < 256 else np.uint16)[label_map])


def _preview(out: ShardOutput, key: str, uri: str, segment_ids: np.ndarray, segments: list[dict]) -> None:
    colors = {c.id: c.color for c in out.categories}
    try:
        rgb = decode_image(read_bytes(uri, out.input_storage))
    except ImageFailure:  # the input changed since it was segmented: no preview, the result stands
        return
    try:
        write_preview(out.store, key, rgb, segment_ids, [s | {"color": colors[s["category_id"]]} for s in segments])
    except OSError as exc:  # previews/<key>.jpg clashes where panoptic/<key>.png does not: no preview
        if _name_problem(exc) is None:
            raise


STAGE_SECONDS = ("seconds_prepare", "seconds_infer", "seconds_write")
NOT_COMMITTED = "NotCommitted"  # a shard's images when its run no longer holds the output: see write_shard
FENCE_READ_SECONDS = 5.0  # see _Fence.seconds


def _name_problem(exc: OSError) -> str | None:
    """Why a local write failed for its name alone, or None when it did not."""
    if isinstance(exc, (FileExistsError, NotADirectoryError, IsADirectoryError)):  # a.jpg beside a folder a.jpg.png/
        return "another input's output has this name, as a file where a folder is needed or the reverse"
    if exc.errno == errno.ENAMETOOLONG:
        return "the output's path is too long for this file system"
    if exc.errno in (errno.EINVAL, errno.EILSEQ):  # exFAT, FAT and SMB shares refuse ? * : " < > | in names
        return "this file system refuses a character of the output's name"
    return None


class _LeaseEnding(Exception):
    """A write did not land while its run's lease was sure to hold (lease.py)."""


class _Fence:
    """When a shard's writes must have landed: before its run's lease could be found expired
    (lease.py), followed as the run renews it; never for a shard written outside a run."""

    def __init__(self, out: ShardOutput) -> None:
        self.store, self.run_id = out.store, out.run_id if out.leased else None
        self.at, self.read_at = math.inf, -math.inf
        self.read()

    def read(self, seconds: float = REQUEST_SECONDS) -> None:
        """Read the lease again, within `seconds`: after a renewal the fence is later; after a
        takeover, past."""
        if self.run_id is not None:
            self.at, self.read_at = write_deadline(self.store, self.run_id, seconds), time.monotonic()

    def seconds(self) -> float:
        """How long a write may take now: REQUEST_SECONDS at most, and landed by the fence.
        The lease is read again once the fence is that near, but not more than every few
        seconds (it is renewed every lease.RENEW_SECONDS)."""
        if self.at - time.time() < REQUEST_SECONDS and time.monotonic() - self.read_at >= FENCE_READ_SECONDS:
            try:
                self.read(seconds=max(self.at - time.time(), 0.001))  # no longer than the fence holds
            # the lease unread: the fence read before still holds (`read` before the commit raises)
            except Exception:
                self.read_at = time.monotonic()
        return min(REQUEST_SECONDS, self.at - time.time())


def _write(store: OutputStore, path: str, data: bytes, fence: _Fence) -> None:
    """Write `data` within `fence.seconds()`; _LeaseEnding when the fence, not the store's
    REQUEST_SECONDS, cut it off."""
    seconds = fence.seconds()
    if seconds <= 0:
        raise _LeaseEnding
    try:
        store.write_bytes(path, data, seconds=seconds)
    except StorageTimeout:
        if seconds < REQUEST_SECONDS:
            raise _LeaseEnding from None
        raise


def _write_image(out: ShardOutput, batch: dict[str, np.ndarray], i: int, row: dict, fence: _Fence) -> dict:
    """Write image i's PNGs (and preview); returns its row of the images table."""
    png, segment_ids = panoptic_png_path(row["key"]), np.asarray(batch["segment_ids"][i])
    _write(out.store, png, panoptic_png(segment_ids), fence)
    segments = _segment_rows(str(batch["segments"][i]), out.categories)
    if batch["preview"][i]:
        _preview(out, row["key"], row["uri"], segment_ids, segments)
    semantic = None
    if "semantic" in out.tasks:
        semantic = f"{SEMANTIC_DIR}/{row['key']}.png"
        _write(out.store, semantic, semantic_png(np.asarray(batch["semantic"][i]), out.categories), fence)
    instances = _instance_rows(str(batch["instances"][i]), out.categories) if "instance" in out.tasks else None
    return row | {"width": int(batch["width"][i]), "height": int(batch["height"][i]), "panoptic_png": png,
                  "model": out.model, "segments": segments, "semantic_png": semantic, "instances": instances}


def write_shard(batch: dict[str, np.ndarray], out: ShardOutput) -> dict[str, np.ndarray]:
    """Write and commit one shard; returns per image: key, ok, error_type and seconds per stage.

    An image whose output cannot have its name (see `_name_problem`) fails alone, at the write
    stage; any other write error (a full disk, storage refusing) stops the shard. A shard whose
    run does not hold the output, or whose writes do not land while it surely does, commits
    nothing: its images are NotCommitted, pending for the next run.

    A write task can outlive its driver (killed with -9, its Ray workers go on for seconds) or
    its run's lease: a run that took the output over lists these images as pending, and a commit
    landing after that would count them twice. So every write lands before the lease could be
    found expired (lease.py), and the lease is read again before the commit."""
    start = time.perf_counter()
    try:
        return _status(batch, _write_and_commit(batch, out), start)
    except _LeaseEnding:
        return _status(batch, np.full(len(batch["key"]), NOT_COMMITTED, dtype=object), start)


def _write_and_commit(batch: dict[str, np.ndarray], out: ShardOutput) -> np.ndarray:
    """write_shard's work; returns each image's error type ("" if none)."""
    store, images, errors, fence = out.store, [], [], _Fence(out)
    error_types = np.asarray(batch["error_type"]).astype(object)
    for i, key in enumerate(batch["key"]):
        row = {"key": str(key), "uri": str(batch["uri"][i]), "run_id": out.run_id}
        if error_types[i]:
            errors.append(row | {"stage": str(batch["error_stage"][i]), "error_type": str(error_types[i]),
                                 "message": str(batch["error_message"][i])})
            continue
        try:
            images.append(_write_image(out, batch, i, row, fence))
        except OSError as exc:
            problem = _name_problem(exc)
            if problem is None:
                raise
            error_types[i] = type(exc).__name__
            errors.append(row | {"stage": WRITE, "error_type": error_types[i], "message": f"{problem}: {exc}"[:500]})
    shard = part_name(batch["key"])
    # an errors part even without rows: a query of tables/errors/*.parquet finds a table on every output
    parts = [(f"{ERRORS_DIR}/{shard}{PART_SUFFIX}", _parquet_bytes(errors, tables.ERRORS)),
             (f"{IMAGES_DIR}/{shard}{PART_SUFFIX}", _parquet_bytes(images, tables.IMAGES))]  # last: it commits
    fence.read()  # taken over meanwhile: commit nothing
    for path, data in parts:
        _write(store, path, data, fence)
    release_free_memory()
    return error_types


def _status(batch: dict[str, np.ndarray], error_types: np.ndarray, start: float) -> dict[str, np.ndarray]:
    """What a write task returns to the driver, per image: key, ok, error_type, seconds per stage."""
    n = len(batch["key"])
    return {"key": np.asarray(batch["key"]), "ok": np.asarray([not e for e in error_types], dtype=bool),
            "error_type": error_types.astype(str),
            "seconds_prepare": np.asarray(batch.get("seconds_prepare", np.zeros(n))),
            "seconds_infer": np.asarray(batch.get("seconds_infer", np.zeros(n))),
            "seconds_write": np.full(n, (time.perf_counter() - start) / max(n, 1))}


def committed_parts(store: OutputStore) -> list[str]:
    """Names of committed shards' parts (the same name under images/ and errors/)."""
    return store.list(IMAGES_DIR, PART_SUFFIX)


def remove_uncommitted(store: OutputStore) -> int:
    """Delete errors parts of shards that never committed, and parts a kill cut off half-written;
    returns how many errors parts."""
    committed = set(committed_parts(store))
    orphans = [n for n in store.list(ERRORS_DIR, PART_SUFFIX) if n not in committed]
    for name in orphans:
        store.delete(f"{ERRORS_DIR}/{name}")
    for directory in (IMAGES_DIR, ERRORS_DIR):
        for name in store.temporaries(directory):
            store.delete(f"{directory}/{name}")
    return len(orphans)


def _fetch(store: OutputStore, parts: Sequence[str]) -> Iterator[bytes]:
    """The parts' bytes in order, FETCH_PARTS at a time: concurrent requests, bounded memory."""
    for start in range(0, len(parts), FETCH_PARTS):
        yield from store.read_many(parts[start:start + FETCH_PARTS])


def _read(store: OutputStore, parts: Sequence[str], read: Callable[[io.BytesIO], T]) -> Iterator[T]:
    """`read` of each part's bytes, in order; DamagedOutput naming a part Arrow cannot read."""
    for part, data in zip(parts, _fetch(store, parts)):
        try:
            yield read(io.BytesIO(data))
        # OSError: damaged data pages (the bytes are in memory); UnicodeDecodeError: a damaged footer
        except (pa.ArrowException, OSError, ValueError) as exc:
            reason = " ".join(str(exc).split())  # Arrow's messages span lines; the job's error is one
            raise DamagedOutput(f"{store.url(part)} cannot be read ({type(exc).__name__}: {reason}): it was damaged "
                                "after it was committed. Delete it, and the next run processes its shard's "
                                "images again") from exc


def _rows(store: OutputStore, parts: Sequence[str]) -> int:
    """How many rows the parts hold, from their footers."""
    return sum(_read(store, parts, lambda data: pq.read_metadata(data).num_rows))


@lru_cache(maxsize=None)
def _empty_part(directory: str) -> bytes:
    """A part of `directory`'s table without rows, as this pyarrow writes it."""
    return _parquet_bytes([], {IMAGES_DIR: tables.IMAGES, ERRORS_DIR: tables.ERRORS}[directory])


def _committed(store: OutputStore, directory: str, parts: Sequence[str] | None = None) -> list[str]:
    """Paths of the committed parts of `directory` (IMAGES_DIR or ERRORS_DIR) that may hold rows:
    of those named in `parts` if given, else of every committed shard. Most errors parts are
    empty, and their size tells them without a request each."""
    committed = set(committed_parts(store) if parts is None else parts)
    empty = len(_empty_part(directory))
    return [f"{directory}/{name}" for name, size, _ in store.versions(directory, PART_SUFFIX)
            if name in committed and size != empty]


def forget_failures(store: OutputStore) -> int:
    """Empty every committed errors part, so that the failed images are pending again (their
    shards' segmented images stay committed, and each shard keeps its errors part); returns how
    many images failed."""
    parts = _committed(store, ERRORS_DIR)
    failed = _rows(store, parts)
    for part in parts:
        store.write_bytes(part, _empty_part(ERRORS_DIR))
    return failed


def iter_committed(store: OutputStore, directory: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """Each committed part of `directory` (IMAGES_DIR or ERRORS_DIR) as a table."""
    yield from _read(store, _committed(store, directory),
                     lambda data: pq.read_table(data, columns=columns, page_checksum_verification=True))


def committed_count(store: OutputStore) -> int:
    """How many images (segmented or failed) are committed."""
    return _rows(store, _committed(store, IMAGES_DIR) + _committed(store, ERRORS_DIR))


def committed_counts(store: OutputStore, parts: Sequence[str]) -> tuple[int, int]:
    """(segmented, failed) images in the committed shards named `parts`."""
    return _rows(store, _committed(store, IMAGES_DIR, parts)), _rows(store, _committed(store, ERRORS_DIR, parts))


def committed_errors(store: OutputStore) -> Counter:
    """(run_id, error_type) -> how many committed images failed so."""
    errors: Counter = Counter()
    for table in iter_committed(store, ERRORS_DIR, columns=["run_id", "error_type"]):
        errors.update(zip(table.column("run_id").to_pylist(), table.column("error_type").to_pylist()))
    return errors


def committed_keys(store: OutputStore, excluding_run: str = "") -> set[str]:
    """Every key whose result (segments or error) is committed, but by the run `excluding_run`."""
    keys: set[str] = set()
    for directory in (IMAGES_DIR, ERRORS_DIR):
        for table in iter_committed(store, directory, columns=["key", "run_id"]):
            if excluding_run:
                table = table.filter(pc.not_equal(table.column("run_id"), excluding_run))
            keys.update(table.column("key").to_pylist())
    return keys
