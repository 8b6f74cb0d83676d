"""Rebuild `coco/panoptic.json` (and `coco/instances.json`) from every committed shard,
streaming: memory stays flat.

Image `file_name` is the key (the input's path relative to --input); annotation `file_name` is
the PNG's path relative to `panoptic/`, so COCO panoptic tools take `<output>/panoptic` as the
prediction folder.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.labels import Category
from pipeline.shards import IMAGES_DIR, PANOPTIC_DIR, PART_SUFFIX, iter_committed
from pipeline.storage import OutputStore

PANOPTIC_JSON = "coco/panoptic.json"
INSTANCES_JSON = "coco/instances.json"
BUILT_FROM = "_state/coco.json"  # which committed parts coco/ was last built from, and their totals


class DuplicateImageId(RuntimeError):
    """Two keys hash to the same image id (vanishingly rare); refuse to write an ambiguous file."""


def image_id(key: str) -> int:
    """A stable image id per key: the same in every run and every rebuild (52 bits: JSON-safe)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 12


@dataclass
class DatasetTotals:
    """What the rebuild saw across all committed shards."""

    images: int = 0
    images_by_run: Counter = field(default_factory=Counter)  # run_id -> images it committed
    segments: Counter = field(default_factory=Counter)  # category_id -> segment count
    pixels: Counter = field(default_factory=Counter)  # category_id -> total area

    def to_json(self) -> dict:
        return {"images": self.images, "images_by_run": dict(self.images_by_run),
                "segments": {str(k): v for k, v in self.segments.items()},
                "pixels": {str(k): v for k, v in self.pixels.items()}}

    @staticmethod
    def from_json(data: dict) -> "DatasetTotals":
        return DatasetTotals(data["images"], Counter(data["images_by_run"]),
                             Counter({int(k): v for k, v in data["segments"].items()}),
                             Counter({int(k): v for k, v in data["pixels"].items()}))


def _write_array(f, parts: Iterable[list[str]]) -> None:
    """A JSON array of the items of every part (each item already JSON text), one item a line."""
    f.write(b"[")
    separator = "\n"
    for items in parts:
        if items:
            f.write((separator + ",\n".join(items)).encode())
            separator = ",\n"
    f.write(b"]")


def _unique_parts(store: OutputStore, columns: list[str]) -> Iterator[tuple[pa.Table, list[int]]]:
    """Every committed images part, as a table of its rows not seen before, and their image ids.
    A key committed in two parts (two runs on one output at once) counts in the first part by
    name. Two keys with one image id are refused."""
    first_key: dict[int, bytes] = {}  # image id -> digest of its key: less memory than the key
    for table in iter_committed(store, IMAGES_DIR, columns=["key", *columns]):
        rows, ids = [], []
        for row, key in enumerate(table.column("key").to_pylist()):
            ident, digest = image_id(key), hashlib.blake2b(key.encode(), digest_size=16).digest()
            if ident in first_key:
                if first_key[ident] != digest:
                    raise DuplicateImageId(f"image id {ident} of key {key!r} is not unique")
                continue
            first_key[ident] = digest
            rows.append(row)
            ids.append(ident)
        yield (table if len(rows) == table.num_rows else table.take(pa.array(rows, pa.int64()))), ids


def _images(store: OutputStore, totals: DatasetTotals) -> Iterator[list[str]]:
    """COCO `images` entries of every committed image, a part at a time."""
    for table, ids in _unique_parts(store, ["width", "height", "run_id"]):
        totals.images += len(ids)
        totals.images_by_run.update(table.column("run_id").to_pylist())
        yield [f'{{"id": {ident}, "file_name": {json.dumps(key)}, "width": {width}, "height": {height}}}'
               for ident, key, width, height in zip(ids, *(table.column(c).to_pylist() for c in ("key", "width", "height")))]


