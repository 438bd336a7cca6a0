"""RoMa input preprocessing, numpy only (shared by every backend).

1. Optional web-UI stage (`imcui/hloc/match_dense.py`): float32 0..255, shrink so the longest
   side is <= 832 (INTER_AREA), then force-resize to exactly 640x480 (INTER_AREA, or INTER_LINEAR
   when enlarging in either dimension), aspect ratio not kept; / 255.
2. The model's own stretch (`resize_by_longest_edge_and_stretch`): each of the coarse and the
   upsample image is made from the stage-1 image by torchvision's antialiased bicubic resize
   (Keys a = -0.5, support scaled by in/out when shrinking, normalised weights), no clamping and
   no ImageNet normalisation.

The resize below reproduces PyTorch's separable CPU kernel: filter weights and source centres in
float32, width pass first, then height, float32 accumulation in tap order.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from ..errors import InputImageError
from ..images import resize_cv2_area
from .config import WEBUI_RESIZE_MAX, WEBUI_SIZE_WH

_F32 = np.float32


def _fma32(a: Any, b: Any, c: Any) -> np.ndarray:
    """float32 fused multiply-add (one rounding): PyTorch's CPU kernels are compiled with FMA contraction.

    The product of two float32 values is exact in float64, so float64 add + one rounding emulates it.
    """
    return (np.asarray(a, np.float64) * np.asarray(b, np.float32).astype(np.float64)
            + np.asarray(c, np.float32).astype(np.float64)).astype(_F32)


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic convolution kernel, a = -0.5 (PyTorch's antialiased bicubic), float32 with FMA as PyTorch."""
    a = _F32(-0.5)
    x = np.abs(x).astype(_F32)
    near = _fma32((_fma32(a + _F32(2), x, -(a + _F32(3))) * x).astype(_F32), x, _F32(1))
    far = _fma32(_fma32(_fma32(a, x, -(_F32(5) * a)), x, _F32(8) * a), x, -(_F32(4) * a))
    return np.where(x < 1.0, near, np.where(x < 2.0, far, _F32(0.0))).astype(_F32)


@lru_cache(maxsize=64)
def _aa_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """(first source index [n_out], weights [n_out, taps]) of the antialiased bicubic resize.

    Mirrors PyTorch's float32/float64 mix: centre and weights are float32, the filter argument
    `(j - centre + 0.5) * invscale` is formed in float64 and rounded to float32.
    """
    scale = _F32(n_in) / _F32(n_out)
    support = _F32(2.0) * scale if scale >= 1.0 else _F32(2.0)
    invscale = _F32(1.0 / float(scale)) if scale >= 1.0 else _F32(1.0)
    taps = int(np.ceil(support)) * 2 + 1
    first = np.zeros(n_out, np.int64)
    weights = np.zeros((n_out, taps), _F32)
    for i in range(n_out):
        center = _F32(float(scale) * (i + 0.5))
        lo = max(int(float(_F32(center - support)) + 0.5), 0)
        hi = min(int(float(_F32(center + support)) + 0.5), n_in)
        hi = min(hi, lo + taps)
        j = np.arange(lo, hi)
        arg = ((j.astype(_F32) - center).astype(np.float64) + 0.5) * float(invscale)
        w = _keys_cubic(arg.astype(_F32))
        total = _F32(0.0)
        for v in w:
            total = _F32(total + v)
        if total != 0.0:
            w = (w / total).astype(_F32)
        first[i] = lo
        weights[i, : hi - lo] = w
    return first, weights


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """The antialiased bicubic resize along one axis as a dense float32 matrix W [n_out, n_in]
    (out = W x), from the same taps as the numpy path; the identity where the axis keeps its size
    (the numpy path skips that axis). Two of them per size make the resize two MatMuls on the device."""
    if n_in == n_out:
        return np.eye(n_out, dtype=_F32)
    first, weights = _aa_taps(n_in, n_out)
    w = np.zeros((n_out, n_in), _F32)
    for t in range(weights.shape[1]):
        cols = first + t
        ok = cols < n_in  # taps past the border carry zero weight
        w[np.arange(n_out)[ok], cols[ok]] += weights[ok, t]
    return w


