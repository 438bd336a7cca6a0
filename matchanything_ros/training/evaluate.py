"""Accuracy benchmark of an ELoFTR model on data it never saw in training.

* Middlebury 2014 "Motorcycle" (scikit-image's 4x down-sampled pair): matches, share with
  |y0 - y1| <= 1 px and |(x0 - x1) - d_gt| <= 2 px.
* Held-out photos (`HELDOUT_IMAGES`) under seeded random homographies: AUC of the corner error
  after a RANSAC homography at 3/5/10 px, plain and with image1 changed to another "modality".
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..core.result import MatchResult
from .images import HELDOUT_IMAGES, load_skimage_rgb
from .metrics import StereoScore, corner_error, error_auc, ransac_homography, stereo_score

MatchFn = Callable[[np.ndarray, np.ndarray], MatchResult]
MODALITIES = ("plain", "inverted", "edges")


@dataclass
class StereoResult:
    score: StereoScore
    seconds: float
    result: MatchResult


def eval_stereo(match: MatchFn) -> StereoResult:
    import skimage.data

    left, right, disp = skimage.data.stereo_motorcycle()
    match(left, right)  # warm-up (first-call allocations), not timed
    t = time.perf_counter()
    res = match(left, right)
    dt = time.perf_counter() - t
    return StereoResult(stereo_score(res.keypoints0, res.keypoints1, disp), dt, res)


def random_homography(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A moderate random homography that keeps most of the image in view (corners move <= 15 % of the size)."""
    import cv2

    src = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float32)
    jitter = rng.uniform(-0.15, 0.15, size=(4, 2)) * np.array([width, height])
    angle = np.deg2rad(rng.uniform(-15, 15))
    centre = np.array([width / 2, height / 2])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    scale = 2 ** rng.uniform(-0.3, 0.3)
    dst = (src - centre) @ rot.T * scale + centre + jitter
    return np.asarray(cv2.getPerspectiveTransform(src, dst.astype(np.float32)), np.float64)


def change_modality(image: np.ndarray, modality: str) -> np.ndarray:
    """RGB uint8 -> the same scene in another 'modality' (inverted intensities, or a Sobel edge map)."""
    import cv2

    if modality == "plain":
        return image
    if modality == "inverted":
        return 255 - image
    if modality == "edges":
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
        mag = np.hypot(cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1))
        edge = np.clip(mag / max(float(mag.max()), 1e-6) * 255 * 2, 0, 255).astype(np.uint8)
        return np.repeat(edge[:, :, None], 3, axis=2)
    raise ValueError(f"unknown modality {modality!r}; choose one of {MODALITIES}")


def homography_pairs(per_image: int, seed: int = 0) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(name, image0, image1, H_0to1) for each held-out photo: seeded homographies, linear warp, black border."""
    import cv2

    rng = np.random.default_rng(seed)
    pairs = []
    for src in HELDOUT_IMAGES:
        img = load_skimage_rgb(src.name)
        h, w = img.shape[:2]
        for _ in range(per_image):
            H = random_homography(rng, w, h)
            warped = cv2.warpPerspective(img, H, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
            pairs.append((src.name, img, warped, H))
    return pairs


def eval_homographies(match: MatchFn, pairs: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
                      modality: str = "plain") -> dict[str, Any]:
    errors, counts = [], []
    for _name, img0, img1, H in pairs:
        res = match(img0, change_modality(img1, modality))
        counts.append(len(res))
        H_est = ransac_homography(res.keypoints0, res.keypoints1)
        errors.append(corner_error(H_est, H, img0.shape[1], img0.shape[0]))
    auc = error_auc(errors)
    return {"modality": modality, "pairs": len(pairs), "auc3": auc[3.0], "auc5": auc[5.0], "auc10": auc[10.0],
            "median_matches": float(np.median(counts)), "median_corner_error": float(np.median(errors))}
