"""Field values of our messages, built once for both writers: the node (rclpy messages) and the bag
tool (rosbags messages). No ROS imports: each caller wraps the values in its own message type."""
from __future__ import annotations

from typing import Any

import numpy as np

from .. import __version__

INFO_STRING_FIELDS = ("variant", "backend", "device", "precision", "checkpoint", "checkpoint_sha256", "engine_file",
                      "tensorrt_skipped", "preset")
INFO_INT_FIELDS = ("resize_max", "force_resize_width", "force_resize_height", "coarse_res", "upsample_res")
MATCH_ARRAY_FIELDS = ("keypoints0", "keypoints1", "confidence")


def matcher_info_fields(info: dict[str, Any]) -> dict[str, Any]:
    """MatcherInfo's fields (all but the header) from `Matcher.info`."""
    return {
        **{k: str(info.get(k) or "") for k in INFO_STRING_FIELDS},
        "is_demo_model": bool(info.get("is_demo_model", False)),
        **{k: int(info.get(k) or 0) for k in INFO_INT_FIELDS},
        "threshold": float(info.get("threshold", 0.0)),
        "package_version": str(info.get("package_version") or __version__),
    }


def keypoint_matches_fields(shape0: tuple[int, ...], shape1: tuple[int, ...], result: Any, info: dict[str, Any],
                            timings_ms: dict[str, float]) -> dict[str, Any]:
    """KeypointMatches' fields except the two images' headers: sizes, flat float32 arrays (x, y
    interleaved, original-image pixels), what ran, the timings given (preprocess/inference/postprocess)
    and the geometric verification's verdict (`geometry_fields`)."""
    return {
        "image0_height": int(shape0[0]), "image0_width": int(shape0[1]),
        "image1_height": int(shape1[0]), "image1_width": int(shape1[1]),
        **{k: np.ascontiguousarray(getattr(result, k), dtype=np.float32).reshape(-1) for k in MATCH_ARRAY_FIELDS},
        "variant": str(info.get("variant", "")),
        "backend": str(info.get("backend", "")),
        "precision": str(info.get("precision", "")),
        **{f"{k}_ms": float(timings_ms.get(k, 0.0)) for k in ("preprocess", "inference", "postprocess")},
        "matches_capped": bool(result.extras.get("matches_capped", False)),
        "matches_before_cap": int(result.extras.get("coarse_matches_total", len(result.confidence))),
        **geometry_fields(getattr(result, "geometry", None), timings_ms),
    }


def geometry_fields(geometry: Any, timings_ms: dict[str, float]) -> dict[str, Any]:
    """KeypointMatches' verification fields from a core.geometry.GeometryResult (None: geometry none).
    `inliers` is a bool array (rclpy's bool[] takes a list: the node converts it)."""
    if geometry is None:
        return {"geometry_model": "", "geometry_matrix": np.zeros(9), "inliers": np.zeros(0, bool),
                "num_inliers": 0, "geometry_reason": "", "verify_ms": 0.0}
    matrix = np.zeros(9) if geometry.matrix is None else np.asarray(geometry.matrix, np.float64).reshape(9)
    return {
        "geometry_model": str(geometry.model), "geometry_matrix": np.ascontiguousarray(matrix),
        "inliers": np.asarray(geometry.inliers, bool).reshape(-1), "num_inliers": int(geometry.num_inliers),
        "geometry_reason": str(geometry.reason), "verify_ms": float(timings_ms.get("verify", 0.0)),
    }
