"""Scanning a large output's committed tables on a real S3 server (SeaweedFS on 127.0.0.1).

    .venv/bin/python bench/committed.py [--parts 300]

Every run reads all committed parts more than once: their keys (what is pending), their row
counts, and twice in the COCO rebuild. Writes N images parts of 64 images each (about 20
segments per image), then times those scans with the parts fetched one at a time and
`FETCH_PARTS` at a time, alternately, twice each, and prints the ratio; then a run's rebuild step
when the parts changed and when they did not (a rerun that found nothing new). The server is
local and shares the machine's cores; on a remote object store every request waits longer, and
reading one part at a time costs more.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import shards  # noqa: E402
from pipeline.coco import rebuild, write_panoptic_json  # noqa: E402
from pipeline.labels import Category  # noqa: E402
from pipeline.remote import StorageConfig  # noqa: E402
from pipeline.storage import OutputStore  # noqa: E402
from schemas import tables  # noqa: E402
from tests import s3_server  # noqa: E402

IMAGES_PER_PART = 64
CATEGORIES = tuple(Category(i, i + 1, f"class{i}", i < 80, (i, i, i), "thing" if i < 80 else "stuff")
                   for i in range(133))


def _part(index: int, rng: random.Random) -> bytes:
    rows = []
    for j in range(IMAGES_PER_PART):
        key = f"images/{index:05d}/{j:02d}.jpg"
        segments = [{"id": s + 1, "category_id": rng.randrange(1, 134), "label": "class", "isthing": True,
                     "score": rng.random(), "area": rng.randrange(100, 50_000),
                     "bbox": [rng.randrange(600), rng.randrange(400), rng.randrange(1, 200), rng.randrange(1, 200)]}
                    for s in range(20)]
        rows.append({"key": key, "uri": f"s3://in/{key}", "run_id": "run1", "width": 640, "height": 480,
                     "panoptic_png": f"panoptic/{key}.png", "model": "m", "segments": segments,
                     "semantic_png": None, "instances": None})
    return shards._parquet_bytes(rows, tables.IMAGES)


def _scans(store: OutputStore) -> dict[str, float]:
    """Seconds of each scan a run makes of the committed tables."""
    seconds = {}
    start = time.perf_counter()
    keys = shards.committed_keys(store)
    seconds["committed keys"] = time.perf_counter() - start
    start = time.perf_counter()
    count = shards.committed_count(store)
    seconds["row counts"] = time.perf_counter() - start
    start = time.perf_counter()
    totals = write_panoptic_json(store, CATEGORIES)
    seconds["COCO rebuild"] = time.perf_counter() - start
    assert len(keys) == count == totals.images, (len(keys), count, totals.images)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=int, default=300)
    args = parser.parse_args()
    rng = random.Random(0)
    parts = [_part(i, rng) for i in range(args.parts)]
    with tempfile.TemporaryDirectory() as work, s3_server.running(Path(work)) as server:
        start = time.perf_counter()
        fs = server.filesystem()
        fs.mkdir("committed")
        fs.pipe({f"committed/out/{shards.IMAGES_DIR}/{i:05d}{shards.PART_SUFFIX}": part for i, part in enumerate(parts)})
        print(f"{args.parts} parts of {IMAGES_PER_PART} images ({sum(map(len, parts)) / 2**20:.1f} MiB) "
              f"uploaded in {time.perf_counter() - start:.1f} s", flush=True)
        store = OutputStore("s3://committed/out", StorageConfig(endpoint_url=server.endpoint))
        _scans(store)  # warm-up: botocore loads its service models once
        concurrent = shards.FETCH_PARTS
        results: dict[int, list[dict[str, float]]] = {1: [], concurrent: []}
        for _ in range(2):
            for fetch in (1, concurrent):
                shards.FETCH_PARTS = fetch
                results[fetch].append(_scans(store))
        shards.FETCH_PARTS = concurrent
        print(f"{'scan':16s} {'1 at a time s':>14s} {f'{concurrent} at a time s':>16s} {'speed-up':>9s}")
        for scan in results[1][0]:
            one = min(r[scan] for r in results[1])
            many = min(r[scan] for r in results[concurrent])
            print(f"{scan:16s} {one:14.2f} {many:16.2f} {one / many:8.1f}x")
        rebuilds = []
        for _ in range(2):  # the first builds coco/ (and records what from), the second finds it current
            start = time.perf_counter()
            rebuild(store, CATEGORIES, instances=False)
            rebuilds.append(time.perf_counter() - start)
        print(f"a run's rebuild step: {rebuilds[0]:.2f} s after a change to the committed parts, "
              f"{rebuilds[1]:.2f} s when they are those coco/ was built from")

if __name__ == "__main__":
    main()
