"""Fetch one input's bytes from any fsspec URL; a failure is the image's, not the job's."""

from __future__ import annotations

from pipeline.failures import READ, as_failure
from pipeline.remote import StorageConfig, file_system


def read_bytes(uri: str, storage: StorageConfig) -> bytes:
    try:
        fs, path = file_system(uri, storage)
        return fs.cat_file(path)
    except Exception as exc:  # missing, denied, network: recorded as this image's error row
        raise as_failure(READ, exc) from exc
