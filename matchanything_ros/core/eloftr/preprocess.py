"""ELoFTR preprocessing, bit-exact with the official HF-space code (docs/eloftr.md, "Stage 1" / "Stage 2").

Stage 1 (`match_dense.preprocess`): float32 image, optional shrink so the longest side is at most
`resize_max`, optional force-resize to W x H (OpenCV INTER_AREA, INTER_LINEAR when either side
grows), /255, then a bilinear antialiased resize down to multiples of 32 (a no-op when already).
Stage 2 (the wrapper): x255 and truncating cast to uint8, Pillow "L" grayscale, floor to multiples
of 32 with Pillow LANCZOS (a no-op after stage 1), zero padding bottom/right to a square canvas,
/255, and the 1/8 nearest-neighbour masks.

Keypoints map back to original pixels as `(k * hw_new + 0.5) * s - 0.5` (see postprocess.py).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import InputImageError
from ..images import resize_cv2_area

DFACTOR = 32  # both stages floor image sides to multiples of 32


@dataclass(frozen=True)
class PreprocessSettings:
    resize_max: int = 832  # 0 = never shrink
    force_resize_wh: tuple[int, int] | None = None  # (width, height) or None
    coarse_stride: int = 8


@dataclass(frozen=True)
class ImageMeta:
    """How one image went from its original pixels to the model canvas."""

    orig_wh: tuple[int, int]
    stage1_wh: tuple[int, int]  # the "model frame" of match_images (after the /32 floor)
    gray_wh: tuple[int, int]  # after stage 2's /32 floor (the valid part of the canvas)
    canvas: int  # side of the square canvas
    hw_new: tuple[float, float]  # stage 2 (x, y) factors, 1.0 unless stage 2 resampled

    @property
    def scale_orig_over_model(self) -> np.ndarray:
        """(x, y) = original size / stage-1 size, float64 as match_images computes it."""
        return np.array(self.orig_wh, dtype=np.float64) / np.array(self.stage1_wh, dtype=np.float64)


def stage1(image_rgb: np.ndarray, settings: PreprocessSettings) -> np.ndarray:
    """RGB uint8 HxWx3 -> float32 CHW in [0,1] (the tensor match_images gives the model)."""
    image = image_rgb.astype(np.float32)
    h, w = image.shape[:2]
    if settings.resize_max:
        scale = settings.resize_max / max(w, h)
        if scale < 1.0:
            size_new = (int(round(w * scale)), int(round(h * scale)))
            if min(size_new) < 1:
                raise InputImageError(f"image {w}x{h} shrinks to nothing with resize_max={settings.resize_max}")
            image = resize_cv2_area(image, size_new)
    if settings.force_resize_wh is not None:
        image = resize_cv2_area(image, settings.force_resize_wh)
    if image.ndim == 2:  # cv2 drops a singleton channel axis; inputs here are always 3-channel
        image = image[:, :, None]
    chw = np.ascontiguousarray(image.transpose(2, 0, 1)) / np.float32(255.0)
    h1, w1 = chw.shape[1:]
    h2, w2 = h1 // DFACTOR * DFACTOR, w1 // DFACTOR * DFACTOR
    if min(h2, w2) < DFACTOR:
        raise InputImageError(
            f"image is too small: {w}x{h} becomes {w1}x{h1} after stage 1; each side must be >= {DFACTOR} px"
        )
    if (h2, w2) != (h1, w1):
        # torchvision's F.resize on a float tensor = bilinear, antialiased interpolate
        import torch
        import torch.nn.functional as F

        t = torch.from_numpy(chw)[None]
        chw = F.interpolate(t, size=(h2, w2), mode="bilinear", align_corners=False, antialias=True)[0].numpy()
    return chw.astype(np.float32, copy=False)


def pil_gray(rgb_u8: np.ndarray) -> np.ndarray:
    """Pillow's convert("L"): ITU-R 601-2 luma in 16-bit fixed point, rounded (bit-exact)."""
    rgb = rgb_u8.astype(np.uint32)
    luma = (19595 * rgb[..., 0] + 38470 * rgb[..., 1] + 7471 * rgb[..., 2] + 0x8000) >> 16
    return luma.astype(np.uint8)


def needs_resize(width: int, height: int, settings: PreprocessSettings) -> bool:
    """Whether stage 1 resamples a width x height image (else both stages only cast, and the truncating
    cast of u8/255*255 gives every uint8 value back: the stage-2 RGB is the input image itself)."""
    if settings.resize_max and max(width, height) > settings.resize_max:
        return True
    if settings.force_resize_wh is not None and settings.force_resize_wh != (width, height):
        return True
    return width % DFACTOR != 0 or height % DFACTOR != 0


