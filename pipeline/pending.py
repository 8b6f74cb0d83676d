"""The work of a run, as a stream of small (key, uri, preview) blocks: inputs minus committed keys.

Runs inside one Ray read task (see run.py), so the driver never holds the key list. Ray merges
the blocks a read task yields up to `run.MAX_BLOCK_BYTES` before passing them on: about 200,000
keys, so the first images of a larger prefix are segmented while its listing goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa

from pipeline.listing import iter_inputs
from pipeline.remote import StorageConfig
from pipeline.shards import committed_keys
from pipeline.storage import OutputStore

BLOCK_ROWS = 16  # rows per block, and images per decode batch


@dataclass(frozen=True)
class PendingConfig:
    input: str
    store: OutputStore
    storage: StorageConfig = StorageConfig()
    limit: int | None = None  # consider only the first N listed inputs
    previews: int = 0  # mark the first N pending inputs for a preview overlay
    # This run's id: the keys it commits itself stay in its stream. Ray runs the read task again
    # if its worker dies and drops as many blocks as the first attempt delivered, so the stream
    # must be the same, not shortened by the shards this run committed meanwhile: the images
    # between the two attempts' block boundaries would never be segmented.
    run_id: str = ""


def _block(keys: list[str], uris: list[str], first: int, previews: int) -> pa.Table:
    return pa.table({"key": keys, "uri": uris, "preview": [first + i < previews for i in range(len(keys))]})


def pending_blocks(config: PendingConfig) -> Iterator[pa.Table]:
    """Blocks of the listed inputs whose keys are not committed yet; duplicate keys dropped."""
    done, seen = committed_keys(config.store, excluding_run=config.run_id), set()
    keys: list[str] = []
    uris: list[str] = []
    emitted = 0
    for key, uri in iter_inputs(config.input, config.storage, config.store.root):
        if key in seen:
            continue
        seen.add(key)
        if key not in done:
            keys.append(key)
            uris.append(uri)
            if len(keys) == BLOCK_ROWS:
                yield _block(keys, uris, emitted, config.previews)
                emitted, keys, uris = emitted + len(keys), [], []
        if config.limit is not None and len(seen) >= config.limit:
            break
    if keys:
        yield _block(keys, uris, emitted, config.previews)
