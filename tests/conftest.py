"""Session fixtures: real image files and checkpoints, built once."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network

SIZES = ((120, 90), (64, 200), (333, 250), (97, 97), (256, 128), (50, 300))


def encode_image(array: np.ndarray, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **params)
    return buffer.getvalue()


def random_rgb(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], axis=-1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    """Real JPEG and PNG files of varied sizes and aspect ratios, one in a sub-folder."""
    root = tmp_path_factory.mktemp("images")
    (root / "sub dir").mkdir()
    for i, (w, h) in enumerate(SIZES):
        fmt, ext = ("JPEG", "jpg") if i % 2 == 0 else ("PNG", "png")
        folder = root / "sub dir" if i == 5 else root
        (folder / f"img_{i}.{ext}").write_bytes(encode_image(random_rgb(w, h, i), fmt))
    (root / "notes.txt").write_text("not an image; ignored by listing")
    return root


@pytest.fixture(scope="session")
def untrained_model(tmp_path_factory) -> Path:
    """The tiny untrained MaskFormer (real architecture, random weights): for loading tests only."""
    from pipeline.tiny_model import build

    return build(tmp_path_factory.mktemp("tiny") / "maskformer")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS) on 127.0.0.1 for the whole session."""
    from tests import s3_server as server

    running = server.start(tmp_path_factory.mktemp("seaweedfs"))
    yield running
    server.stop(running)


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's calling card)."""
    import struct
    import zlib

    data = bytearray(encode_image(np.zeros((8, 8), np.uint8), "PNG"))
    struct.pack_into(">II", data, 16, width, height)  # IHDR data starts at byte 16
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)
