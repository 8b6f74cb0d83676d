import numpy as np
import pytest

from pipeline.decode import decode_image
from pipeline.encode import ids_to_rgb, panoptic_png, png_bytes, read_panoptic_png, smallest_id_dtype
from pipeline.failures import ImageFailure
from tests.conftest import encode_image, random_rgb


def test_panoptic_png_round_trip_covers_three_bytes():
    ids = np.array([[0, 1, 255], [256, 65535, 70000]], dtype=np.int32)
    assert np.array_equal(read_panoptic_png(panoptic_png(ids)), ids)


def test_panoptic_png_encodes_coco_rgb():
    from PIL import Image
    import io

    rgb = np.asarray(Image.open(io.BytesIO(panoptic_png(np.array([[1 + 2 * 256 + 3 * 65536]], np.int32)))))
    assert rgb[0, 0].tolist() == [1, 2, 3]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32])
def test_ids_to_rgb_fills_the_bytes_each_dtype_holds(dtype):
    ids = np.array([[0, 1, 255], [256, 65535, 70000]], np.int64) % np.iinfo(dtype).max
    expected = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1)
    assert np.array_equal(ids_to_rgb(ids.astype(dtype)), expected)


@pytest.mark.parametrize("shape, dtype", [((37, 53, 3), np.uint8), ((37, 53), np.uint8), ((37, 53), np.uint16),
                                          ((1, 1, 3), np.uint8), ((2, 900), np.uint16)])
@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
def test_png_bytes_read_back_by_pillow_and_libpng(shape, dtype):
    """Our own PNG writer: Pillow (which checks every chunk's CRC) and libpng (through
    torchvision) read back the exact samples, 16-bit ones big-endian as PNG requires."""
    import io

    import torch
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_png

    rng = np.random.default_rng(0)
    array = rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)
    array[: shape[0] // 2] = array[0]  # long runs, as in segment maps, as well as noise
    data = png_bytes(array)
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.size == (shape[1], shape[0]) and np.array_equal(np.asarray(image).astype(dtype), array)
    decoded = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.UNCHANGED)
    assert np.array_equal(decoded.permute(1, 2, 0).numpy().reshape(shape).astype(dtype), array)


@pytest.mark.parametrize("array", [np.zeros((4, 4), np.int32), np.zeros((4, 4, 4), np.uint8),
                                   np.zeros((4, 4, 3), np.uint16), np.zeros((0, 4), np.uint8)])
def test_png_bytes_refuses_what_png_cannot_hold_as_given(array):
    with pytest.raises(ValueError, match="as PNG"):
        png_bytes(array)


def test_smallest_id_dtype():
    assert smallest_id_dtype(np.array([[3]], np.int32)).dtype == np.uint8
    assert smallest_id_dtype(np.array([[300]], np.int32)).dtype == np.uint16
    assert smallest_id_dtype(np.array([[70000]], np.int32)).dtype == np.int32


def test_decode_jpeg_and_png():
    rgb = random_rgb(40, 30, 0)
    assert np.array_equal(decode_image(encode_image(rgb, "PNG")), rgb)
    decoded = decode_image(encode_image(rgb, "JPEG", quality=95, subsampling=0))
    assert decoded.shape == (30, 40, 3) and np.abs(decoded.astype(int) - rgb).mean() < 4


@pytest.mark.parametrize("data, error_type", [(b"", "EmptyFile"), (b"hello, not an image", "NotAnImage")])
def test_decode_failures_are_values(data, error_type):
    with pytest.raises(ImageFailure) as info:
        decode_image(data)
    assert info.value.stage == "decode" and info.value.error_type == error_type


def test_truncated_jpeg_fails():
    data = encode_image(random_rgb(200, 200, 1), "JPEG")
    with pytest.raises(ImageFailure):
        decode_image(data[: len(data) // 2])


def test_pixel_limit():
    with pytest.raises(ImageFailure) as info:
        decode_image(encode_image(random_rgb(100, 100, 2), "PNG"), max_pixels=5000)
    assert info.value.error_type == "TooManyPixels"
