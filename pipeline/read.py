"""Fetch one input's bytes from any fsspec URL; a failure is the image's, not the job's."""

from __future__ import annotations

from pipeline.failures import READ, ImageFailure, as_failure
from pipeline.listing import S3_VERSION_QUERY, names_a_file_not_utf8
from pipeline.remote import StorageConfig, file_system, first_protocol, request


def read_bytes(uri: str, storage: StorageConfig) -> bytes:
    try:
        fs, path = file_system(uri, storage)
        if S3_VERSION_QUERY in path and first_protocol(fs) in ("s3", "s3a"):
            # s3fs would read another object (the name cut there) or the latest version
            raise ImageFailure(READ, "UnsupportedName", f"s3fs takes what follows {S3_VERSION_QUERY!r} in an S3 "
                               "path for an object version, and versions are not supported: rename an object "
                               "whose name holds it, or list a versioned object without it")
        if names_a_file_not_utf8(uri):
            raise ImageFailure(READ, "UnsupportedName", "the file's path is not UTF-8 (its name, or a folder's), which "
                               "the tables cannot hold (shown with its bytes escaped): rename it")
        return request(fs, "cat_file", path)
    except Exception as exc:  # missing, denied, network, no answer: recorded as this image's error row
        raise as_failure(READ, exc) from exc
