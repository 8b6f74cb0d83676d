"""Segment-id maps <-> COCO panoptic PNGs (RGB, id = R + 256*G + 256^2*B, 0 = void)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

PNG_COMPRESS_LEVEL = 1  # ids compress well even at level 1; higher levels cost CPU for little


def ids_to_rgb(segment_ids: np.ndarray) -> np.ndarray:
    """(H, W) int -> (H, W, 3) uint8 in COCO panoptic id encoding."""
    ids = segment_ids.astype(np.uint32, copy=False)
    return np.stack([ids & 0xFF, (ids >> 8) & 0xFF, (ids >> 16) & 0xFF], axis=-1).astype(np.uint8)


def rgb_to_ids(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 in COCO panoptic id encoding -> (H, W) int32."""
    rgb = rgb.astype(np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def png_bytes(array: np.ndarray, compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """(H, W, 3) uint8 or (H, W) uint8/uint16 -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def panoptic_png(segment_ids: np.ndarray) -> bytes:
    """(H, W) segment ids -> COCO panoptic PNG bytes."""
    return png_bytes(ids_to_rgb(segment_ids))


def read_panoptic_png(data: bytes) -> np.ndarray:
    """COCO panoptic PNG bytes -> (H, W) int32 segment ids."""
    return rgb_to_ids(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def smallest_id_dtype(segment_ids: np.ndarray) -> np.ndarray:
    """The same map in the narrowest unsigned dtype that holds its ids (less to move between stages)."""
    peak = int(segment_ids.max(initial=0))
    dtype = np.uint8 if peak < 2**8 else np.uint16 if peak < 2**16 else np.int32
    return segment_ids.astype(dtype, copy=False)
