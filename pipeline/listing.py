"""Expand `--input` into (key, uri) pairs.

`--input` is a folder (local path or any fsspec URL such as s3://bucket/prefix) or a manifest
file (.parquet, .csv or .txt) of URIs. A key is the URI relative to the input root: stable across
runs, usable as a file name, and unable to escape the output prefix.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import posixpath
import re
from itertools import chain
from typing import Iterator
from urllib.parse import urlsplit

import fsspec

from pipeline.remote import StorageConfig, UnsupportedURL, file_system, first_protocol
from pipeline.state import SETTINGS, STATE_DIR, WRITTEN_FOLDERS

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".jfif", ".pbm", ".pgm", ".ppm",
     ".heic", ".heif", ".avif", ".jp2"}  # the last four: an error row where Pillow lacks the decoder, not silence
)
MANIFEST_EXTENSIONS = (".parquet", ".csv", ".txt")
LOCAL_PROTOCOLS = ("file", "local")  # fsspec's names for the local file system


class InputError(ValueError):
    """`--input` cannot be listed; the message says why, for the user."""


# Longest key segment, in UTF-8 bytes: outputs append up to 41 bytes to it (".png" and a local
# write's ".<32 hex>.tmp"), and most file systems refuse names over 255 bytes.
MAX_SEGMENT_BYTES = 200
S3_VERSION_QUERY = "?versionId="  # where s3fs cuts every S3 path it is given (`S3FileSystem.split_path`)


def safe_key(relative: str) -> str:
    """A relative object name made safe to join under an output prefix.

    Path segments stay segments (sub-folders are kept); '.', '..' and empty segments, backslashes,
    '%' and unprintable characters are percent-encoded (their bytes: one name, one key; a local
    name that is not UTF-8 keeps its raw bytes), so no key is absolute or climbs out. So is the '?'
    of "?versionId=": s3fs reads the rest of any S3 path from there on as an object version, so
    outputs named after such a key would all be written to the object named by what precedes it. A segment
    longer than MAX_SEGMENT_BYTES keeps its start and extension around a hash of the whole: an
    output named after it could not be written.
    """
    def segment(part: str) -> str:
        part = part.replace("%", "%25").replace("\\", "%5C").replace(S3_VERSION_QUERY, "%3F" + S3_VERSION_QUERY[1:])
        part = "".join(c if c.isprintable() else "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogateescape"))
                       for c in part)
        part = {"": "%00", ".": "%2E", "..": "%2E%2E"}.get(part, part)
        return part if len(part.encode()) <= MAX_SEGMENT_BYTES else _shortened(part)

    return "/".join(segment(p) for p in relative.split("/"))


def _shortened(part: str) -> str:
    """A segment over MAX_SEGMENT_BYTES -> its start, '~', 16 hex digits of its hash and its
    extension (when short): MAX_SEGMENT_BYTES at most, distinct for distinct segments."""
    dot = part.rfind(".")
    extension = part[dot:] if dot > 0 and len(part) - dot <= 16 else ""
    tail = f"~{hashlib.sha256(part.encode()).hexdigest()[:16]}{extension}"
    start = part.encode()[:MAX_SEGMENT_BYTES - len(tail.encode())].decode(errors="ignore")
    return start + tail


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


def _list_folder(fs: fsspec.AbstractFileSystem, root: str, protocol: str, skip: str | None) -> Iterator[tuple[str, str]]:
    """Images under `root`, except under the folder `skip` (the output, when it lies inside) and
    under any other output of this pipeline inside it (a sub-folder holding SETTINGS): its PNGs
    and previews are no input."""
    root = root.rstrip("/")
    skipped = (lambda path: path.startswith(skip)) if skip else (lambda path: False)
    if protocol in ("s3", "s3a"):
        outputs: list[str] = []
        for path in _s3_paths(fs, root):
            # keys come in byte order, and an output's `_state/` before its other folders
            if path.endswith(f"/{SETTINGS}") and len(path) > len(root) + len(SETTINGS) + 1:
                outputs.append(path[:-len(SETTINGS)])
            if _is_image(path) and not skipped(path) and not any(path.startswith(o) for o in outputs):
                yield safe_key(path[len(root) + 1:]), f"s3://{path}"
        return
    # a local folder that may not be listed is an input of its own, whose read fails: one error
    # row says what was not segmented, and the run goes on (a `lost+found` is everywhere)
    denied: list[str] = []
    walk = _local_walk(root, skip, denied) if protocol in LOCAL_PROTOCOLS else fs.walk(root)
    for directory, folders, files in chain(walk, [("", [], [])]):
        while denied:
            path = denied.pop(0)
            yield safe_key(path[len(root) + 1:]), _text(path)
        if directory.rstrip("/") != root and STATE_DIR in folders and fs.isfile(f"{directory.rstrip('/')}/{SETTINGS}"):
            folders[:] = []  # another output of this pipeline: not entered
            continue
        for name in sorted(files):
            path = f"{directory.rstrip('/')}/{name}"
            if _is_image(path) and not skipped(path):
                uri = _text(path) if protocol in LOCAL_PROTOCOLS else f"{protocol}://{path}"
                yield safe_key(path[len(root) + 1:]), uri


def _text(path: str) -> str:
    """A local path as the tables can hold it. A name that is not UTF-8 (Python keeps its bytes as
    surrogates) is shown with its bytes escaped, and the image fails with a read error row that
    names it (`names_a_file_not_utf8`), instead of failing the job."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


