"""The cameras' intrinsics for `geometry: essential`, from camera_info, paired with the images by stamp.

No ROS imports: the node hands over each CameraInfo's stamp, K (row-major, 9 numbers) and size, and
asks for the K of an image by its stamp and size. A camera_info stamped like the image is taken; when
there is none (drivers that stamp camera_info apart from the image, or one that arrives after the image
was matched), the newest one received on that input, with the same size, stands in — intrinsics are
fixed for a running camera. Missing or unusable intrinsics give a reason code and a sentence, which the
node counts and logs; they never raise.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..core.geometry import check_intrinsics

CAMERA_INFO_MISSING = "camera_info_missing"
CAMERA_INFO_INCONSISTENT = "camera_info_inconsistent"
KEEP_PER_INPUT = 64  # camera_info messages remembered per input (a few seconds of a 30 Hz camera)


@dataclass(frozen=True)
class CameraInfoEntry:
    stamp_ns: int
    K: tuple[float, ...]  # 9 numbers, row-major
    width: int
    height: int


@dataclass(frozen=True)
class IntrinsicsLookup:
    K: np.ndarray | None  # 3x3 float64, None when unusable
    code: str = ""  # "" | CAMERA_INFO_MISSING | CAMERA_INFO_INCONSISTENT
    reason: str = ""


class IntrinsicsStore:
    """Recent camera_info per input (0: image0's camera, 1: image1's); thread-safe."""

    def __init__(self, topics: list[str], keep: int = KEEP_PER_INPUT) -> None:
        self.topics = topics  # for the messages: which topic was expected
        self._lock = threading.Lock()
        self._entries: list[deque[CameraInfoEntry]] = [deque(maxlen=keep) for _ in topics]

    def add(self, index: int, stamp_ns: int, K: list[float] | tuple[float, ...] | np.ndarray, width: int,
            height: int) -> None:
        entry = CameraInfoEntry(int(stamp_ns), tuple(float(v) for v in np.asarray(K, np.float64).ravel()),
                                int(width), int(height))
        with self._lock:
            self._entries[index].append(entry)

    def lookup(self, index: int, stamp_ns: int, image_width: int, image_height: int) -> IntrinsicsLookup:
        """The K for input `index`'s image stamped `stamp_ns` of this size (see the module docstring)."""
        topic = self.topics[index] if index < len(self.topics) else f"camera_info{index}"
        with self._lock:
            entries = list(self._entries[index]) if index < len(self._entries) else []
        if not entries:
            return IntrinsicsLookup(None, CAMERA_INFO_MISSING,
                                    f"no camera_info received on {topic}: geometry essential needs both cameras' "
                                    "intrinsics (remap camera_info0/camera_info1 to the cameras' camera_info)")
        same_stamp = [e for e in entries if e.stamp_ns == stamp_ns]
        entry = same_stamp[-1] if same_stamp else entries[-1]
        if (entry.width, entry.height) != (image_width, image_height) and (entry.width, entry.height) != (0, 0):
            return IntrinsicsLookup(None, CAMERA_INFO_INCONSISTENT,
                                    f"camera_info on {topic} is for {entry.width}x{entry.height} images but the "
                                    f"image is {image_width}x{image_height}: its K does not apply")
        K = np.asarray(entry.K, np.float64)
        if K.size != 9:
            return IntrinsicsLookup(None, CAMERA_INFO_INCONSISTENT,
                                    f"camera_info on {topic} has {K.size} numbers in K, not 9")
        K3, why = check_intrinsics(K.reshape(3, 3), f"K of {topic}")
        if K3 is None:
            return IntrinsicsLookup(None, CAMERA_INFO_INCONSISTENT, f"camera_info on {topic} is unusable: {why}")
        return IntrinsicsLookup(K3)

    def clear(self) -> None:
        with self._lock:
            for entries in self._entries:
                entries.clear()
