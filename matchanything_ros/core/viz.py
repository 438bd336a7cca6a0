"""Side-by-side drawing of matches (CLI PNG, the node's debug image, the bag tool, the demo)."""
from __future__ import annotations

import cv2
import numpy as np

from .bundled import DEMO_MODEL_NOTICE

LINE_PX = 22          # one header text line
LEGEND_PX = (160, 10)  # colour bar width, height
# At most this many matches are drawn by default (a spatially even sample): more lines hide the photos and
# each other, and right can no longer be told from wrong.
DEFAULT_MAX_LINES = 150
LINE_ALPHA = 0.75  # the lines' opacity over the photos
INLIER_RGB = (60, 230, 60)
OUTLIER_RGB = (255, 50, 50)
OUTLIER_SHARE_MIN = 0.2  # of the drawn lines, for outliers (when there are that many)
TURBO_SPAN = (25, 230)  # the part of the turbo colour map used: its darkest blue and red vanish on dark photos


def confidence_colors(confidence: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """[N] confidences -> [N,3] uint8 RGB (turbo colour map over lo..hi, default the min..max: blue low, red high)."""
    c = np.asarray(confidence, dtype=np.float64)
    if c.size == 0:
        return np.zeros((0, 3), np.uint8)
    lo = float(c.min()) if lo is None else lo
    hi = float(c.max()) if hi is None else hi
    norm = (c - lo) / (hi - lo) if hi > lo else np.ones_like(c)
    lut = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_TURBO)[:, 0, ::-1]  # BGR->RGB
    first, last = TURBO_SPAN
    return lut[np.clip(np.rint(first + norm * (last - first)), 0, 255).astype(np.int64)]


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


def inlier_outlier_sample(kpts0: np.ndarray, confidence: np.ndarray, inlier: np.ndarray, image_wh: tuple[int, int],
                          count: int) -> np.ndarray:
    """Indices of at most `count` matches: the outliers' share of them, but at least OUTLIER_SHARE_MIN of the
    lines when there are that many outliers (the best-per-cell rule alone would leave out the outliers, which
    are mostly the less confident), each group spread evenly over image 0."""
    n_out = int((~inlier).sum())
    want_out = min(n_out, max(round(count * n_out / max(len(inlier), 1)), round(count * OUTLIER_SHARE_MIN)))
    want_in = min(count - want_out, len(inlier) - n_out)
    picks = []
    for group, want in ((np.flatnonzero(inlier), want_in), (np.flatnonzero(~inlier), want_out)):
        sub, _ = spatially_even_sample(kpts0[group], confidence[group], image_wh, want)
        picks.append(group[sub])
    return np.sort(np.concatenate(picks))


def _put_text(canvas: np.ndarray, text: str, org: tuple[int, int], color: tuple[int, int, int] = (255, 255, 255)
              ) -> None:
    cv2.putText(canvas, text, org, cv2.FONT_HERSHEY_SIMPLEX, 0.5, color, 1, cv2.LINE_AA)


