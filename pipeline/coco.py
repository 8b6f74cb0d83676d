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
from typing import Sequence

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


def _annotation(row: dict) -> dict:
    return {
        "image_id": image_id(row["key"]),
        "file_name": row["panoptic_png"].removeprefix(PANOPTIC_DIR + "/"),
        "segments_info": [
            {"id": s["id"], "category_id": s["category_id"], "area": s["area"], "bbox": list(s["bbox"]),
             "iscrowd": 0, "score": s["score"]}
            for s in row["segments"]
        ],
    }


def _write_array(f, items) -> None:
    f.write(b"[")
    for i, item in enumerate(items):
        f.write((",\n" if i else "\n").encode() + json.dumps(item).encode())
    f.write(b"]")


def _unique_rows(store: OutputStore, columns: list[str]):
    """Every committed image's row, once: a key committed in two parts (two runs on one output at
    once) counts in the first part by name. Two keys with one image id are refused."""
    first_key: dict[int, bytes] = {}  # image id -> digest of its key: less memory than the key
    for table in iter_committed(store, IMAGES_DIR, columns=["key", *columns]):
        for row in table.to_pylist():
            ident, digest = image_id(row["key"]), hashlib.blake2b(row["key"].encode(), digest_size=16).digest()
            if ident in first_key:
                if first_key[ident] != digest:
                    raise DuplicateImageId(f"image id {ident} of key {row['key']!r} is not unique")
                continue
            first_key[ident] = digest
            yield row


def _images(store: OutputStore, totals: DatasetTotals):
    """COCO `images` entries of every committed image."""
    for row in _unique_rows(store, ["width", "height", "run_id"]):
        totals.images += 1
        totals.images_by_run[row["run_id"]] += 1
        yield {"id": image_id(row["key"]), "file_name": row["key"], "width": row["width"], "height": row["height"]}


def _write_dataset(store: OutputStore, path: str, totals: DatasetTotals, annotations, categories: list[dict]) -> None:
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

    def annotations():
        for row in _unique_rows(store, ["panoptic_png", "segments"]):
            for s in row["segments"]:
                totals.segments[s["category_id"]] += 1
                totals.pixels[s["category_id"]] += s["area"]
            yield _annotation(row)

    _write_dataset(store, PANOPTIC_JSON, totals, annotations(), [c.coco() for c in categories])
    return totals


def write_instances_json(store: OutputStore, categories: Sequence[Category]) -> None:
    """Stream every committed image's thing instances into COCO instance-segmentation JSON
    (compressed RLE masks, with scores: loadable by pycocotools as ground truth or results)."""

    def annotations():
        for row in _unique_rows(store, ["width", "height", "instances"]):
            for inst in row["instances"] or ():
                yield {"id": image_id(f"{row['key']}#{inst['id']}"), "image_id": image_id(row["key"]),
                       "category_id": inst["category_id"], "iscrowd": 0, "score": inst["score"],
                       "area": inst["area"], "bbox": list(inst["bbox"]),
                       "segmentation": {"size": [row["height"], row["width"]], "counts": inst["rle"]}}

    things = [c.coco() for c in categories if c.isthing]
    _write_dataset(store, INSTANCES_JSON, DatasetTotals(), annotations(), things)


def rebuild(store: OutputStore, categories: Sequence[Category], instances: bool) -> DatasetTotals:
    """Write `coco/panoptic.json` (and `coco/instances.json`) from every committed shard and
    return the dataset totals; or, when the committed images parts are exactly those (names,
    sizes, versions) they were last built from, as for a scheduled rerun that found nothing
    new, keep them and return the totals recorded then: a rebuild reads every part."""
    source = hashlib.sha256(json.dumps(store.versions(IMAGES_DIR, PART_SUFFIX)).encode()).hexdigest()
    outputs = [PANOPTIC_JSON, *([INSTANCES_JSON] if instances else [])]
    try:
        built = json.loads(store.read_bytes(BUILT_FROM))
    except FileNotFoundError:
        built = None
    if built and built["source"] == source and built["outputs"] == outputs and all(map(store.exists, outputs)):
        return DatasetTotals.from_json(built["totals"])
    totals = write_panoptic_json(store, categories)
    if instances:
        write_instances_json(store, categories)
    store.write_bytes(BUILT_FROM, json.dumps({"source": source, "outputs": outputs, "totals": totals.to_json()}).encode())
    return totals
