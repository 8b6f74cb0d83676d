"""How to reach object storage: an S3-compatible endpoint, anonymous reads. Never credentials.

Credentials come from the standard AWS chain on every node (environment, profile, instance role),
and `AWS_ENDPOINT_URL` is honoured by botocore itself; nothing here holds or logs a secret.
"""

from __future__ import annotations

from dataclasses import dataclass

S3_SCHEMES = ("s3://", "s3a://")


@dataclass(frozen=True)
class StorageConfig:
    endpoint_url: str | None = None  # e.g. http://127.0.0.1:8333 for an S3-compatible store
    anonymous: bool = False  # unsigned requests, for reading public buckets

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
