"""sensor_msgs/Image <-> numpy, without cv_bridge (not installable here, and its PyPI copy is broken
with NumPy 2 / OpenCV 5).

`image_msg_to_array` accepts any object with the Image fields (`height`, `width`, `encoding`,
`is_bigendian`, `step`, `data`): an rclpy message (data is `array.array`/bytes) or a rosbags
message (data is a NumPy array), so the node and the bag tool share it. It returns what the
matcher takes: mono8 -> uint8 [H, W], mono16 -> uint16 [H, W] (native byte order), colour ->
RGB uint8 [H, W, 3] (BGR reordered, alpha dropped).
"""
from __future__ import annotations

import sys
from typing import Any

import cv2
import numpy as np

from ..core.errors import InputImageError

# encoding -> (channels, bytes per channel)
ENCODINGS: dict[str, tuple[int, int]] = {
    "mono8": (1, 1),
    "mono16": (1, 2),
    "rgb8": (3, 1),
    "bgr8": (3, 1),
    "rgba8": (4, 1),
    "bgra8": (4, 1),
}


_TO_RGB = {"bgr8": cv2.COLOR_BGR2RGB, "rgba8": cv2.COLOR_RGBA2RGB, "bgra8": cv2.COLOR_BGRA2RGB}


class UnsupportedEncodingError(InputImageError):
    """The Image encoding is not one the matcher can read."""


def image_msg_to_array(msg: Any, name: str = "image") -> np.ndarray:
    """Decode a sensor_msgs/Image into a mono or RGB array; raise InputImageError saying what is wrong."""
    encoding = str(msg.encoding)
    if encoding not in ENCODINGS:
        raise UnsupportedEncodingError(
            f"{name}: unsupported encoding {encoding!r} (supported: {', '.join(ENCODINGS)})")
    channels, depth = ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height == 0 or width == 0:
        raise InputImageError(f"{name}: zero-size image ({width}x{height})")
    row_bytes = width * channels * depth
    if step < row_bytes:
        raise InputImageError(
            f"{name}: step {step} is smaller than width*bytes_per_pixel = {width}*{channels * depth} = {row_bytes} "
            f"({encoding})")
    buf = _as_bytes_array(msg.data)
    if buf.size != step * height:
        raise InputImageError(
            f"{name}: data has {buf.size} bytes but step*height = {step}*{height} = {step * height}")
    rows = buf.reshape(height, step)[:, :row_bytes]
    if depth == 2:
        dtype = np.dtype(">u2" if msg.is_bigendian else "<u2")
        arr = np.ascontiguousarray(rows).view(dtype).reshape(height, width).astype(np.uint16)
        return arr
    pixels = rows.reshape(height, width, channels) if channels > 1 else rows.reshape(height, width)
    if encoding in _TO_RGB:
        # OpenCV reorders channels ~30x faster than a strided NumPy copy (0.08 vs 2.2 ms at 640x480)
        return cv2.cvtColor(np.ascontiguousarray(pixels), _TO_RGB[encoding])
    return np.ascontiguousarray(pixels)


def _as_bytes_array(data: Any) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return np.frombuffer(data, dtype=np.uint8)


def to_rgb(array: np.ndarray) -> np.ndarray:
    """A decoded image (mono8/mono16/RGB) as RGB uint8 for drawing (mono16 scaled by its maximum)."""
    if array.ndim == 3:
        return array
    if array.dtype == np.uint16:
        peak = int(array.max()) or 1
        array = (array.astype(np.float32) * (255.0 / peak)).round().astype(np.uint8)
    return np.repeat(array[:, :, None], 3, axis=2)


def array_to_image_fields(array: np.ndarray) -> dict[str, Any]:
    """sensor_msgs/Image fields for a uint8 mono/RGB or uint16 mono array (tightly packed rows)."""
    if array.ndim == 2 and array.dtype == np.uint8:
        encoding = "mono8"
    elif array.ndim == 2 and array.dtype == np.uint16:
        encoding = "mono16"
    elif array.ndim == 3 and array.shape[2] == 3 and array.dtype == np.uint8:
        encoding = "rgb8"
    else:
        raise InputImageError(f"cannot encode an array of shape {array.shape} and dtype {array.dtype} as an Image")
    if array.dtype.byteorder not in ("=", "|"):
        array = array.astype(array.dtype.newbyteorder("="))
    array = np.ascontiguousarray(array)
    height, width = array.shape[:2]
    return {
        "height": height,
        "width": width,
        "encoding": encoding,
        "is_bigendian": int(array.dtype.itemsize > 1 and sys.byteorder == "big"),
        "step": array.strides[0],
        "data": array.tobytes(),
    }


def array_to_image_msg(array: np.ndarray, header: Any = None) -> Any:
    """A sensor_msgs/Image (rclpy class) holding `array`; `header` is copied when given."""
    from sensor_msgs.msg import Image  # ROS import kept local: the rest of this module is ROS-free

    msg = Image()
    for key, value in array_to_image_fields(array).items():
        setattr(msg, key, value)
    if header is not None:
        msg.header = header
    return msg
