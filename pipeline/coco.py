"""Rebuild `coco/panoptic.json` from every committed shard, streaming: memory stays flat.

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
from pipeline.shards import IMAGES_DIR, PANOPTIC_DIR, iter_committed
from pipeline.storage import OutputStore

PANOPTIC_JSON = "coco/panoptic.json"


class DuplicateImageId(RuntimeError):
    """Two keys hash to the same image id (vanishingly rare); refuse to write an ambiguous file."""


def image_id(key: str) -> int:
    """A stable image id per key: the same in every run and every rebuild (52 bits: JSON-safe)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 12


@dataclass
class DatasetTotals:
    """What the rebuild saw across all committed shards."""

    images: int = 0
    segments: Counter = field(default_factory=Counter)  # category_id -> segment count
    pixels: Counter = field(default_factory=Counter)  # category_id -> total area


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


def write_panoptic_json(store: OutputStore, categories: Sequence[Category]) -> DatasetTotals:
    """Stream every committed image into COCO panoptic JSON; returns the dataset totals.

    Two passes over the committed tables (images, then annotations) so that nothing but the
    set of image ids is held in memory.
    """
    totals, seen = DatasetTotals(), set()

    def images():
        for table in iter_committed(store, IMAGES_DIR, columns=["key", "width", "height"]):
            for row in table.to_pylist():
                ident = image_id(row["key"])
                if ident in seen:
                    raise DuplicateImageId(f"image id {ident} of key {row['key']!r} is not unique")
                seen.add(ident)
                totals.images += 1
                yield {"id": ident, "file_name": row["key"], "width": row["width"], "height": row["height"]}

    def annotations():
        for table in iter_committed(store, IMAGES_DIR, columns=["key", "panoptic_png", "segments"]):
            for row in table.to_pylist():
                for s in row["segments"]:
                    totals.segments[s["category_id"]] += 1
                    totals.pixels[s["category_id"]] += s["area"]
                yield _annotation(row)

    with store.open_atomic(PANOPTIC_JSON) as f:
        f.write(b'{"images": ')
        _write_array(f, images())
        f.write(b',\n"annotations": ')
        _write_array(f, annotations())
        f.write(b',\n"categories": ' + json.dumps([c.coco() for c in categories]).encode() + b"}\n")
    return totals
