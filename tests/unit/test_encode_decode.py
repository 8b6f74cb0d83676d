import numpy as np
import pytest

from pipeline.decode import decode_image
from pipeline.encode import panoptic_png, read_panoptic_png, smallest_id_dtype
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
