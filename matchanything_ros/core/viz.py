"""Side-by-side drawing of matches (CLI PNG, the node's debug image, the bag tool, the demo)."""
from __future__ import annotations

import cv2
import numpy as np

from .matcher import DEMO_MODEL_NOTICE

LINE_PX = 22          # one header text line
LEGEND_PX = (160, 10)  # colour bar width, height


def confidence_colors(confidence: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """[N] confidences -> [N,3] uint8 RGB (turbo colormap over lo..hi, default the min..max: blue low, red high)."""
    c = np.asarray(confidence, dtype=np.float64)
    if c.size == 0:
        return np.zeros((0, 3), np.uint8)
    lo = float(c.min()) if lo is None else lo
    hi = float(c.max()) if hi is None else hi
    norm = (c - lo) / (hi - lo) if hi > lo else np.ones_like(c)
    lut = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_TURBO)[:, 0, ::-1]  # BGR->RGB
    return lut[np.clip(np.rint(norm * 255), 0, 255).astype(np.int64)]


def spatially_even_sample(kpts0: np.ndarray, confidence: np.ndarray, image_wh: tuple[int, int],
                          count: int) -> tuple[np.ndarray, int]:
    """Indices of at most `count` matches spread evenly over image 0, and the grid size used.

    Image 0 is cut into about `count` square cells; the cells' most confident matches are taken first,
    then their second best, and so on. The most confident matches alone would cluster wherever the
    model is surest and hide how the matches cover the image.
    """
    n = len(confidence)
    if n <= count:
        return np.arange(n), 0
    w, h = max(image_wh[0], 1), max(image_wh[1], 1)
    cell = max(np.sqrt(w * h / max(count, 1)), 1.0)
    cols = max(int(np.ceil(w / cell)), 1)
    cx = np.clip((kpts0[:, 0] // cell).astype(np.int64), 0, cols - 1)
    cy = np.clip((kpts0[:, 1] // cell).astype(np.int64), 0, int(np.ceil(h / cell)) - 1)
    cell_id = cy * cols + cx
    by_cell_then_conf = np.lexsort((-np.asarray(confidence, np.float64), cell_id))
    sorted_cells = cell_id[by_cell_then_conf]
    first_of_cell = np.searchsorted(sorted_cells, sorted_cells, side="left")
    rank_in_cell = np.arange(n) - first_of_cell  # 0 = the cell's best match
    order = by_cell_then_conf[np.lexsort((-np.asarray(confidence)[by_cell_then_conf], rank_in_cell))]
    return np.sort(order[:count]), cols


def _put_text(canvas: np.ndarray, text: str, org: tuple[int, int]) -> None:
    cv2.putText(canvas, text, org, cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)


def draw_matches(
    image0_rgb: np.ndarray, image1_rgb: np.ndarray, kpts0: np.ndarray, kpts1: np.ndarray, confidence: np.ndarray,
    max_lines: int = 500, title: str = "", demo_model: bool = False,
) -> np.ndarray:
    """Both images side by side (top-aligned) under a header, one line per match coloured by confidence.

    At most `max_lines` matches are drawn, a spatially even sample (`spatially_even_sample`); the header
    says how many of how many and how they were chosen, carries a colour legend with the confidence
    range, and says when the bundled demo model produced the matches. Returns RGB uint8.
    """
    h0, w0 = image0_rgb.shape[:2]
    h1, w1 = image1_rgb.shape[:2]
    height, width = max(h0, h1), w0 + w1
    conf = np.asarray(confidence, dtype=np.float64)
    n = int(len(conf))
    pick, grid = spatially_even_sample(np.asarray(kpts0, np.float64).reshape(-1, 2), conf, (w0, h0), max_lines)
    lines = [f"{n} matches" + (f", showing {len(pick)} spread evenly (best per cell of a {grid}-column grid first)"
                               if len(pick) < n else "")]
    if title or demo_model:
        lines.append("  |  ".join(t for t in (title, DEMO_MODEL_NOTICE if demo_model else "") if t))
    header = LINE_PX * len(lines) + 6
    canvas = np.zeros((height + header, width, 3), np.uint8)
    canvas[header:header + h0, :w0] = image0_rgb
    canvas[header:header + h1, w0:] = image1_rgb
    lo, hi = (float(conf.min()), float(conf.max())) if n else (0.0, 1.0)
    colors = confidence_colors(conf, lo, hi)
    thickness = max(1, round(max(height, width) / 1000))
    for k in pick[np.argsort(conf[pick], kind="stable")]:  # most confident drawn last (on top)
        p0 = (int(round(float(kpts0[k, 0]))), int(round(float(kpts0[k, 1]))) + header)
        p1 = (int(round(float(kpts1[k, 0]))) + w0, int(round(float(kpts1[k, 1]))) + header)
        color = tuple(int(v) for v in colors[k])
        cv2.line(canvas, p0, p1, color, thickness, cv2.LINE_AA)
        cv2.circle(canvas, p0, thickness + 1, color, -1, cv2.LINE_AA)
        cv2.circle(canvas, p1, thickness + 1, color, -1, cv2.LINE_AA)
    for row, text in enumerate(lines):
        _put_text(canvas, text, (6, LINE_PX * (row + 1) - 4))
    if n:
        _draw_legend(canvas, lo, hi)
    return canvas


def _draw_legend(canvas: np.ndarray, lo: float, hi: float) -> None:
    """A colour bar in the header's top-right corner: 'confidence <lo> [bar] <hi>'."""
    bar_w, bar_h = LEGEND_PX
    lo_txt, hi_txt = f"confidence {lo:.3g}", f"{hi:.3g}"
    (lo_w, _), _ = cv2.getTextSize(lo_txt, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
    (hi_w, _), _ = cv2.getTextSize(hi_txt, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
    x_end = canvas.shape[1] - 6
    x_bar = x_end - hi_w - 6 - bar_w
    if x_bar - lo_w - 6 < canvas.shape[1] // 2:  # too narrow an image: a shorter bar, still with both ends
        bar_w = max(40, bar_w // 3)
        x_bar = x_end - hi_w - 6 - bar_w
    ramp = confidence_colors(np.linspace(0.0, 1.0, bar_w), 0.0, 1.0)
    canvas[6:6 + bar_h, x_bar:x_bar + bar_w] = ramp[None, :, :]
    _put_text(canvas, lo_txt, (x_bar - lo_w - 6, 6 + bar_h))
    _put_text(canvas, hi_txt, (x_bar + bar_w + 6, 6 + bar_h))
