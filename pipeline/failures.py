"""Failures of one image are values: an error row, never an exception that escapes a batch."""

from __future__ import annotations

# Stages an image can fail in, as written to tables/errors.
READ, DECODE, PREPROCESS, INFER, WRITE = "read", "decode", "preprocess", "infer", "write"


class ImageFailure(Exception):
    """One image cannot be processed: `stage` and `error_type` go to the errors table."""

    def __init__(self, stage: str, error_type: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage
        self.error_type = error_type
        self.message = message


def as_failure(stage: str, exc: BaseException) -> ImageFailure:
    """Any exception raised while handling one image, as a failure of that stage."""
    if isinstance(exc, ImageFailure):
        return exc
    message = str(exc)[:500] or type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.strerror is None:  # s3fs's says only the path
        message = f"does not exist: {message}"
    return ImageFailure(stage, type(exc).__name__, message)

