"""The result of matching one image pair, in ORIGINAL-image pixel coordinates."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class MatchResult:
    """Matches between image0 and image1.

    keypoints0/keypoints1: float32 [N, 2] (x, y) pixels of the original input images,
    origin top-left, x right, y down. confidence: float32 [N]. Row k of each is one match.
    """

    keypoints0: np.ndarray
    keypoints1: np.ndarray
    confidence: np.ndarray
    image0_size: tuple[int, int]  # (width, height) of the original image0
    image1_size: tuple[int, int]
    timings_ms: dict[str, float] = field(default_factory=dict)  # preprocess/inference/postprocess
    extras: dict[str, Any] = field(default_factory=dict)  # variant-specific diagnostics

    def __len__(self) -> int:
        return int(self.confidence.shape[0])

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "num_matches": len(self),
            "image0_size": list(self.image0_size),
            "image1_size": list(self.image1_size),
            "keypoints0": self.keypoints0.astype(float).tolist(),
            "keypoints1": self.keypoints1.astype(float).tolist(),
            "confidence": self.confidence.astype(float).tolist(),
            "timings_ms": dict(self.timings_ms),
        }
