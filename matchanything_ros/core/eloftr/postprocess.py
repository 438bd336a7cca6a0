"""Host-side (numpy) parts of ELoFTR shared by every backend.

* `select_coarse_matches`: threshold + border removal on the valid region + row-major order,
  from either the top-K candidates of the "coarse" graph or the full confidence matrix.
* `to_original_pixels`: canvas keypoints -> original-image pixels, as the official wrapper and
  `match_dense.match_images` do it, in float32.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # keep this module free of OpenCV/Pillow (the GPU benchmark imports it)
    from .preprocess import ImageMeta

log = logging.getLogger(__name__)


@dataclass
class CoarseMatches:
    i_ids: np.ndarray  # int64 [M] cells of image0 (row-major over the coarse grid)
    j_ids: np.ndarray  # int64 [M] cells of image1
    mconf: np.ndarray  # float32 [M] dual-softmax confidence
    truncated_rows: int = 0  # rows whose K candidates all passed the threshold (more may exist)
    total: int = -1  # matches passing before the cap (-1: = len(i_ids), nothing was capped)

    @property
    def capped(self) -> bool:
        return self.total > self.i_ids.size


def keep_most_confident(cm: CoarseMatches, max_matches: int) -> CoarseMatches:
    """A frame over the cap keeps its most confident matches, in the usual row-major order: those above the
    (max_matches+1)-th largest confidence (ties at that value are all dropped, so at most max_matches stay).
    The same rule as the device graphs' `model.confidence_floor`."""
    n = cm.i_ids.size
    if n <= max_matches:
        return CoarseMatches(cm.i_ids, cm.j_ids, cm.mconf, cm.truncated_rows, n)
    floor = np.partition(cm.mconf, n - max_matches - 1)[n - max_matches - 1]
    keep = cm.mconf > floor
    return CoarseMatches(cm.i_ids[keep], cm.j_ids[keep], cm.mconf[keep], cm.truncated_rows, n)


def border_keep(mask: np.ndarray, border: int) -> np.ndarray:
    """[Hc,Wc] bool valid mask -> flat [Hc*Wc] bool: valid region minus `border` cells at each side.

    The original's `mask_border_with_padding`: the first `border` rows/cols of the grid and the last
    `border` rows/cols of the VALID region are dropped (valid size = the largest row/col count).
    """
    h_valid = int(mask.sum(0).max())
    w_valid = int(mask.sum(1).max())
    keep = np.zeros(mask.shape, dtype=bool)
    keep[border:max(h_valid - border, border), border:max(w_valid - border, border)] = True
    return keep.reshape(-1)


def select_coarse_matches(
    outputs: dict[str, np.ndarray], mask0: np.ndarray, mask1: np.ndarray, threshold: float, border: int,
    max_matches: int | None = None,
) -> CoarseMatches:
    """Coarse graph outputs -> the original's (i, j, conf) list: conf > thr, border-removed, row-major;
    with `max_matches`, at most that many (`keep_most_confident`): the fine level's work stays bounded.

    `outputs` holds either `conf` [1,L0,L1] (exact at any threshold) or `cand_j`/`cand_conf`
    [1,L0,K] (exact when at most K cells of a row can pass, i.e. threshold >= 1/(K+1)).
    """
    cm = _select(outputs, mask0, mask1, threshold, border)
    return cm if max_matches is None else keep_most_confident(cm, max_matches)


def _select(outputs: dict[str, np.ndarray], mask0: np.ndarray, mask1: np.ndarray, threshold: float,
            border: int) -> CoarseMatches:
    keep0 = border_keep(mask0, border)
    keep1 = border_keep(mask1, border)
    if "conf" in outputs:
        conf = outputs["conf"][0]
        passed = (conf > threshold) & keep0[:, None] & keep1[None, :]
        if threshold <= 0:  # the original also drops exact zeros when everything passes
            passed &= conf != 0
        i_ids, j_ids = np.nonzero(passed)  # row-major, as torch.where
        return CoarseMatches(i_ids.astype(np.int64), j_ids.astype(np.int64), conf[i_ids, j_ids].astype(np.float32))
    cand_j = outputs["cand_j"][0].astype(np.int64)
    cand_conf = outputs["cand_conf"][0].astype(np.float32)
    passed = (cand_conf > threshold) & keep0[:, None] & keep1[cand_j]
    if threshold <= 0:
        passed &= cand_conf != 0
    truncated = int((passed.all(axis=1) & (passed.shape[1] < keep1.size)).sum())
    rows, slots = np.nonzero(passed)
    j_ids = cand_j[rows, slots]
    order = np.lexsort((j_ids, rows))
    i_ids = rows[order].astype(np.int64)
    j_ids = j_ids[order]
    mconf = cand_conf[rows, slots][order]
    if truncated:
        log.warning(
            "ELoFTR: %d coarse rows have all %d candidates above threshold %.4g; matches may be truncated "
            "(use a threshold >= %.4g or the exact full-matrix mode)",
            truncated, passed.shape[1], threshold, 1.0 / (passed.shape[1] + 1),
        )
    return CoarseMatches(i_ids, j_ids, mconf, truncated)


def to_original_pixels(kpts_canvas: np.ndarray, meta: "ImageMeta") -> np.ndarray:
    """Canvas (x, y) -> original-image pixels: `(k * hw_new + 0.5) * s - 0.5`, float32 as the original."""
    k = kpts_canvas.astype(np.float32) * np.asarray(meta.hw_new, dtype=np.float32)
    s = meta.scale_orig_over_model.astype(np.float32)
    return ((k + np.float32(0.5)) * s - np.float32(0.5)).astype(np.float32)