_ESCAPED_BYTE = re.compile(r"\\x([89a-f][0-9a-f])")  # as backslashreplace writes a byte UTF-8 refused (0x80 up)


def names_a_file_not_utf8(uri: str) -> bool:
    """Whether a local uri is `_text` of a file whose name is not UTF-8: one with that name read
    in its place would be another file's (`caf\\xe9.jpg`, literally)."""
    if "://" in uri or not _ESCAPED_BYTE.search(uri):
        return False
    return os.path.lexists(_ESCAPED_BYTE.sub(lambda m: chr(0xDC00 + int(m[1], 16)), uri))  # surrogateescape's form


def _local_walk(root: str, skip: str | None, denied: list[str]) -> Iterator[tuple[str, list[str], list[str]]]:
    """`os.walk` that follows symlinked folders (a dataset assembled from links is common), each
    real folder once, so a link cycle ends; folders in name order, so listings are stable. The
    folder `skip` (a resolved path plus "/") is not entered, by whatever path it is reached.
    Folders it may not list are appended to `denied` (os.walk would skip them unseen); one gone
    since its parent was listed is skipped."""
    def unlistable(error: OSError) -> None:
        if error.filename == root:
            raise InputError(f"cannot list input {_text(root)}: {error.strerror}")
        if isinstance(error, PermissionError):
            denied.append(error.filename)

    visited: set[str] = set()
    for directory, folders, files in os.walk(root, onerror=unlistable, followlinks=True):
        real = os.path.realpath(directory)
        if real in visited or (skip and f"{real}/".startswith(skip)):
            folders[:] = []
            continue
        visited.add(real)
        folders.sort()
        yield directory, folders, files


def _manifest_uris(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[str]:
    kind = path.lower()
    if kind.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        column = "uri" if "uri" in table.column_names else table.column_names[0]
        held = table.schema.field(column).type
        values = held.value_type if pa.types.is_dictionary(held) else held  # pandas' category columns
        if not (pa.types.is_string(values) or pa.types.is_large_string(values) or pa.types.is_string_view(values)):
            raise InputError(f"manifest {path}: column {column!r} holds {held}, not URIs (name the column of URIs 'uri')")
        yield from (u for u in table.column(column).to_pylist() if u)
        return
    with fs.open(path, "rt", encoding="utf-8-sig") as f:  # a byte-order mark is not part of the first entry
        text = f.read()
    if kind.endswith(".csv"):
        rows = [r for r in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in r)]
        column = rows[0].index("uri") if rows and "uri" in rows[0] else 0
        first = rows[0][column].strip() if rows else ""
        # a header names its columns; without a "uri" one, a first cell that is no path, URL or
        # image name is taken for a header
        header = bool(rows) and ("uri" in rows[0] or not (_is_image(first) or "://" in first or first.startswith("/")))
        yield from (r[column].strip() for r in rows[header:] if len(r) > column and r[column].strip())
    else:
        yield from (line.strip() for line in text.splitlines() if line.strip())


def _manifest_key(uri: str) -> str:
    """The URI without its scheme. An object name keeps its '?' and '#' (s3://b/a#1.jpg is an object
    of that name); a web URL keeps its query, which names the resource, and drops its fragment,
    which never reaches the server."""
    scheme, separator, rest = uri.partition("://")
    if not separator:
        return safe_key(uri.lstrip("/"))
    if scheme.lower() in ("http", "https"):
        parts = urlsplit(uri)
        rest = parts.netloc + parts.path + (f"?{parts.query}" if parts.query else "")
    return safe_key(rest.lstrip("/"))


