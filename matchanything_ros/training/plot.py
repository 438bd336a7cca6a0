"""Loss curve PNG with OpenCV (matplotlib is not a dependency)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

SERIES = (("loss", (40, 40, 40)), ("coarse_row", (200, 80, 20)), ("fine_cls", (30, 140, 30)),
          ("fine_reg", (20, 20, 200)))


def plot_loss_curve(history: list[dict[str, Any]], path: Path, width: int = 900, height: int = 500) -> None:
    """Log-scale losses against training seconds; one coloured line per loss term."""
    import cv2

    img = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 70, 20, 30, 50
    t = np.array([h["elapsed"] for h in history], dtype=np.float64)
    vals = {k: np.array([max(float(h.get(k, np.nan)), 1e-4) for h in history]) for k, _ in SERIES}
    finite = np.concatenate([v[np.isfinite(v)] for v in vals.values()])
    lo, hi = math.floor(math.log10(finite.min())), math.ceil(math.log10(finite.max()))
    hi = max(hi, lo + 1)
    t_max = max(float(t.max()), 1.0)

    def xy(tt: float, v: float) -> tuple[int, int]:
        x = left + (width - left - right) * tt / t_max
        y = top + (height - top - bottom) * (hi - math.log10(v)) / (hi - lo)
        return int(round(x)), int(round(y))

    cv2.rectangle(img, (left, top), (width - right, height - bottom), (0, 0, 0), 1)
    for e in range(lo, hi + 1):
        _, y = xy(0, 10.0**e)
        cv2.line(img, (left, y), (width - right, y), (220, 220, 220), 1)
        cv2.putText(img, f"1e{e}", (8, y + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    for k in range(6):
        x, _ = xy(t_max * k / 5, 10.0**lo)
        cv2.putText(img, f"{t_max * k / 5:.0f}s", (x - 15, height - bottom + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (0, 0, 0), 1)
    for n, (key, colour) in enumerate(SERIES):
        pts = [xy(tt, v) for tt, v in zip(t, vals[key]) if np.isfinite(v)]
        if len(pts) > 1:
            cv2.polylines(img, [np.array(pts, np.int32)], False, colour, 2, cv2.LINE_AA)
        cv2.putText(img, key, (left + 10 + 130 * n, top - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.5, colour, 1)
    cv2.putText(img, "training seconds (GPU)", (width // 2 - 80, height - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                (0, 0, 0), 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img)