def _panoptic_annotations(table: pa.Table, ids: list[int], totals: DatasetTotals) -> list[str]:
    """COCO panoptic `annotations` of one part's images; adds their segments to `totals`.

    Formatted from the part's columns as json.dumps would format each annotation's dict (the
    same text), without building a dict per segment: on 20-segment images that took most of
    the rebuild's time."""
    segments = table.column("segments").combine_chunks()
    field = dict(zip([f.name for f in segments.type.value_type], segments.flatten().flatten()))
    category, area = field["category_id"].to_numpy(), field["area"].to_numpy()
    kinds, which = np.unique(category, return_inverse=True)
    pixels = np.zeros(len(kinds), np.int64)
    np.add.at(pixels, which, area)
    totals.segments.update(dict(zip(kinds.tolist(), np.bincount(which, minlength=len(kinds)).tolist())))
    totals.pixels.update(dict(zip(kinds.tolist(), pixels.tolist())))
    bbox = field["bbox"].flatten().to_numpy().reshape(-1, 4).tolist()
    info = [f'{{"id": {i}, "category_id": {c}, "area": {a}, "bbox": [{x}, {y}, {w}, {h}], "iscrowd": 0, "score": {s!r}}}'
            for i, c, a, (x, y, w, h), s in zip(field["id"].to_pylist(), category.tolist(), area.tolist(), bbox,
                                                 field["score"].to_pylist())]
    ends = np.cumsum(pc.list_value_length(segments).to_numpy()).tolist()
    return [f'{{"image_id": {ident}, "file_name": {json.dumps(png.removeprefix(PANOPTIC_DIR + "/"))}, '
            f'"segments_info": [{", ".join(info[start:end])}]}}'
            for ident, png, start, end in zip(ids, table.column("panoptic_png").to_pylist(), [0, *ends], ends)]


def _write_dataset(store: OutputStore, path: str, totals: DatasetTotals, annotations: Iterable[list[str]],
                   categories: list[dict]) -> None:
    """Two passes over the committed tables (images, then annotations) so that nothing but the
    set of image ids is held in memory."""
    with store.open_atomic(path) as f:
        f.write(b'{"images": ')
        _write_array(f, _images(store, totals))
        f.write(b',\n"annotations": ')
        _write_array(f, annotations)
        f.write(b',\n"categories": ' + json.dumps(categories).encode() + b"}\n")


def write_panoptic_json(store: OutputStore, categories: Sequence[Category]) -> DatasetTotals:
    """Stream every committed image into COCO panoptic JSON; returns the dataset totals."""
    totals = DatasetTotals()
    annotations = (_panoptic_annotations(table, ids, totals)
                   for table, ids in _unique_parts(store, ["panoptic_png", "segments"]))
    _write_dataset(store, PANOPTIC_JSON, totals, annotations, [c.coco() for c in categories])
    return totals


def write_instances_json(store: OutputStore, categories: Sequence[Category]) -> None:
    """Stream every committed image's thing instances into COCO instance-segmentation JSON
    (compressed RLE masks, with scores: loadable by pycocotools as ground truth or results)."""

    def annotations():
        for table, ids in _unique_parts(store, ["width", "height", "instances"]):
            yield [json.dumps({"id": image_id(f"{row['key']}#{inst['id']}"), "image_id": ident,
                               "category_id": inst["category_id"], "iscrowd": 0, "score": inst["score"],
                               "area": inst["area"], "bbox": list(inst["bbox"]),
                               "segmentation": {"size": [row["height"], row["width"]], "counts": inst["rle"]}})
                   for ident, row in zip(ids, table.to_pylist()) for inst in row["instances"] or ()]

    things = [c.coco() for c in categories if c.isthing]
    _write_dataset(store, INSTANCES_JSON, DatasetTotals(), annotations(), things)


def _last_build(store: OutputStore) -> tuple[str, list[str], DatasetTotals] | None:
    """What coco/ was last built from (the parts' digest, the files built) and the totals then, if
    known. A cache: damaged, it is as if absent."""
    try:
        built = json.loads(store.read_bytes(BUILT_FROM))
        return built["source"], built["outputs"], DatasetTotals.from_json(built["totals"])
    except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
        return None


def rebuild(store: OutputStore, categories: Sequence[Category], instances: bool) -> DatasetTotals:
    """Write `coco/panoptic.json` (and `coco/instances.json`) from every committed shard and
    return the dataset totals; or, when the committed images parts are exactly those (names,
    sizes, versions) they were last built from, as for a scheduled rerun that found nothing
    new, keep them and return the totals recorded then: a rebuild reads every part."""
    source = hashlib.sha256(json.dumps(store.versions(IMAGES_DIR, PART_SUFFIX)).encode()).hexdigest()
    outputs = [PANOPTIC_JSON, *([INSTANCES_JSON] if instances else [])]
    built = _last_build(store)
    if built and built[:2] == (source, outputs) and all(map(store.exists, outputs)):
        return built[2]
    totals = write_panoptic_json(store, categories)
    if instances:
        write_instances_json(store, categories)
    store.write_bytes(BUILT_FROM, json.dumps({"source": source, "outputs": outputs, "totals": totals.to_json()}).encode())
    return totals
