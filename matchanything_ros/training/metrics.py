"""Accuracy measures of the demo model (numpy + OpenCV; no torch), shared by the demo, the benchmark and tests."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class StereoScore:
    matches: int
    with_gt: int  # matches whose image0 pixel has a valid ground-truth disparity
    correct: int  # |y0 - y1| <= y_tol and |(x0 - x1) - d_gt(x0, y0)| <= d_tol

    @property
    def precision(self) -> float:
        """Correct share of the matches that can be checked (invalid ground truth is skipped)."""
        return self.correct / self.with_gt if self.with_gt else 0.0


def stereo_correct_mask(kpts0: np.ndarray, kpts1: np.ndarray, disparity: np.ndarray, y_tol: float = 1.0,
                        d_tol: float = 2.0) -> np.ndarray:
    """[N] bool: the match has a valid ground truth and satisfies both tolerances (see `stereo_score`)."""
    return _stereo_check(kpts0, kpts1, disparity, y_tol, d_tol)[1]


def _stereo_check(kpts0: np.ndarray, kpts1: np.ndarray, disparity: np.ndarray, y_tol: float,
                  d_tol: float) -> tuple[np.ndarray, np.ndarray]:
    k0 = np.asarray(kpts0, np.float64).reshape(-1, 2)
    k1 = np.asarray(kpts1, np.float64).reshape(-1, 2)
    h, w = disparity.shape
    xi = np.round(k0[:, 0]).astype(np.int64)
    yi = np.round(k0[:, 1]).astype(np.int64)
    inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    d = np.full(len(k0), np.nan)
    d[inside] = disparity[yi[inside], xi[inside]]
    has_gt = np.isfinite(d) & (d > 0)
    dx_err = np.abs((k0[:, 0] - k1[:, 0]) - np.where(has_gt, d, 0))
    return has_gt, has_gt & (np.abs(k0[:, 1] - k1[:, 1]) <= y_tol) & (dx_err <= d_tol)


def stereo_score(kpts0: np.ndarray, kpts1: np.ndarray, disparity: np.ndarray, y_tol: float = 1.0,
                 d_tol: float = 2.0) -> StereoScore:
    """Score matches of a rectified pair (left -> right) against a ground-truth disparity map.

    `disparity[y, x]` is the left-image disparity (non-finite or <= 0 = invalid); it is read at the
    rounded image0 keypoint, as reported (the ELoFTR keypoint convention included).
    """
    has_gt, ok = _stereo_check(kpts0, kpts1, disparity, y_tol, d_tol)
    return StereoScore(matches=len(has_gt), with_gt=int(has_gt.sum()), correct=int(ok.sum()))


def corner_error(H_est: np.ndarray | None, H_gt: np.ndarray, width: int, height: int) -> float:
    """Mean distance of image0's four corners mapped by the estimated vs the true homography (inf if none)."""
    if H_est is None:
        return float("inf")
    corners = np.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]], np.float64)

    def apply(H: np.ndarray) -> np.ndarray:
        p = np.c_[corners, np.ones(4)] @ H.T
        return p[:, :2] / p[:, 2:3]

    return float(np.linalg.norm(apply(H_est) - apply(H_gt), axis=1).mean())


def ransac_homography(kpts0: np.ndarray, kpts1: np.ndarray, reproj_px: float = 3.0) -> np.ndarray | None:
    """OpenCV RANSAC homography from matches (None with fewer than 4 or on failure)."""
    import cv2

    if len(kpts0) < 4:
        return None
    H, _ = cv2.findHomography(np.asarray(kpts0, np.float64), np.asarray(kpts1, np.float64), cv2.RANSAC, reproj_px,
                              maxIters=5000, confidence=0.9999)
    return None if H is None else np.asarray(H, np.float64)


def error_auc(errors: list[float], thresholds: tuple[float, ...] = (3.0, 5.0, 10.0)) -> dict[float, float]:
    """Area under the recall-vs-error curve up to each threshold, normalised to [0, 1] (SuperGlue style)."""
    errs = np.sort(np.asarray(errors, np.float64))
    recall = (np.arange(len(errs)) + 1) / max(len(errs), 1)
    errs = np.r_[0.0, errs]
    recall = np.r_[0.0, recall]
    out = {}
    for t in thresholds:
        last = int(np.searchsorted(errs, t))
        x = np.r_[errs[:last], t]
        y = np.r_[recall[:last], recall[last - 1]]
        out[t] = float(np.trapezoid(y, x) / t)
    return out
