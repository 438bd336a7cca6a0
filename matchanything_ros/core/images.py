"""Input images -> RGB uint8, the one form every variant's preprocessing starts from.

Accepted arrays (anything else raises InputImageError naming the problem):

* HxW uint8 (mono8): replicated to 3 channels (Pillow's gray formula gives back the same values).
* HxW uint16 (mono16): scaled to 8 bit by `>> 8` (keeps the top byte; no auto-exposure).
* HxWx1 uint8: as mono8.
* HxWx3 uint8: RGB. BGR input is the caller's job (the ROS layer converts by encoding).
* HxWx4 uint8: RGBA; alpha is dropped (not composited).
* float32/float64 with values in [0, 1] (any of the shapes above): `x * 255` rounded to uint8.
  NaN/inf or values outside [0, 1] are refused.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputImageError

MIN_SIDE = 32  # ELoFTR floors sides to multiples of 32; smaller images cannot be matched


def to_rgb_u8(image: np.ndarray, min_side: int = MIN_SIDE) -> np.ndarray:
    """Convert an input array to a C-contiguous HxWx3 uint8 RGB image (see module doc)."""
    if not isinstance(image, np.ndarray):
        raise InputImageError(f"expected a numpy array, got {type(image).__name__}")
    if image.size == 0:
        raise InputImageError(f"image is empty (shape {image.shape})")
    if image.ndim not in (2, 3):
        raise InputImageError(f"image must be HxW or HxWxC, got {image.ndim}-D shape {image.shape}")
    if image.ndim == 3 and image.shape[2] not in (1, 3, 4):
        raise InputImageError(f"image must have 1, 3 or 4 channels, got {image.shape[2]} (shape {image.shape})")
    if image.dtype == np.uint8:
        u8 = image
    elif image.dtype == np.uint16:
        u8 = (image >> 8).astype(np.uint8)
    elif image.dtype in (np.float32, np.float64):
        if not np.isfinite(image).all():
            raise InputImageError("float image contains NaN or inf")
        lo, hi = float(image.min()), float(image.max())
        if lo < 0.0 or hi > 1.0:
            raise InputImageError(f"float image values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]")
        u8 = np.rint(image.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        raise InputImageError(f"unsupported image dtype {image.dtype} (use uint8, uint16, float32 or float64)")
    if u8.ndim == 2:
        u8 = u8[:, :, None]
    if u8.shape[2] == 1:
        u8 = np.repeat(u8, 3, axis=2)
    elif u8.shape[2] == 4:
        u8 = u8[:, :, :3]
    h, w = u8.shape[:2]
    if min(h, w) < min_side:
        raise InputImageError(f"image is too small: {w}x{h}; each side must be >= {min_side} px")
    return np.ascontiguousarray(u8)


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file (PNG, JPEG, ...; 8/16 bit, gray/RGB/RGBA) as RGB uint8."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise InputImageError(f"image file not found: {p}")
    try:
        with Image.open(p) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im).astype(np.uint16) if im.mode != "I" else np.clip(np.asarray(im), 0, 65535).astype(
                    np.uint16)
            elif im.mode in ("L", "RGB", "RGBA"):
                arr = np.asarray(im)
            else:
                arr = np.asarray(im.convert("RGB"))
    except Image.DecompressionBombError as exc:  # a small file claiming a huge image: refused before decoding
        raise InputImageError(f"image file {p} is too large to decode safely ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputImageError(f"not a readable image file: {p} ({exc})") from exc
    return to_rgb_u8(arr)


def resize_cv2_area(image: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """hloc's `resize_image(..., "cv2_area")`, which both variants' reference preprocessing uses:
    INTER_AREA, but INTER_LINEAR when either side grows."""
    import cv2

    h, w = image.shape[:2]
    grows = w < size_wh[0] or h < size_wh[1]
    return cv2.resize(image, size_wh, interpolation=cv2.INTER_LINEAR if grows else cv2.INTER_AREA)


def cv2_resize_matrix(ssize: int, dsize: int, grows: bool) -> np.ndarray:
    """`resize_cv2_area` along one axis as a dense float64 matrix W [dsize, ssize] (out = W x): OpenCV's
    INTER_AREA table at a fractional factor, or its INTER_LINEAR weights (computed in double, as OpenCV)
    where the image grows. A linear map, so a device composes it with later resizes into one MatMul per axis;
    its result then differs from OpenCV's by float32 summation order only (bounded in the tests)."""
    from .eloftr.preprocess import _area_taps  # the exact INTER_AREA table (replayed tap by tap by ELoFTR)

    w = np.zeros((dsize, ssize), np.float64)
    if ssize == dsize:
        np.fill_diagonal(w, 1.0)
        return w
    if not grows and ssize % dsize:  # fractional INTER_AREA
        taps = _area_taps(ssize, dsize)
        for t in range(taps.index.shape[1]):
            np.add.at(w, (np.arange(dsize), taps.index[:, t]), taps.weight[:, t].astype(np.float64))
        return w
    if not grows:  # integer factor: the block mean
        k = ssize // dsize
        for d in range(dsize):
            w[d, d * k:(d + 1) * k] = 1.0 / k
        return w
    scale = 1.0 / (dsize / ssize)
    for d in range(dsize):
        fx = (d + 0.5) * scale - 0.5
        sx = int(np.floor(fx))
        fx -= sx
        if sx < 0:
            fx, sx = 0.0, 0
        if sx >= ssize - 1:
            fx, sx = 0.0, ssize - 1
        w[d, sx] += np.float32(1.0 - fx)
        w[d, min(sx + 1, ssize - 1)] += np.float32(fx)
    return w
