"""Camera encodings the node converts instead of refusing (no ROS needed: the conversion takes any
object with the Image fields). Flat colours make the Bayer pattern mapping and the YUV byte order
checkable: a wrong OpenCV code swaps red and blue, or U and V."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from matchanything_ros.core.errors import InputImageError
from matchanything_ros.ros.image_conv import (check_compressed_msg, check_image_msg, compressed_msg_to_array,
                                              image_msg_to_array)
from test_bad_input_catalogue import mosaic, png_bomb, yuv422  # noqa: E402  (the catalogue's generators)

COLOUR = np.array([200, 100, 50], np.uint8)  # R, G, B all different
FLAT = np.broadcast_to(COLOUR, (64, 96, 3)).copy()


def fake_msg(array: np.ndarray, encoding: str, bigendian: bool = False) -> SimpleNamespace:
    """Image fields for `array` (pixels of any dtype, byte order as stored)."""
    arr = np.ascontiguousarray(array)
    return SimpleNamespace(height=arr.shape[0], width=arr.shape[1], encoding=encoding, is_bigendian=int(bigendian),
                           step=arr.strides[0], data=arr.view(np.uint8).tobytes())


@pytest.mark.parametrize("pattern", ["rggb", "bggr", "gbrg", "grbg"])
def test_bayer_patterns_give_back_the_colour(pattern):
    rgb = image_msg_to_array(fake_msg(mosaic(FLAT, pattern), f"bayer_{pattern}8"))
    assert rgb.shape == FLAT.shape and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[4:-4, 4:-4], FLAT[4:-4, 4:-4])  # interior: exact for a flat colour
    rgb16 = image_msg_to_array(fake_msg(mosaic(FLAT.astype(np.uint16) * 257, pattern), f"bayer_{pattern}16"))
    np.testing.assert_array_equal(rgb16[4:-4, 4:-4], FLAT[4:-4, 4:-4].astype(np.uint16) * 257)


@pytest.mark.parametrize("encoding,order", [("yuv422", "uyvy"), ("uyvy", "uyvy"), ("yuyv", "yuyv"),
                                            ("yuv422_yuy2", "yuyv")])
def test_yuv422_byte_orders_give_back_the_colour(encoding, order):
    rgb = image_msg_to_array(fake_msg(yuv422(FLAT, order), encoding))
    assert np.abs(rgb.astype(int) - FLAT).max() <= 2  # YUV rounding only


def test_big_endian_mono16_equals_little_endian():
    values = (np.arange(64 * 96, dtype=np.uint16).reshape(64, 96) * 7)
    little = image_msg_to_array(fake_msg(values.astype("<u2"), "mono16"))
    big = image_msg_to_array(fake_msg(values.astype(">u2"), "mono16", True))
    np.testing.assert_array_equal(little, values)
    np.testing.assert_array_equal(big, values)


def test_float_intensity_uses_the_library_rule():
    gray = np.linspace(0, 1, 64 * 96, dtype=np.float32).reshape(64, 96)
    out = image_msg_to_array(fake_msg(gray, "32FC1"))
    np.testing.assert_array_equal(out, np.rint(gray.astype(np.float64) * 255).astype(np.uint8))


def test_checks_read_no_pixels_and_name_the_problem():
    msg = fake_msg(FLAT, "rgb8")
    msg.width, msg.height = 100_000, 100_000
    with pytest.raises(InputImageError, match="more than the 67108864 this node accepts"):
        check_image_msg(msg, "image0")
    with pytest.raises(InputImageError, match="compressed image with no data"):
        check_compressed_msg(SimpleNamespace(format="jpeg", data=b""), "image1")
    with pytest.raises(InputImageError, match="too large to decode safely"):
        compressed_msg_to_array(SimpleNamespace(format="png", data=png_bomb()), "image0")