def draw_matches(
    image0_rgb: np.ndarray, image1_rgb: np.ndarray, kpts0: np.ndarray, kpts1: np.ndarray, confidence: np.ndarray,
    max_lines: int = DEFAULT_MAX_LINES, title: str = "", demo_model: bool = False,
    inliers: np.ndarray | None = None, labels: tuple[str, str] = ("inliers", "outliers"),
) -> np.ndarray:
    """Both images side by side (top-aligned) under a header, one thin line per drawn match.

    At most `max_lines` matches are drawn, a spatially even sample (`spatially_even_sample`), as 1-pixel
    lines blended over the photos so that these stay visible; the header gives the counts (all and drawn).
    Colours: with `inliers` (one boolean per match, e.g. from geometric verification) inliers green and
    outliers red, both counted in the header (`labels` names the two kinds); without, the confidence (turbo
    colour bar in the header).
    The header also says when the bundled demo model produced the matches. Returns RGB uint8.
    """
    h0, w0 = image0_rgb.shape[:2]
    h1, w1 = image1_rgb.shape[:2]
    height, width = max(h0, h1), w0 + w1
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    n = int(len(conf))
    k0 = np.asarray(kpts0, np.float64).reshape(-1, 2)
    k1 = np.asarray(kpts1, np.float64).reshape(-1, 2)
    inlier = None if inliers is None else np.asarray(inliers, dtype=bool).reshape(-1)
    if inlier is not None and len(inlier) != n:
        raise ValueError(f"inliers has {len(inlier)} entries for {n} matches")
    pick = (spatially_even_sample(k0, conf, (w0, h0), max(int(max_lines), 0))[0] if inlier is None
            else inlier_outlier_sample(k0, conf, inlier, (w0, h0), max(int(max_lines), 0)))
    lines = header_counts(n, pick, inlier, labels)
    if title or demo_model:
        lines.append("  |  ".join(t for t in (title, DEMO_MODEL_NOTICE if demo_model else "") if t))
    header = LINE_PX * len(lines) + 6
    canvas = np.zeros((height + header, width, 3), np.uint8)
    canvas[header:header + h0, :w0] = image0_rgb
    canvas[header:header + h1, w0:] = image1_rgb
    lo, hi = (float(conf.min()), float(conf.max())) if n else (0.0, 1.0)
    if inlier is not None:
        colors = np.where(inlier[:, None], np.array(INLIER_RGB, np.uint8), np.array(OUTLIER_RGB, np.uint8))
        order = pick[np.argsort(inlier[pick], kind="stable")]  # inliers drawn last (on top)
    else:
        colors = confidence_colors(conf, lo, hi)
        order = pick[np.argsort(conf[pick], kind="stable")]  # most confident drawn last (on top)
    ends = [((int(round(k0[k, 0])), int(round(k0[k, 1])) + header),
             (int(round(k1[k, 0])) + w0, int(round(k1[k, 1])) + header), tuple(int(v) for v in colors[k]))
            for k in order]
    photos = canvas[header:].copy()
    for p0, p1, color in ends:
        cv2.line(canvas, p0, p1, color, 1, cv2.LINE_AA)
    # the lines at LINE_ALPHA over the photos: a crowd of them still lets the pictures show through
    canvas[header:] = cv2.addWeighted(canvas[header:], LINE_ALPHA, photos, 1.0 - LINE_ALPHA, 0.0)
    radius = max(2, round(max(height, width) / 800))
    for p0, p1, color in ends:  # the matched points themselves, opaque
        cv2.circle(canvas, p0, radius, color, -1, cv2.LINE_AA)
        cv2.circle(canvas, p1, radius, color, -1, cv2.LINE_AA)
    for row, text in enumerate(lines):
        _put_text(canvas, text, (6, LINE_PX * (row + 1) - 4))
    if inlier is not None:
        _draw_inlier_legend(canvas, labels)
    elif n:
        _draw_legend(canvas, lo, hi)
    return canvas


def header_counts(n: int, pick: np.ndarray, inlier: np.ndarray | None, labels: tuple[str, str]) -> list[str]:
    """The header's counts: all matches (inliers, outliers), and how many of them are drawn."""
    if inlier is None:
        return [f"{n} matches" + (f"; {len(pick)} drawn, spread evenly over image 0" if len(pick) < n else "")]
    good, bad = labels
    inliers = int(inlier.sum())
    lines = [f"{n} matches: {inliers} {good}, {n - inliers} {bad}"]
    if len(pick) < n:
        drawn_in = int(inlier[pick].sum())
        lines.append(f"drawn: {len(pick)} spread evenly over image 0 ({drawn_in} {good}, {len(pick) - drawn_in} {bad})")
    return lines


def _draw_inlier_legend(canvas: np.ndarray, labels: tuple[str, str]) -> None:
    """The two kinds' names in their colours, in the header's top-right corner."""
    x = canvas.shape[1] - 6
    for label, color in ((labels[1], OUTLIER_RGB), (labels[0], INLIER_RGB)):
        (w, _), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
        x -= w
        _put_text(canvas, label, (x, 18), color)
        x -= 16
        cv2.line(canvas, (x - 22, 13), (x - 4, 13), color, 2, cv2.LINE_AA)
        x -= 30


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
