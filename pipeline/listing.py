"""Expand `--input` into (key, uri) pairs.

`--input` is a folder (local path or any fsspec URL such as s3://bucket/prefix) or a manifest
file (.parquet, .csv or .txt) of URIs. A key is the URI relative to the input root: stable across
runs, usable as a file name, and unable to escape the output prefix.
"""

from __future__ import annotations

import csv
import io
from typing import Iterator
from urllib.parse import urlsplit

import fsspec

from pipeline.remote import StorageConfig

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".jfif", ".pbm", ".pgm", ".ppm"}
)
MANIFEST_EXTENSIONS = (".parquet", ".csv", ".txt")


class InputError(ValueError):
    """`--input` cannot be listed; the message says why, for the user."""


def safe_key(relative: str) -> str:
    """A relative object name made safe to join under an output prefix.

    Path segments stay segments (sub-folders are kept); '.', '..' and empty segments, backslashes,
    '%' and control characters are percent-encoded, so no key is absolute or climbs out.
    """
    def segment(part: str) -> str:
        part = part.replace("%", "%25").replace("\\", "%5C")
        part = "".join(c if c.isprintable() else f"%{ord(c):02X}" for c in part)
        return {"": "%00", ".": "%2E", "..": "%2E%2E"}.get(part, part)

    return "/".join(segment(p) for p in relative.split("/"))


def _is_image(path: str) -> bool:
    dot = path.rfind(".")
    return dot > path.rfind("/") and path[dot:].lower() in IMAGE_EXTENSIONS


def _s3_paths(fs: fsspec.AbstractFileSystem, root: str) -> Iterator[str]:
    """Every object under an S3 prefix, one page (1,000 keys) at a time: a flat prefix of millions
    of keys streams instead of being listed whole first."""
    bucket, _, prefix = root.partition("/")
    request = {"Bucket": bucket, "Prefix": f"{prefix}/" if prefix else ""}
    while True:
        page = fs.call_s3("list_objects_v2", **request)
        yield from (f"{bucket}/{item['Key']}" for item in page.get("Contents", []))
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


def _list_folder(fs: fsspec.AbstractFileSystem, root: str, protocol: str) -> Iterator[tuple[str, str]]:
    root = root.rstrip("/")
    if protocol in ("s3", "s3a"):
        for path in _s3_paths(fs, root):
            if _is_image(path):
                yield safe_key(path[len(root) + 1:]), f"s3://{path}"
        return
    for directory, _, files in fs.walk(root):
        for name in sorted(files):
            path = f"{directory.rstrip('/')}/{name}"
            if _is_image(path):
                uri = path if protocol in ("file", "local") else f"{protocol}://{path}"
                yield safe_key(path[len(root) + 1:]), uri


def _manifest_uris(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[str]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        column = "uri" if "uri" in table.column_names else table.column_names[0]
        yield from (u for u in table.column(column).to_pylist() if u)
        return
    with fs.open(path, "rt") as f:
        text = f.read()
    if path.endswith(".csv"):
        rows = list(csv.reader(io.StringIO(text)))
        column = rows[0].index("uri") if rows and "uri" in rows[0] else 0
        start = 1 if rows and ("uri" in rows[0] or not rows[0][column].strip().startswith(("/", "s3:", "gs:"))) else 0
        yield from (r[column].strip() for r in rows[start:] if r and r[column].strip())
    else:
        yield from (line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def _manifest_key(uri: str) -> str:
    parts = urlsplit(uri)
    relative = f"{parts.netloc}{parts.path}" if parts.scheme else uri
    return safe_key(relative.lstrip("/"))


def iter_inputs(input_uri: str, storage: StorageConfig = StorageConfig()) -> Iterator[tuple[str, str]]:
    """Yield (key, uri) for every image under `input_uri`, or listed in it if it is a manifest."""
    try:
        fs, root = fsspec.core.url_to_fs(input_uri, **storage.options(input_uri))
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        if root.lower().endswith(MANIFEST_EXTENSIONS) and fs.isfile(root):
            for uri in _manifest_uris(fs, root):
                yield _manifest_key(uri), uri
            return
        if not fs.isdir(root):
            raise InputError(f"no images found: input {input_uri} does not exist or is an empty prefix")
        yield from _list_folder(fs, root, protocol)
    except (FileNotFoundError, PermissionError) as exc:
        raise InputError(f"cannot list input {input_uri}: {exc}") from exc