def stage2_rgb(image_rgb: np.ndarray, settings: PreprocessSettings) -> tuple[np.ndarray, ImageMeta]:
    """RGB uint8 -> (stage-2 RGB uint8 [H,W,3], meta): what the product graph takes.

    Stage 1 runs on the host only where it resamples; then stage 2's /32 floor is a no-op (stage 1
    already floors), so the device does the rest (luma, padding, masks).
    """
    h, w = image_rgb.shape[:2]
    if needs_resize(w, h, settings):
        chw = stage1(image_rgb, settings)
        rgb = (chw * np.float32(255.0)).transpose(1, 2, 0).astype(np.uint8)  # truncation, as stage2
    else:
        if min(h, w) < DFACTOR:
            raise InputImageError(f"image is too small: {w}x{h}; each side must be >= {DFACTOR} px")
        rgb = np.ascontiguousarray(image_rgb)
    h2, w2 = rgb.shape[:2]
    meta = ImageMeta(orig_wh=(w, h), stage1_wh=(w2, h2), gray_wh=(w2, h2), canvas=max(h2, w2), hw_new=(1.0, 1.0))
    return rgb, meta


def stage2(chw: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """Stage-1 float CHW -> (gray uint8 HxW floored to /32, hw_new (x, y) factors)."""
    rgb_u8 = (chw * np.float32(255.0)).transpose(1, 2, 0).astype(np.uint8)  # truncation, as the original
    gray = pil_gray(rgb_u8)
    h, w = gray.shape
    h2, w2 = h // DFACTOR * DFACTOR, w // DFACTOR * DFACTOR
    if (h2, w2) != (h, w):
        gray = np.asarray(Image.fromarray(gray).resize((w2, h2), Image.Resampling.LANCZOS))
    return gray, (w / w2, h / h2)


def pad_to_canvas(gray: np.ndarray, canvas: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad bottom/right to canvas x canvas -> (uint8 canvas, coarse mask [canvas/stride]^2 bool)."""
    h, w = gray.shape
    out = np.zeros((canvas, canvas), dtype=np.uint8)
    out[:h, :w] = gray
    mask = np.zeros((canvas, canvas), dtype=bool)
    mask[:h, :w] = True
    return out, mask[::stride, ::stride].copy()  # nearest x1/8 picks each cell's top-left pixel


def preprocess_image(image_rgb: np.ndarray, settings: PreprocessSettings) -> tuple[np.ndarray, np.ndarray, ImageMeta]:
    """RGB uint8 -> (canvas gray uint8 [S,S], coarse mask bool [S/8,S/8], meta)."""
    chw = stage1(image_rgb, settings)
    gray, hw_new = stage2(chw)
    canvas = max(gray.shape)
    canvas_u8, mask = pad_to_canvas(gray, canvas, settings.coarse_stride)
    meta = ImageMeta(
        orig_wh=(image_rgb.shape[1], image_rgb.shape[0]),
        stage1_wh=(chw.shape[2], chw.shape[1]),
        gray_wh=(gray.shape[1], gray.shape[0]),
        canvas=canvas,
        hw_new=hw_new,
    )
    return canvas_u8, mask, meta


def to_model_input(canvas_u8: np.ndarray) -> np.ndarray:
    """uint8 [S,S] -> float32 [1,1,S,S] in [0,1] (exactly u8.float()/255)."""
    return (canvas_u8.astype(np.float32) / np.float32(255.0))[None, None]


# ----------------------------------------------------------------------------------------------
# Stage 1 on the device (the product graph): the same arithmetic as the host, operation for operation
# ----------------------------------------------------------------------------------------------
# OpenCV's INTER_AREA at a fractional scale is, per axis, a short weighted sum per output pixel, accumulated in
# float32 in ascending source order; torch's antialiased bilinear resize likewise (weights computed in float32).
# Replaying those sums tap by tap, with the same float32 weights in the same order, gives the host's floats
# bit for bit on any device (tests: test_eloftr_device_stage1.py). The one CPU-dependent step is torch's own
# kernel: built for AVX2/AVX-512 it accumulates with fused multiply-adds, built generic without.


@dataclass(frozen=True)
class Taps:
    """One axis of a separable resize: output k = sum over t of src[index[k, t]] * weight[k, t], in t order
    (padded taps have weight 0 and add nothing)."""

    index: np.ndarray  # int64 [out, T]
    weight: np.ndarray  # float32 [out, T]


@dataclass(frozen=True)
class Stage1Plan:
    """How stage 1 resamples one input size: `steps` of (height taps, width taps, kind), kind "area" (OpenCV
    INTER_AREA, then /255) or "aa" (torch's antialiased bilinear on the /255 values); `device` False where a
    step has no device form here (OpenCV's INTER_LINEAR when a side grows, its integer-factor fast path): the
    host resizes those."""

    steps: tuple[tuple[Taps | None, Taps | None, str], ...]
    out_wh: tuple[int, int]
    device: bool


def _area_taps(ssize: int, dsize: int) -> Taps:
    """OpenCV's computeResizeAreaTab for one axis (downscale by a fractional factor)."""
    scale = 1.0 / (dsize / ssize)  # as cv::resize: inv_scale = dsize/ssize, scale = 1/inv_scale (double)
    taps: list[list[tuple[int, np.float32]]] = []
    for d in range(dsize):
        f1 = d * scale
        f2 = f1 + scale
        cell = min(scale, ssize - f1)
        s1, s2 = math.ceil(f1), math.floor(f2)
        s2 = min(s2, ssize - 1)
        s1 = min(s1, s2)
        row: list[tuple[int, np.float32]] = []
        if s1 - f1 > 1e-3:
            row.append((s1 - 1, np.float32((s1 - f1) / cell)))
        row += [(s, np.float32(1.0 / cell)) for s in range(s1, s2)]
        if f2 - s2 > 1e-3:
            row.append((s2, np.float32(min(min(f2 - s2, 1.0), cell) / cell)))
        taps.append(row)
    return _pack(taps)


def _aa_bilinear_taps(insize: int, outsize: int) -> Taps:
    """torch's antialiased bilinear weights for one axis (its CPU kernel's float32 arithmetic)."""
    f32 = np.float32
    scale = f32(insize / outsize)
    support = scale if scale >= 1 else f32(1.0)
    invscale = f32(1.0) / scale if scale >= 1 else f32(1.0)
    taps: list[list[tuple[int, np.float32]]] = []
    for i in range(outsize):
        center = f32(scale * f32(i + 0.5))
        lo = max(int(f32(center - support + f32(0.5))), 0)
        size = min(int(f32(center + support + f32(0.5))), insize) - lo
        weights, total = [], f32(0.0)
        for j in range(size):
            x = abs(f32(f32(f32(j + lo) - center + f32(0.5)) * invscale))
            w = f32(f32(1.0) - x) if x < 1 else f32(0.0)
            weights.append(w)
            total = f32(total + w)
        if total != 0:
            weights = [f32(w / total) for w in weights]
        taps.append([(lo + j, w) for j, w in enumerate(weights)])
    return _pack(taps)


def _pack(taps: list[list[tuple[int, np.float32]]]) -> Taps:
    width = max(len(t) for t in taps)
    index = np.zeros((len(taps), width), np.int64)
    weight = np.zeros((len(taps), width), np.float32)
    for k, row in enumerate(taps):
        for t, (s, w) in enumerate(row):
            index[k, t], weight[k, t] = s, w
    return Taps(index, weight)


@functools.lru_cache(maxsize=32)
def plan_stage1(width: int, height: int, settings: PreprocessSettings) -> Stage1Plan:
    """Stage 1's resampling steps for a width x height input, as `stage1` runs them on the host."""
    steps: list[tuple[Taps | None, Taps | None, str]] = []
    device = True
    w, h = width, height
    targets = []
    if settings.resize_max:
        scale = settings.resize_max / max(w, h)
        if scale < 1.0:
            targets.append((int(round(w * scale)), int(round(h * scale))))
    if settings.force_resize_wh is not None:
        targets.append(settings.force_resize_wh)
    for tw, th in targets:
        if min(tw, th) < 1:
            raise InputImageError(f"image {w}x{h} shrinks to nothing with resize_max={settings.resize_max}")
        grows = w < tw or h < th
        # OpenCV's fast path for integer factors sums in another order: the host does those
        integer = (w / tw).is_integer() and (h / th).is_integer()
        if grows or integer:
            device = device and (tw, th) == (w, h)  # a same-size INTER_AREA copies
        if (tw, th) != (w, h):
            steps.append((_area_taps(h, th) if th != h else None, _area_taps(w, tw) if tw != w else None, "area"))
        w, h = tw, th
    h2, w2 = h // DFACTOR * DFACTOR, w // DFACTOR * DFACTOR
    if min(h2, w2) < DFACTOR:
        raise InputImageError(
            f"image is too small: {width}x{height} becomes {w}x{h} after stage 1; each side must be >= {DFACTOR} px")
    if (h2, w2) != (h, w):
        steps.append((_aa_bilinear_taps(h, h2) if h2 != h else None, _aa_bilinear_taps(w, w2) if w2 != w else None,
                      "aa"))
    return Stage1Plan(tuple(steps), (w2, h2), device)


def stage2_meta(width: int, height: int, settings: PreprocessSettings) -> ImageMeta:
    """The ImageMeta `stage2_rgb` gives, from the size alone (the device resamples)."""
    w2, h2 = plan_stage1(width, height, settings).out_wh
    return ImageMeta(orig_wh=(width, height), stage1_wh=(w2, h2), gray_wh=(w2, h2), canvas=max(h2, w2),
                     hw_new=(1.0, 1.0))
