"""Listing a large prefix on a real S3 server (SeaweedFS on 127.0.0.1): does it stream?

    .venv/bin/python bench/listing.py [--objects 100000]

Uploads N tiny objects under one prefix, then times `pipeline.listing.iter_inputs` over it: time to
the first (key, uri), total listing time, and the listing's peak Python memory (tracemalloc),
beside the memory of the same keys held as one list of strings.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.listing import iter_inputs  # noqa: E402
from pipeline.remote import StorageConfig  # noqa: E402
from tests import s3_server  # noqa: E402


async def _upload(fs, count: int, concurrency: int = 64) -> None:
    session = await fs.set_session()
    semaphore = asyncio.Semaphore(concurrency)

    async def put(i: int) -> None:
        async with semaphore:
            await session.put_object(Bucket="listing", Key=f"many/{i // 1000:03d}/img_{i:06d}.jpg", Body=b"x")

    await asyncio.gather(*(put(i) for i in range(count)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        server = s3_server.start(Path(work))
        try:
            import os

            import s3fs

            os.environ.update(server.env())
            fs = s3fs.S3FileSystem(asynchronous=True, endpoint_url=server.endpoint,
                                   key=s3_server.ACCESS_KEY, secret=s3_server.SECRET_KEY)
            server.filesystem().mkdir("listing")
            start = time.perf_counter()
            asyncio.run(_upload(fs, args.objects))
            print(f"uploaded {args.objects} objects in {time.perf_counter() - start:.1f} s")
            tracemalloc.start()
            start = time.perf_counter()
            first, count = None, 0
            for _ in iter_inputs("s3://listing/many", StorageConfig(endpoint_url=server.endpoint)):
                count += 1
                if first is None:
                    first = time.perf_counter() - start
            total = time.perf_counter() - start
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            keys = [f"many/{i // 1000:03d}/img_{i:06d}.jpg" for i in range(count)]
            held = sum(sys.getsizeof(k) for k in keys) + sys.getsizeof(keys)
            print(f"listed {count} keys: first after {first:.2f} s, all after {total:.1f} s, "
                  f"peak traced memory {peak / 2**20:.1f} MiB (the keys alone as a list: {held / 2**20:.1f} MiB)")
        finally:
            s3_server.stop(server)


if __name__ == "__main__":
    main()
