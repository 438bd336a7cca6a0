#!/usr/bin/env python3
"""Held-out real image pairs for the fp16-vs-fp32 check, from images that ship with scikit-image.

Not in the repository: run here (scikit-image installed) to write an .npz that travels with the
device call. Pairs, all 832x832 RGB: skimage's Middlebury `stereo_motorcycle` (a real stereo pair,
both views resized), and homography warps (a perspective view change) of the `coffee`, `rocket` and
`immunohistochemistry` photos. Usage: python3 bench/device/eloftr_heldout_pairs.py OUT.npz
"""
from __future__ import annotations

import sys

import cv2
import numpy as np
import skimage.data as data

SIDE = 832


def _square(image: np.ndarray) -> np.ndarray:
    return cv2.resize(np.ascontiguousarray(image[..., :3]), (SIDE, SIDE), interpolation=cv2.INTER_AREA)


def _warp(image: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    src = np.float32([[0, 0], [SIDE, 0], [SIDE, SIDE], [0, SIDE]])
    dst = src + rng.uniform(-0.08, 0.08, src.shape).astype(np.float32) * SIDE
    h = cv2.getPerspectiveTransform(src, dst)
    return cv2.warpPerspective(image, h, (SIDE, SIDE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def main() -> int:
    pairs: dict[str, np.ndarray] = {}
    left, right, _ = data.stereo_motorcycle()
    pairs["stereo_motorcycle_0"], pairs["stereo_motorcycle_1"] = _square(left), _square(right)
    for k, name in enumerate(("coffee", "rocket", "immunohistochemistry")):
        img = _square(getattr(data, name)())
        pairs[f"{name}_0"], pairs[f"{name}_1"] = img, _warp(img, k)
    np.savez_compressed(sys.argv[1], **pairs)
    print(f"wrote {sys.argv[1]}: {len(pairs) // 2} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
