"""Fetch one input's bytes from any fsspec URL; a failure is the image's, not the job's."""

from __future__ import annotations

import fsspec

from pipeline.failures import READ, as_failure
from pipeline.remote import StorageConfig


def read_bytes(uri: str, storage: StorageConfig) -> bytes:
    try:
        with fsspec.open(uri, "rb", **storage.options(uri)) as f:
            return f.read()
    except Exception as exc:  # missing, denied, network: recorded as this image's error row
        raise as_failure(READ, exc) from exc