def _resolved(uri: str, folder: str, protocol: str) -> str:
    """A manifest entry as a URI every worker can read: a relative path is relative to the
    manifest's folder (on the manifest's file system), not to a worker's working directory."""
    if "://" in uri or uri.startswith("/"):
        return uri
    path = posixpath.normpath(f"{folder}/{uri}")
    return path if protocol in LOCAL_PROTOCOLS else f"{protocol}://{path}"


def _inside(output: str, storage: StorageConfig, fs: fsspec.AbstractFileSystem, root: str) -> str | None:
    """The output's path plus "/" when the output lies inside the input `root` of `fs` (local
    paths resolved: `in/./out` and a link to `in/out` are `in/out`). InputError when the output
    is the input folder itself, or the input lies in a folder runs write (and --overwrite deletes)."""
    out_fs, out_root = file_system(output, storage, write=True)
    if first_protocol(out_fs) != first_protocol(fs):
        return None
    if first_protocol(fs) in LOCAL_PROTOCOLS:
        out_root, root = os.path.realpath(out_root), os.path.realpath(root)
    prefix, folder = out_root.rstrip("/") + "/", root.rstrip("/") + "/"
    if prefix == folder:
        raise InputError(f"--output {output} is the input folder itself: write the outputs to another folder")
    written = folder[len(prefix):].split("/")[0] if folder.startswith(prefix) else None
    if written in WRITTEN_FOLDERS:
        raise InputError(f"the input lies in {written}/ of --output {output}, which runs write and --overwrite "
                         "deletes: move the images out of it, or write the outputs to another folder")
    return prefix if prefix.startswith(folder) else None


def _kind(fs: fsspec.AbstractFileSystem, root: str) -> str:
    """"manifest", "image" (a single image) or "folder"."""
    if root.lower().endswith(MANIFEST_EXTENSIONS) and fs.isfile(root):
        return "manifest"
    return "image" if _is_image(root) and fs.isfile(root) else "folder"


def keys_root(input_uri: str, storage: StorageConfig = StorageConfig()) -> str:
    """What the keys of `input_uri` are relative to: the folder (a single image's own), resolved,
    or "manifest" (a manifest's keys are its URIs). The same key under another root is another
    image, so an output records its root and refuses another one."""
    fs, root = file_system(input_uri, storage)
    kind, protocol = _kind(fs, root), first_protocol(fs)
    if kind == "manifest":
        return "manifest"
    folder = root.rsplit("/", 1)[0] if kind == "image" else root
    return os.path.realpath(folder) if protocol in LOCAL_PROTOCOLS else f"{protocol}://{folder.rstrip('/')}"


def iter_inputs(input_uri: str, storage: StorageConfig = StorageConfig(),
                output: str | None = None) -> Iterator[tuple[str, str]]:
    """Yield (key, uri) for every image under `input_uri`, or listed in it if it is a manifest;
    nothing under `output` (a run's own outputs, when written inside its input, are no input)."""
    try:
        fs, root = file_system(input_uri, storage)
        protocol = first_protocol(fs)
        kind = _kind(fs, root)
        inside = _inside(output, storage, fs, root) if output else None
        if kind == "manifest":
            folder = root.rsplit("/", 1)[0]
            for uri in _manifest_uris(fs, root):
                resolved = _resolved(uri, folder, protocol)
                # keyed by what it names: `x.jpg` in two manifests' folders are two images
                yield _manifest_key(resolved), resolved
            return
        if kind == "image":
            yield safe_key(root.rsplit("/", 1)[-1]), input_uri
            return
        if not fs.isdir(root):
            if fs.isfile(root):
                images, manifests = ", ".join(sorted(IMAGE_EXTENSIONS)), ", ".join(MANIFEST_EXTENSIONS)
                raise InputError(f"input {input_uri} is a file that is neither an image ({images}) nor a "
                                 f"manifest of image URIs ({manifests})")
            raise InputError(f"no images found: input {input_uri} does not exist or is an empty prefix")
        yield from _list_folder(fs, root, protocol, inside)
    except (InputError, UnsupportedURL):
        raise
    except (FileNotFoundError, PermissionError) as exc:
        raise InputError(f"cannot list input {input_uri}: {exc}") from exc
    # an unreadable manifest (a Parquet file that is not one, a CSV that is not UTF-8): Arrow's
    # and Unicode's errors are ValueErrors
    except ValueError as exc:
        raise InputError(f"cannot read input {input_uri}: {type(exc).__name__}: {exc}") from exc
