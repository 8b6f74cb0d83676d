"""The CPU stage before inference: read bytes, decode. One failed image = one error row.

Light on purpose (PIL and numpy, no torch): the resize for the model happens in the inference
actor (preprocess.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from pipeline.memory import release_free_memory
from pipeline.decode import DEFAULT_MAX_PIXELS, decode_image
from pipeline.failures import PREPROCESS, ImageFailure
from pipeline.read import read_bytes
from pipeline.remote import StorageConfig

EMPTY_IMAGE = np.zeros((0, 0, 3), dtype=np.uint8)
MIN_SIDE = 2  # smaller images cannot be resized meaningfully by the processor


@dataclass(frozen=True)
class PrepareConfig:
    max_pixels: int = DEFAULT_MAX_PIXELS
    storage: StorageConfig = StorageConfig()


def prepare_one(uri: str, config: PrepareConfig) -> tuple[np.ndarray, int, int]:
    """The decoded (H, W, 3) uint8 image and its (width, height)."""
    rgb = decode_image(read_bytes(uri, config.storage), config.max_pixels)
    height, width = rgb.shape[:2]
    if min(height, width) < MIN_SIDE:  # checked here, so that no batch reaching the model holds one
        raise ImageFailure(PREPROCESS, "TooSmall", f"{width}x{height} is too small to segment")
    return rgb, width, height


def prepare_batch(batch: dict[str, np.ndarray], config: PrepareConfig) -> dict[str, np.ndarray]:
    """Adds columns image, width, height, seconds_prepare, error_stage, error_type, error_message;
    keeps the others."""
    n = len(batch["key"])
    images, widths, heights = [], np.zeros(n, np.int32), np.zeros(n, np.int32)
    stages, types, messages = [""] * n, [""] * n, [""] * n
    seconds = np.zeros(n, np.float64)
    for i, uri in enumerate(batch["uri"]):
        start = time.perf_counter()
        try:
            image, widths[i], heights[i] = prepare_one(str(uri), config)
        except ImageFailure as failure:
            image, stages[i], types[i], messages[i] = EMPTY_IMAGE, failure.stage, failure.error_type, failure.message
        images.append(image)
        seconds[i] = time.perf_counter() - start
    column = np.empty(n, dtype=object)
    column[:] = images
    release_free_memory()  # the decoded full-size images just went out of scope
    return {**batch, "image": column, "width": widths, "height": heights, "seconds_prepare": seconds,
            "error_stage": np.asarray(stages), "error_type": np.asarray(types), "error_message": np.asarray(messages)}
