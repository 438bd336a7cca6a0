"""sensor_msgs/Image <-> numpy for the node and the bag tool, on real rclpy messages after a CDR round trip."""
from __future__ import annotations

import numpy as np
import pytest

from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from matchanything_ros.core.errors import InputImageError  # noqa: E402
from matchanything_ros.ros.image_conv import (  # noqa: E402
    UnsupportedEncodingError,
    array_to_image_msg,
    image_msg_to_array,
    to_rgb,
)

pytestmark = pytest.mark.ros  # rclpy message classes and serialization (no DDS traffic)

RNG = np.random.default_rng(7)
H, W = 5, 7


def make_msg(encoding: str, pixels: np.ndarray, pad: int = 0, bigendian: bool = False) -> Image:
    """An Image as a driver would send it: rows of `pixels` bytes followed by `pad` junk bytes."""
    raw = pixels.astype(pixels.dtype.newbyteorder(">" if bigendian else "<")) if pixels.dtype.itemsize > 1 else pixels
    rows = raw.reshape(H, -1).view(np.uint8)
    padded = np.concatenate([rows, np.full((H, pad), 0xAB, np.uint8)], axis=1)
    msg = Image(height=H, width=W, encoding=encoding, is_bigendian=int(bigendian), step=padded.shape[1])
    msg.data = padded.tobytes()
    return deserialize_message(serialize_message(msg), Image)  # data comes back as rclpy gives it


RGB = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, (H, W, 1), dtype=np.uint8)


@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize(
    "encoding, pixels, expected",
    [
        ("rgb8", RGB, RGB),
        ("bgr8", RGB[:, :, ::-1], RGB),
        ("rgba8", np.concatenate([RGB, ALPHA], 2), RGB),
        ("bgra8", np.concatenate([RGB[:, :, ::-1], ALPHA], 2), RGB),
        ("mono8", RGB[:, :, 0], RGB[:, :, 0]),
    ],
)
def test_8bit_encodings_decode_to_rgb_or_mono(encoding, pixels, expected, pad):
    out = image_msg_to_array(make_msg(encoding, np.ascontiguousarray(pixels), pad=pad))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("bigendian", [False, True])
@pytest.mark.parametrize("pad", [0, 2])
def test_mono16_honours_endianness_and_padding(bigendian, pad):
    depth = RNG.integers(0, 65536, (H, W), dtype=np.uint16)
    depth[0, 0] = 0x0102  # asymmetric bytes: a byte-order mistake would show
    out = image_msg_to_array(make_msg("mono16", depth, pad=pad, bigendian=bigendian))
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, depth)


def test_unsupported_encoding_is_named():
    msg = make_msg("mono8", RGB[:, :, 0])
    msg.encoding = "rgb10_packed"
    with pytest.raises(UnsupportedEncodingError, match=r"image0: unsupported encoding 'rgb10_packed'.*mono8"):
        image_msg_to_array(msg, "image0")


def test_16bit_colour_is_unsupported_not_misread():
    msg = make_msg("mono16", RNG.integers(0, 65536, (H, W * 3), dtype=np.uint16).reshape(H, W * 3))
    msg.encoding = "rgb16"
    with pytest.raises(UnsupportedEncodingError, match="rgb16"):
        image_msg_to_array(msg)


def test_zero_size_image():
    msg = Image(height=0, width=0, encoding="rgb8", step=0)
    with pytest.raises(InputImageError, match=r"zero-size image \(0x0\)"):
        image_msg_to_array(msg)


def test_step_smaller_than_a_row():
    msg = make_msg("rgb8", RGB)
    msg.step = W * 3 - 1
    with pytest.raises(InputImageError, match="step 20 is smaller than width"):
        image_msg_to_array(msg)


def test_data_length_not_step_times_height():
    msg = make_msg("rgb8", RGB, pad=2)
    msg.data = bytes(msg.data)[:-1]
    with pytest.raises(InputImageError, match=r"data has 114 bytes but step\*height = 23\*5 = 115"):
        image_msg_to_array(msg)


def test_rosbags_style_numpy_data_is_accepted():
    class BagImage:  # rosbags deserializes uint8[] as a NumPy array
        height, width, encoding, is_bigendian, step = H, W, "bgr8", 0, W * 3
        data = np.ascontiguousarray(RGB[:, :, ::-1]).reshape(-1)

    np.testing.assert_array_equal(image_msg_to_array(BagImage()), RGB)


@pytest.mark.parametrize("array", [RGB, RGB[:, :, 0], RNG.integers(0, 65536, (H, W), dtype=np.uint16)],
                         ids=["rgb8", "mono8", "mono16"])
def test_array_to_image_round_trip(array):
    msg = deserialize_message(serialize_message(array_to_image_msg(array)), Image)
    np.testing.assert_array_equal(image_msg_to_array(msg), array)


def test_array_to_image_copies_the_header():
    src = make_msg("rgb8", RGB)
    src.header.frame_id = "cam0"
    src.header.stamp.sec = 42
    out = array_to_image_msg(RGB, src.header)
    assert (out.header.frame_id, out.header.stamp.sec, out.encoding) == ("cam0", 42, "rgb8")


def test_to_rgb_for_drawing():
    assert to_rgb(RGB[:, :, 0]).shape == (H, W, 3)
    depth = np.array([[0, 1000]], np.uint16)
    np.testing.assert_array_equal(to_rgb(depth)[0, :, 0], [0, 255])
