"""Listing a large prefix on a real S3 server (SeaweedFS on 127.0.0.1): does it stream?

    .venv/bin/python bench/listing.py [--objects 100000]

Uploads N tiny objects under one prefix, then times `pipeline.listing.iter_inputs` over 1,000 of
them and over all of them: time to the first (key, uri), total listing time, and the listing's peak
Python memory (tracemalloc), beside the memory of the same keys held as one list of strings. If
listing streams, the peak does not grow with the number of keys.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.listing import iter_inputs  # noqa: E402
from pipeline.remote import StorageConfig  # noqa: E402
from tests import s3_server  # noqa: E402


def _list(prefix: str, storage: StorageConfig) -> tuple[int, float, float, int]:
    """(keys, seconds to the first, seconds to the last, peak traced bytes) of one listing."""
    tracemalloc.start()
    start, first, count = time.perf_counter(), 0.0, 0
    for _ in iter_inputs(prefix, storage):
        count += 1
        if count == 1:
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return count, first, total, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work, s3_server.running(Path(work)) as server:
        start = time.perf_counter()
        fs = server.filesystem()
        fs.mkdir("listing")
        fs.pipe({f"listing/many/{i // 1000:03d}/img_{i:06d}.jpg": b"x" for i in range(args.objects)})  # concurrent PUTs
        print(f"uploaded {args.objects} objects in {time.perf_counter() - start:.1f} s")
        storage = StorageConfig(endpoint_url=server.endpoint)
        _list("s3://listing/many/000", storage)  # warm-up: botocore loads its service models once
        for prefix in ("s3://listing/many/000", "s3://listing/many"):
            count, first, total, peak = _list(prefix, storage)
            keys = [f"many/{i // 1000:03d}/img_{i:06d}.jpg" for i in range(count)]
            held = sum(sys.getsizeof(k) for k in keys) + sys.getsizeof(keys)
            print(f"{prefix}: listed {count} keys: first after {first:.2f} s, all after {total:.1f} s, "
                  f"peak traced memory {peak / 2**20:.2f} MiB (the keys alone as a list: {held / 2**20:.2f} MiB)",
                  flush=True)

if __name__ == "__main__":
    main()
