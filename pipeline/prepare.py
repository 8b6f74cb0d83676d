"""The CPU stage before inference: read bytes, decode, resize. One failed image = one error row."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from pipeline.memory import release_free_memory
from pipeline.decode import DEFAULT_MAX_PIXELS, decode_image
from pipeline.failures import ImageFailure
from pipeline.model import ModelSource, load_processor, local_dir
from pipeline.preprocess import resize_for_model
from pipeline.read import read_bytes
from pipeline.remote import StorageConfig

EMPTY_IMAGE = np.zeros((3, 0, 0), dtype=np.uint8)


@dataclass(frozen=True)
class PrepareConfig:
    model: str  # checkpoint URI; each node resolves it to its local copy
    max_pixels: int = DEFAULT_MAX_PIXELS
    storage: StorageConfig = StorageConfig()


def prepare_one(uri: str, config: PrepareConfig) -> tuple[np.ndarray, int, int]:
    """Resized (3, h, w) uint8 image for the model, and the original (width, height)."""
    rgb = decode_image(read_bytes(uri, config.storage), config.max_pixels)
    resized = resize_for_model(rgb, load_processor(local_dir(ModelSource(config.model, config.storage))))
    return resized, rgb.shape[1], rgb.shape[0]


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
