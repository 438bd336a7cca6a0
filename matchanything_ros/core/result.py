"""The result of matching one image pair, in ORIGINAL-image pixel coordinates."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .geometry import GeometryResult


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
    timings_ms: dict[str, float] = field(default_factory=dict)  # preprocess/inference/postprocess(/verify)
    extras: dict[str, Any] = field(default_factory=dict)  # variant-specific diagnostics
    # the geometric verification's verdict (model, 3x3 matrix, one inlier flag per match); None: geometry none
    geometry: GeometryResult | None = None

    def __len__(self) -> int:
        return int(self.confidence.shape[0])

    @property
    def inliers(self) -> np.ndarray | None:
        """bool [N]: match k is an inlier of the fitted model (all False when none was found); None: not verified."""
        return None if self.geometry is None else self.geometry.inliers

    @property
    def model_matrix(self) -> np.ndarray | None:
        """float64 [3, 3] homography / fundamental / essential matrix, or None."""
        return None if self.geometry is None else self.geometry.matrix

    def only_inliers(self) -> "MatchResult":
        """This result restricted to the inliers of its model (no model: no matches)."""
        if self.geometry is None:
            return self
        keep = np.asarray(self.geometry.inliers, bool)
        geometry = dataclasses.replace(self.geometry, inliers=np.ones(int(keep.sum()), bool),
                                       extras={**self.geometry.extras, "num_matches": len(keep)})
        # per-match extras (e.g. ELoFTR's coarse cells, RoMa's model-size keypoints) follow their matches
        extras = {k: v[keep] if isinstance(v, np.ndarray) and v.shape[:1] == keep.shape else v
                  for k, v in self.extras.items()}
        return dataclasses.replace(self, keypoints0=self.keypoints0[keep], keypoints1=self.keypoints1[keep],
                                   confidence=self.confidence[keep], geometry=geometry, extras=extras)

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "num_matches": len(self),
            "image0_size": list(self.image0_size),
            "image1_size": list(self.image1_size),
            "keypoints0": self.keypoints0.astype(float).tolist(),
            "keypoints1": self.keypoints1.astype(float).tolist(),
            "confidence": self.confidence.astype(float).tolist(),
            "timings_ms": dict(self.timings_ms),
            **({"geometry": self.geometry.to_json_dict()} if self.geometry is not None else {}),
        }
