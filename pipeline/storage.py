"""The output prefix as a small file-system facade: atomic writes, reads and listings.

Local outputs are written to a temporary name and renamed; object stores get a single PUT,
which is atomic there. Either way a reader never sees half a file. Every request to an object
store has a time limit (`remote.request`).
"""

from __future__ import annotations

import os
import posixpath
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Iterator, Sequence

import fsspec

from pipeline.remote import StorageConfig, explained, file_system, file_version, request, transfer_seconds

S3_DELETE_KEYS = 1000  # the most keys one DeleteObjects request takes


class UnwritableOutput(ValueError):
    """An --output this process cannot write (a file, a read-only folder, a store's refusal); the message says why."""


class DamagedOutput(ValueError):
    """A file the pipeline wrote under the output cannot be read back: it was damaged or replaced
    after it was written (the writes are atomic). The message names it and says what to do."""


@dataclass(frozen=True)
class OutputStore:
    """Files under one output root (a local path or an fsspec URL)."""

    root: str
    storage: StorageConfig = field(default_factory=StorageConfig)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return file_system(self.root, self.storage, write=True)[0]

    @property
    def _base(self) -> str:
        return file_system(self.root, self.storage, write=True)[1].rstrip("/")

    @property
    def protocols(self) -> tuple[str, ...]:
        return self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)

    @property
    def is_local(self) -> bool:
        return "file" in self.protocols

    def path(self, relative: str) -> str:
        return f"{self._base}/{relative}"

    def url(self, relative: str) -> str:
        return self.root.rstrip("/") + "/" + relative

    def _request(self, method: str, target: str | list[str], *args, seconds: float | None = None, **kwargs):
        """`remote.request` on this output's file system."""
        return request(self.fs, method, target, *args, seconds=seconds, context=self.root, **kwargs)

    def write_bytes(self, relative: str, data: bytes, seconds: float | None = None) -> None:
        """Write `data` whole; on an object store within `seconds` (by default the time
        `remote.transfer_seconds` gives its size), or StorageTimeout."""
        if self.is_local:
            with self.open_atomic(relative) as f:  # a temporary renamed; none left by a full disk
                f.write(data)
        else:
            seconds = transfer_seconds(len(data)) if seconds is None else seconds
            self._request("pipe_file", self.path(relative), data, seconds=seconds)  # one PUT, atomic there

    def create_bytes(self, relative: str, data: bytes) -> bool:
        """Write `data` only if no file is there, even one another writer creates at this moment;
        False if one is. Exclusive on a local disk and on object stores that honour
        `If-None-Match` (AWS S3; SeaweedFS, tested); others write unconditionally."""
        target = self.path(relative)
        try:
            if self.is_local:
                os.makedirs(posixpath.dirname(target), exist_ok=True)
                with open(target, "xb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            else:
                self._request("pipe_file", target, data, mode="create")  # PUT with If-None-Match: *
        except FileExistsError:
            return False
        except OSError as exc:
            if "pre-condition" not in str(exc):  # SeaweedFS's 412 does not name its condition
                raise
            return False
        return True

    @contextmanager
    def open_atomic(self, relative: str) -> Iterator[IO[bytes]]:
        """A binary stream for a large file that appears whole, or not at all, when closed.

        For an object store the stream is staged in a local temporary file (under TMPDIR), then
        uploaded in one request, within the time `remote.transfer_seconds` gives its size (an
        fsspec file streaming to the store takes no time limit); a multipart upload cut off by
        it is left incomplete, unpublished, to the bucket's lifecycle rules. Locally we rename.
        If the caller raises, nothing is published and the previous file stays.
        """
        target = self.path(relative)
        if not self.is_local:
            with tempfile.TemporaryDirectory(prefix="panoptic-upload-") as spool:
                staged = os.path.join(spool, posixpath.basename(target))
                with open(staged, "wb") as f:
                    yield f
                # large files go up in parts, published only when the last lands
                self._request("put_file", staged, target, seconds=transfer_seconds(os.path.getsize(staged)))
            return
        os.makedirs(posixpath.dirname(target), exist_ok=True)
        temporary = f"{target}.{uuid.uuid4().hex}.tmp"
        try:
            with open(temporary, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, target)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)

    def read_bytes(self, relative: str, seconds: float | None = None) -> bytes:
        return self._request("cat_file", self.path(relative), seconds=seconds)

    def read_many(self, relatives: Sequence[str]) -> list[bytes]:
        """The files' contents, in order. Object stores fetch them concurrently (fsspec gathers
        the requests of one `cat`): per-request latency, not bandwidth, bounds small files."""
        # cat_ranges, not cat: cat expands glob characters, which a root like `runs[1]` may hold
        return self._request("cat_ranges", [self.path(r) for r in relatives], None, None, on_error="raise")

    def exists(self, relative: str) -> bool:
        return self._request("exists", self.path(relative))

    def list(self, relative_dir: str, suffix: str = "") -> list[str]:
        """Names (relative to `relative_dir`) of the files directly in it, sorted."""
        return [name for name, _, _ in self.versions(relative_dir, suffix)]

    def versions(self, relative_dir: str, suffix: str = "") -> list[tuple[str, int | None, str]]:
        """(name, size, version) of the files directly in it, sorted by name: changes with their contents."""
        fs, directory = self.fs, self.path(relative_dir)
        fs.invalidate_cache(directory)  # other processes write here: never trust a cached listing
        try:
            entries = self._request("ls", directory, detail=True)
        except FileNotFoundError:
            return []
        versions = [file_version(e | {"name": posixpath.basename(e["name"].rstrip("/"))}) for e in entries
                    if e.get("type") == "file"]
        return sorted(v for v in versions if v[0].endswith(suffix) and not v[0].endswith(".tmp"))

    def temporaries(self, relative_dir: str) -> list[str]:
        """Names of the temporary files a local write cut off by a kill left directly in `relative_dir`."""
        if not self.is_local:
            return []  # object stores write whole objects: nothing is left half-written
        try:
            return sorted(n for n in os.listdir(self.path(relative_dir)) if n.endswith(".tmp"))
        except FileNotFoundError:
            return []

    def find(self, relative_dir: str, suffix: str = "") -> list[str]:
        """Paths (relative to `relative_dir`, sub-folders included) of the files under it, sorted."""
        fs, directory = self.fs, self.path(relative_dir)
        fs.invalidate_cache(directory)
        prefix = directory.rstrip("/") + "/"
        return sorted(p[len(prefix):] for p in self._request("find", directory)
                      if p.startswith(prefix) and p.endswith(suffix))

    def delete(self, relative: str, seconds: float | None = None) -> None:
        """Delete one file, named exactly: `fs.rm` expands glob characters on object stores, so an
        output `s3://b/r?` would also have lost `s3://b/r1`'s file."""
        self._request("rm_file", self.path(relative), seconds=seconds)

    def delete_tree(self, relative_dir: str) -> None:
        """Delete every file under `relative_dir`, each named exactly (see `delete`); on S3 with
        one request per 1,000 keys."""
        if self.is_local:  # fsspec's local rm expands nothing, and raises what it cannot delete
            self.fs.rm(self.path(relative_dir), recursive=True)
            return
        paths = [f"{self.path(relative_dir)}/{name}" for name in self.find(relative_dir)]
        if "s3" not in self.protocols:
            for path in paths:
                self._request("rm_file", path)
            return
        bucket = self._base.split("/", 1)[0]
        for start in range(0, len(paths), S3_DELETE_KEYS):
            keys = [{"Key": path.split("/", 1)[1]} for path in paths[start:start + S3_DELETE_KEYS]]
            failed = self._request("call_s3", "delete_objects", Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            for error in failed.get("Errors", [])[:1]:  # a quiet delete lists only the keys it could not delete
                raise OSError(f"cannot delete s3://{bucket}/{error.get('Key')}: {error.get('Code')}: "
                              f"{error.get('Message')}")
        self.fs.invalidate_cache(self.path(relative_dir))

    def check_writable(self) -> None:
        """Write and delete a probe file, so a bad output fails before any work is done."""
        probe = f".probe-{uuid.uuid4().hex}"  # at the root: a run refused next leaves no _state/ behind
        created = []  # local folders the probe's write creates: removed again, so a run refused next
        existing = self._base  # (a mistyped --input, say) leaves no empty output folder behind
        while self.is_local and existing and not os.path.exists(existing):
            created.append(existing)
            existing = os.path.dirname(existing)
        try:
            self.write_bytes(probe, b"")
            self.delete(probe)
        except Exception as exc:
            if self.is_local and isinstance(exc, OSError):
                raise self._unwritable(existing, exc) from exc  # its own message names the probe, unknown to the user
            # the store's refusal (credentials, bucket, endpoint); s3fs's error for a web server that
            # is no S3 API (a wrong port) says nothing of it
            reason = explained(exc, hint=" (check the bucket and the endpoint URL)")
            if reason is None:
                raise
            # named: the input, the model and the label map may be in other buckets
            raise UnwritableOutput(f"--output {self.root} cannot be written: {reason}") from exc
        finally:
            for folder in created:  # deepest first
                try:
                    os.rmdir(folder)
                except OSError:  # another run has written there meanwhile: its folder now
                    break

    def _unwritable(self, existing: str, exc: OSError) -> UnwritableOutput:
        """Why the probe could not be written to a local output whose nearest existing path is
        `existing`: the output itself, or what is above it."""
        if not os.path.isfile(existing):  # a folder that refused the write (read-only, not ours)
            return UnwritableOutput(f"--output {self.root} cannot be written: {exc.strerror or exc}")
        if existing != self._base:
            return UnwritableOutput(f"--output {self.root} cannot be made: {existing} is a file, not a folder")
        return UnwritableOutput(f"--output {self.root} is a file, not a folder")
