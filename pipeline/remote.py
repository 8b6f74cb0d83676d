"""How to reach object storage: an S3-compatible endpoint, anonymous reads. Never credentials.

Credentials come from the standard AWS chain on every node (environment, profile, instance role),
and `AWS_ENDPOINT_URL` is honoured by botocore itself; nothing here holds or logs a secret.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

S3_SCHEMES = ("s3://", "s3a://")
# The most one request to an object store may take, its retries included. botocore gives up on a
# response that stops coming (s3fs: after 15 s, retried), but not on a PUT waiting for "100
# Continue": a store that accepts connections and never answers (a hung proxy or load balancer)
# would hold a run, and its cleanup after Ctrl-C or SIGTERM, for ever; and retried reads took
# minutes per image.
REQUEST_SECONDS = 60.0
# A request moving a known number of bytes gets REQUEST_SECONDS more this per byte: a large upload
# or copy on a slow but live link is not cut off, one to a store that stopped answering still is.
MIN_BYTES_PER_SECOND = 1 << 20


def transfer_seconds(size: int) -> float:
    """The time limit of a request that moves `size` bytes."""
    return REQUEST_SECONDS + size / MIN_BYTES_PER_SECOND


@dataclass(frozen=True)
class StorageConfig:
    endpoint_url: str | None = None  # e.g. http://127.0.0.1:8333 for an S3-compatible store
    anonymous: bool = False  # unsigned requests, for reading public buckets

    def signed(self) -> StorageConfig:
        """These settings with credentials: `--anonymous` reads a public input bucket, while the
        model and the label map may well be private (and the output always is written signed)."""
        return replace(self, anonymous=False)

    def options(self, url: str, write: bool = False) -> dict:
        """fsspec keyword arguments for `url` (none for non-S3 URLs)."""
        if not url.startswith(S3_SCHEMES):
            return {}
        options: dict = {}
        if self.endpoint_url:
            options["endpoint_url"] = self.endpoint_url
        if self.anonymous and not write:
            options["anon"] = True
        return options


class UnsupportedURL(ValueError):
    """A URL whose scheme fsspec does not know, or whose package is not installed."""


def file_system(url: str, storage: StorageConfig, write: bool = False) -> tuple[AbstractFileSystem, str]:
    """(fsspec file system of `url`'s scheme, the path in it). Unlike `fsspec.core.url_to_fs`,
    a "::" in a name belongs to the name (fsspec would read it as a chain of file systems)."""
    import fsspec

    protocol, _ = fsspec.core.split_protocol(url)
    try:
        fs = fsspec.filesystem(protocol or "file", **storage.options(url, write=write))
    except (ValueError, ImportError) as exc:  # "Protocol not known: foo", "Please install gcsfs ..."
        raise UnsupportedURL(f"cannot open {url}: {exc}") from exc
    return fs, fs._strip_protocol(url)


class StorageTimeout(TimeoutError):
    """A request to an object store did not finish in time; the message names it."""


def request(fs: AbstractFileSystem, method: str, target: str | list[str], *args, seconds: float | None = None,
            context: str = "", **kwargs):
    """`fs.<method>(target, *args, **kwargs)`, given up after `seconds` (REQUEST_SECONDS by
    default) on an object store; StorageTimeout then, naming the request (and `context`, for a
    `call_s3` whose target is the S3 operation). fsspec cancels the request: a PUT cancelled
    while it waits for "100 Continue" has sent nothing of its body."""
    from fsspec.exceptions import FSTimeoutError

    if not fs.async_impl:  # local: the operating system's own calls
        return getattr(fs, method)(target, *args, **kwargs)
    seconds = REQUEST_SECONDS if seconds is None else seconds
    try:
        return getattr(fs, method)(target, *args, timeout=max(seconds, 0.001), **kwargs)  # fsspec reads 0 as no limit
    except FSTimeoutError:
        if method == "call_s3":
            what = f"{target} under {context}"
        else:
            remote = args[0] if method == "put_file" else target  # put_file(local, remote)
            what = f"{first_protocol(fs)}://{remote if isinstance(remote, str) else remote[0]}"
            what += "" if isinstance(remote, str) else f" and {len(remote) - 1} more"
        raise StorageTimeout(f"a request to the storage endpoint did not finish within {seconds:.0f} s "
                             f"({method} of {what})") from None


def first_protocol(fs: AbstractFileSystem) -> str:
    """The file system's protocol, its first name where it has several (s3fs: "s3", "s3a")."""
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


_SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_DENIED = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken")


def file_version(entry: dict) -> tuple[str, int | None, str]:
    """(name, size, version) of a file from an fsspec `ls(detail=True)` entry; the version (the
    ETag on object stores, else the modification time) changes whenever the content does."""
    return entry["name"], entry.get("size"), str(entry.get("ETag") or entry.get("LastModified") or entry.get("mtime"))


def redact(text: str) -> str:
    """`text` with any secret of the credential chain's environment replaced by ***."""
    import os

    for name in _SECRET_VARIABLES:
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


# botocore's errors for an endpoint that does not answer (none of them an OSError)
UNREACHABLE = frozenset({"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError"})


def unreachable_message(message: str) -> str:
    return f"cannot reach the storage endpoint: {message}"


def storage_error_message(exc: BaseException) -> str | None:
    """A one-line explanation of a storage failure a user can fix, or None if it is not one."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & UNREACHABLE:
        return unreachable_message(str(exc))
    if "NoCredentialsError" in names:
        return ("no credentials found for s3:// (set AWS_* variables or a profile; --anonymous reads a public "
                "input bucket, it cannot write an output)")
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "") if "ClientError" in names else ""
    if code == "NoSuchBucket":
        return f"bucket does not exist: {exc}"
    if code in _DENIED or isinstance(exc, PermissionError):
        return f"access denied by the storage (check credentials and permissions): {exc}"
    # an HTTP server, but no S3 API, at the endpoint (a wrong port)
    if names & {"ResponseParserError", "HTTPClientError"}:
        return f"the storage endpoint does not answer as S3 does (check the endpoint URL): {str(exc)[:200]}"
    return None


def explained(exc: BaseException, hint: str = "") -> str | None:
    """`storage_error_message`, or else an OSError's type and message followed by `hint`; None for
    anything else (a bug)."""
    reason = storage_error_message(exc)
    if reason is None and isinstance(exc, OSError):
        reason = f"{type(exc).__name__}: {exc}{hint}"
    return reason
