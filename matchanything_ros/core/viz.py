"""Side-by-side drawing of matches (CLI PNG, the node's debug image, the demo)."""
from __future__ import annotations

import cv2
import numpy as np

HEADER_PX = 28


def confidence_colors(confidence: np.ndarray) -> np.ndarray:
    """[N] confidences -> [N,3] uint8 RGB (turbo colormap over the min..max range: blue low, red high)."""
    c = np.asarray(confidence, dtype=np.float64)
    if c.size == 0:
        return np.zeros((0, 3), np.uint8)
    lo, hi = float(c.min()), float(c.max())
    norm = (c - lo) / (hi - lo) if hi > lo else np.ones_like(c)
    lut = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_TURBO)[:, 0, ::-1]  # BGR->RGB
    return lut[np.clip(np.rint(norm * 255), 0, 255).astype(np.int64)]


def draw_matches(
    image0_rgb: np.ndarray, image1_rgb: np.ndarray, kpts0: np.ndarray, kpts1: np.ndarray, confidence: np.ndarray,
    max_lines: int = 500, title: str = "",
) -> np.ndarray:
    """Both images side by side (top-aligned), one line per match coloured by confidence, and a
    header with the match count. Draws the `max_lines` most confident matches. Returns RGB uint8."""
    h0, w0 = image0_rgb.shape[:2]
    h1, w1 = image1_rgb.shape[:2]
    height = max(h0, h1)
    canvas = np.zeros((height + HEADER_PX, w0 + w1, 3), np.uint8)
    canvas[HEADER_PX:HEADER_PX + h0, :w0] = image0_rgb
    canvas[HEADER_PX:HEADER_PX + h1, w0:] = image1_rgb
    n = int(len(confidence))
    order = np.argsort(-np.asarray(confidence))[:max_lines]
    colors = confidence_colors(np.asarray(confidence))
    thickness = max(1, round(max(height, w0 + w1) / 1000))
    for k in order[::-1]:  # most confident drawn last (on top)
        p0 = (int(round(float(kpts0[k, 0]))), int(round(float(kpts0[k, 1]))) + HEADER_PX)
        p1 = (int(round(float(kpts1[k, 0]))) + w0, int(round(float(kpts1[k, 1]))) + HEADER_PX)
        color = tuple(int(v) for v in colors[k])
        cv2.line(canvas, p0, p1, color, thickness, cv2.LINE_AA)
        cv2.circle(canvas, p0, thickness + 1, color, -1, cv2.LINE_AA)
        cv2.circle(canvas, p1, thickness + 1, color, -1, cv2.LINE_AA)
    text = f"{n} matches" + (f" (showing {len(order)})" if len(order) < n else "") + (f"  {title}" if title else "")
    cv2.putText(canvas, text, (6, HEADER_PX - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1, cv2.LINE_AA)
    return canvas
