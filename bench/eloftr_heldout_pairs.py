#!/usr/bin/env python3
"""ELoFTR fp16 against fp32 on held-out real image pairs (images that ship with scikit-image).

`write OUT.npz` (here, scikit-image installed): the pairs, all 832x832 RGB — skimage's Middlebury
`stereo_motorcycle` (a real stereo pair, both views resized), and homography warps (a perspective view change) of
the `coffee`, `rocket` and `immunohistochemistry` photos. The .npz travels with the device call.
`measure PAIRS.npz OUT_DIR` (GPU machine, repo root): the bundled demo model, torch on CUDA, threshold 0.1: per
pair and per fp16 form (EloftrOptions.fp32_island), the share of fp32's matches that fp16 has within 1 px (both
keypoints), and the match counts; heldout_fp16.json in OUT_DIR.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np

SIDE = 832


def _square(image: np.ndarray) -> np.ndarray:
    return cv2.resize(np.ascontiguousarray(image[..., :3]), (SIDE, SIDE), interpolation=cv2.INTER_AREA)


def _warp(image: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    src = np.float32([[0, 0], [SIDE, 0], [SIDE, SIDE], [0, SIDE]])
    dst = src + rng.uniform(-0.08, 0.08, src.shape).astype(np.float32) * SIDE
    h = cv2.getPerspectiveTransform(src, dst)
    return cv2.warpPerspective(image, h, (SIDE, SIDE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def write(path: str) -> None:
    import skimage.data as data

    pairs: dict[str, np.ndarray] = {}
    left, right, _ = data.stereo_motorcycle()
    pairs["stereo_motorcycle_0"], pairs["stereo_motorcycle_1"] = _square(left), _square(right)
    for k, name in enumerate(("coffee", "rocket", "immunohistochemistry")):
        img = _square(getattr(data, name)())
        pairs[f"{name}_0"], pairs[f"{name}_1"] = img, _warp(img, k)
    np.savez_compressed(path, **pairs)
    print(f"wrote {path}: {len(pairs) // 2} pairs")


def measure(pairs_path: str, out_dir: str) -> None:
    from scipy.spatial import cKDTree

    from matchanything_ros.core.eloftr.options import FP32_ISLANDS, EloftrOptions
    from matchanything_ros.core.matcher import Matcher, MatcherConfig

    with np.load(pairs_path) as z:
        pairs = {n: (z[f"{n}_0"], z[f"{n}_1"]) for n in sorted({k.rsplit("_", 1)[0] for k in z.files})}
    base: dict[str, Any] = {"device": "cuda", "backend": "torch", "threshold": 0.1}

    def keypoints(matcher: Matcher, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        result = matcher.match(a, b)
        return np.concatenate([result.keypoints0, result.keypoints1], 1)

    with Matcher(MatcherConfig(**base, precision="fp32")) as m:
        ref = {n: keypoints(m, a, b) for n, (a, b) in pairs.items()}
    report: dict[str, Any] = {}
    for island in FP32_ISLANDS:
        config = MatcherConfig(**base, precision="fp16", options=EloftrOptions(fp32_island=island))
        with Matcher(config) as m:
            for n, (a, b) in pairs.items():
                got = keypoints(m, a, b)
                d, _ = cKDTree(got).query(ref[n]) if len(got) and len(ref[n]) else (np.zeros(0), None)
                row = {"fp32_matches": len(ref[n]), "fp16_matches": len(got),
                       "within_1px": float(np.mean(d <= 1.0)) if len(d) else None}
                report.setdefault(island, {})[n] = row
                print(f"fp16 island {island:15s} {n:22s} {row}", flush=True)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "heldout_fp16.json").write_text(json.dumps(report, indent=1))


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "write":
        write(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "measure":
        measure(sys.argv[2], sys.argv[3])
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
