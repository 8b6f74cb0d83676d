"""Image bytes -> RGB uint8 array, EXIF orientation applied, unusual modes normalised."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipeline.failures import DECODE, ImageFailure

DEFAULT_MAX_PIXELS = 100_000_000
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey image


def _to_rgb(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 from any PIL mode; alpha is dropped, 16/32-bit scaled to 8-bit."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        gray = np.clip(np.rint(values * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "F":
        gray = np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "P":
        image = image.convert("RGBA")  # palette with transparency converts cleanly only via RGBA
    return np.array(image.convert("RGB"))


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode one encoded image to (H, W, 3) uint8 RGB with EXIF orientation applied.

    Raises `ImageFailure` (stage "decode") for empty, truncated, unknown or oversized input.
    """
    if not data:
        raise ImageFailure(DECODE, "EmptyFile", "the object has zero bytes")
    try:
        with warnings.catch_warnings():
            # Pillow warns from 89.5 M pixels; our own limit (checked below) decides instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageFailure(
                    DECODE, "TooManyPixels", f"{width}x{height} exceeds the limit of {max_pixels} pixels"
                )
            image = ImageOps.exif_transpose(image)  # loads the pixels
            return _to_rgb(image)
    except ImageFailure:
        raise
    except UnidentifiedImageError:
        raise ImageFailure(DECODE, "NotAnImage", "not a recognised image format") from None
    except Image.DecompressionBombError as exc:  # Pillow's hard limit, twice its warning, checked on opening
        raise ImageFailure(DECODE, "TooManyPixels", f"over the limit of {max_pixels} pixels: {exc}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageFailure(DECODE, type(exc).__name__, str(exc)[:300]) from None
