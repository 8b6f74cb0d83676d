"""Valid but unusual images decode to the right RGB; broken ones fail as values."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.decode import decode_image
from pipeline.failures import ImageFailure
from tests.conftest import bomb_png, encode_image, random_rgb

RGB = random_rgb(48, 32, 7)  # (32, 48, 3): width 48, height 32


def _save(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    return _save(Image.fromarray(RGB), "JPEG", exif=exif.tobytes(), quality=95)


VALID = {
    "grayscale": (lambda: _save(Image.fromarray(RGB).convert("L"), "PNG"), (32, 48)),
    "palette": (lambda: _save(Image.fromarray(RGB).convert("P"), "PNG"), (32, 48)),
    "rgba": (lambda: _save(Image.fromarray(RGB).convert("RGBA"), "PNG"), (32, 48)),
    "la": (lambda: _save(Image.fromarray(RGB).convert("LA"), "PNG"), (32, 48)),
    "cmyk_jpeg": (lambda: _save(Image.fromarray(RGB).convert("CMYK"), "JPEG"), (32, 48)),
    "16bit_png": (lambda: _save(Image.fromarray((RGB[..., 0].astype(np.uint16) * 257)), "PNG"), (32, 48)),
    "exif_rotated": (_exif_rotated_jpeg, (48, 32)),
    "progressive": (lambda: _save(Image.fromarray(RGB), "JPEG", progressive=True), (32, 48)),
    "webp": (lambda: _save(Image.fromarray(RGB), "WEBP", lossless=True), (32, 48)),
    "bmp": (lambda: _save(Image.fromarray(RGB), "BMP"), (32, 48)),
    "tiff": (lambda: _save(Image.fromarray(RGB), "TIFF"), (32, 48)),
    "gif": (lambda: _save(Image.fromarray(RGB).convert("P"), "GIF"), (32, 48)),
}


@pytest.mark.parametrize("name", sorted(VALID))
def test_unusual_valid_images_decode_to_rgb(name):
    make, (height, width) = VALID[name]
    rgb = decode_image(make())
    assert rgb.dtype == np.uint8 and rgb.shape == (height, width, 3)
    assert rgb.std() > 10  # real content, not a blank


def test_lossless_modes_keep_pixels():
    assert np.array_equal(decode_image(_save(Image.fromarray(RGB).convert("RGBA"), "PNG")), RGB)
    gray = RGB[..., 0]
    assert np.array_equal(decode_image(_save(Image.fromarray(gray.astype(np.uint16) * 257), "PNG"))[..., 1], gray)


def test_exif_orientation_is_applied():
    upright = decode_image(_save(Image.fromarray(RGB), "JPEG", quality=95))
    rotated = decode_image(_exif_rotated_jpeg())
    assert np.abs(rotated.astype(int) - np.rot90(upright, k=-1).astype(int)).mean() < 3


BROKEN = {
    "zero_bytes": (b"", "EmptyFile"),
    "text": (b"just some text, not an image\n" * 10, "NotAnImage"),
    "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>', "NotAnImage"),
    "truncated_jpeg": (encode_image(random_rgb(300, 200, 3), "JPEG")[:2000], None),
    "truncated_png": (encode_image(random_rgb(300, 200, 3), "PNG")[:3000], None),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_inputs_fail_as_decode_errors(name):
    data, error_type = BROKEN[name]
    with pytest.raises(ImageFailure) as info:
        decode_image(data)
    assert info.value.stage == "decode" and info.value.message
    if error_type:
        assert info.value.error_type == error_type


def test_decompression_bomb_is_refused_before_decoding():
    # A 30000x30000 PNG header over a tiny body: refused on its declared size alone.
    with pytest.raises(ImageFailure) as info:
        decode_image(bomb_png(), max_pixels=100_000_000)
    # past Pillow's own hard limit, which it checks on opening: the message still names ours
    assert info.value.error_type == "TooManyPixels" and "over the limit of 100000000 pixels" in info.value.message


def test_the_pixel_limit_is_ours_not_pillows():
    """Pillow warns from 89.5 M pixels: the documented limit (100 M by default) decides instead."""
    with pytest.raises(ImageFailure) as info:
        decode_image(bomb_png(9747, 9747), max_pixels=95_000_000)  # 95.0 M pixels
    assert info.value.error_type == "TooManyPixels" and "limit of 95000000 pixels" in info.value.message