def _resize_axis(x: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Antialiased bicubic along one axis of a float32 array, accumulating taps in order."""
    n_in = x.shape[axis]
    first, weights = _aa_taps(n_in, n_out)
    xm = np.moveaxis(x, axis, -1)
    idx = np.arange(n_out)
    out = (xm[..., first] * weights[idx, 0]).astype(_F32)
    for t in range(1, weights.shape[1]):
        src = np.minimum(first + t, n_in - 1)  # zero weight where the window is shorter
        out = _fma32(xm[..., src], weights[idx, t], out)
    return np.moveaxis(out, -1, axis)


def aa_bicubic_resize(image_chw: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """torchvision `Resize((out_h, out_w), BICUBIC, antialias=True)` of a float32 CxHxW array."""
    x = np.ascontiguousarray(image_chw, dtype=_F32)
    if x.shape[2] != out_w:
        x = _resize_axis(x, out_w, 2)
    if x.shape[1] != out_h:
        x = _resize_axis(x, out_h, 1)
    return x


def check_rgb_image(image: np.ndarray, name: str) -> None:
    if not isinstance(image, np.ndarray):
        raise InputImageError(f"{name}: expected a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise InputImageError(f"{name}: expected an HxWx3 RGB image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise InputImageError(f"{name}: expected uint8 RGB, got dtype {image.dtype}")
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise InputImageError(f"{name}: image of {image.shape[1]}x{image.shape[0]} pixels is too small")


def webui_stage(image_rgb: np.ndarray) -> np.ndarray:
    """The web UI's stage 1: RGB uint8 HxWx3 -> float32 HxWx3 (0..255) of exactly 640x480 (W x H)."""
    img = image_rgb.astype(np.float32)
    h, w = img.shape[:2]
    scale = WEBUI_RESIZE_MAX / max(w, h)
    if scale < 1.0:
        img = resize_cv2_area(img, (int(round(w * scale)), int(round(h * scale))))
    return resize_cv2_area(img, WEBUI_SIZE_WH)


@lru_cache(maxsize=16)
def webui_matrices(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """`webui_stage` of a width x height image as two float64 matrices (Ry [480, height], Rx [640, width]):
    its resizes are linear maps per axis (OpenCV's INTER_AREA / INTER_LINEAR), composed here so that the device
    graph does the web-UI stage and the stretch in the same two MatMuls per size."""
    from ..images import cv2_resize_matrix

    ry, rx = np.eye(height), np.eye(width)
    w, h = width, height
    targets = []
    scale = WEBUI_RESIZE_MAX / max(w, h)
    if scale < 1.0:
        targets.append((int(round(w * scale)), int(round(h * scale))))
    targets.append(WEBUI_SIZE_WH)
    for tw, th in targets:
        grows = w < tw or h < th
        ry = cv2_resize_matrix(h, th, grows) @ ry
        rx = cv2_resize_matrix(w, tw, grows) @ rx
        w, h = tw, th
    return ry, rx


@dataclass(frozen=True)
class PreparedImage:
    """One image as the model sees it, and how to map model pixels back to the original."""

    coarse: np.ndarray | None  # float32 [3, c, c]; None when the resize runs on the device
    fine: np.ndarray | None  # float32 [3, u, u]; None when the resize runs on the device
    model_size_wh: tuple[int, int]  # size of the image handed to the model (640x480 after the web UI stage)
    original_size_wh: tuple[int, int]
    webui_resize: bool


def prepare_image(image_rgb: np.ndarray, coarse_res: int, upsample_res: int, webui_resize: bool,
                  name: str = "image") -> PreparedImage:
    check_rgb_image(image_rgb, name)
    h, w = image_rgb.shape[:2]
    stage1 = webui_stage(image_rgb) if webui_resize else image_rgb.astype(np.float32)
    chw = (stage1 / 255.0).astype(np.float32).transpose(2, 0, 1)
    return PreparedImage(
        coarse=aa_bicubic_resize(chw, coarse_res, coarse_res),
        fine=aa_bicubic_resize(chw, upsample_res, upsample_res),
        model_size_wh=(int(chw.shape[2]), int(chw.shape[1])),
        original_size_wh=(int(w), int(h)),
        webui_resize=webui_resize,
    )


def prepare_stage1(image_rgb: np.ndarray, webui_resize: bool, name: str = "image",
                   webui_on_device: bool = False) -> tuple[np.ndarray, PreparedImage]:
    """The host part when the stretch-resize runs on the device (`RomaImageGraph`): the image HxWx3 in 0..255
    the graph takes — the uint8 image itself where stage 1 is the identity (no web-UI stage, or an image
    already 640x480) or runs on the device too (`webui_on_device`), else the web-UI stage's float32 output."""
    check_rgb_image(image_rgb, name)
    h, w = image_rgb.shape[:2]
    stage1: np.ndarray = image_rgb
    if webui_resize and (w, h) != WEBUI_SIZE_WH and not webui_on_device:  # at 640x480 the steps are the identity
        stage1 = webui_stage(image_rgb)
    model_wh = WEBUI_SIZE_WH if webui_resize else (int(w), int(h))
    prepared = PreparedImage(coarse=None, fine=None, model_size_wh=(int(model_wh[0]), int(model_wh[1])),
                             original_size_wh=(int(w), int(h)), webui_resize=webui_resize)
    return stage1, prepared


def model_to_original(kpts: np.ndarray, prepared: PreparedImage) -> np.ndarray:
    """Model-input pixels -> original-image pixels.

    Without the web UI stage the model input IS the original (identity). With it, the web UI's
    rescale `(k + 0.5) * s - 0.5` with s = original / 640x480 per axis (mixing conventions, as it does).
    """
    if not prepared.webui_resize:
        return kpts.astype(np.float32)
    s = np.array(prepared.original_size_wh, np.float64) / np.array(prepared.model_size_wh, np.float64)
    return ((kpts.astype(np.float64) + 0.5) * s - 0.5).astype(np.float32)
