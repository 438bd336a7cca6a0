"""The photographs the demo model is trained and evaluated on, with their licences.

All ship inside scikit-image (`skimage.data`, no download). Licences are quoted from the
scikit-image docstrings of each loader. Held-out images are never used for training.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SourceImage:
    name: str  # skimage.data loader name
    licence: str
    credit: str


TRAIN_IMAGES: tuple[SourceImage, ...] = (
    SourceImage("camera", "CC0", "Lav Varshney"),
    SourceImage("chelsea", "CC0", "Stefan van der Walt"),
    SourceImage("rocket", "public domain", "SpaceX (DSCOVR launch)"),
    SourceImage("hubble_deep_field", "public domain", "NASA / HubbleSite"),
    SourceImage("immunohistochemistry", "no known copyright restrictions", "CMMI"),
    SourceImage("coins", "no known copyright restrictions", "Brooklyn Museum"),
    SourceImage("text", "public domain", "Wikipedia File:Corner.png"),
    SourceImage("brick", "CC0", "CC0Textures Bricks25"),
    SourceImage("grass", "CC0", "linolafett (DeviantArt)"),
    SourceImage("gravel", "CC0", "CC0Textures Gravel04"),
    SourceImage("retina", "CC0", "Mikael Häggström (Wikimedia)"),
    SourceImage("cell", "CC0", "Paul Müller et al."),
    SourceImage("clock", "public domain", "Stefan van der Walt"),
)

# Never trained on: the homography benchmark uses only these.
HELDOUT_IMAGES: tuple[SourceImage, ...] = (
    SourceImage("astronaut", "public domain", "NASA (Eileen Collins)"),
    SourceImage("coffee", "CC0", "Rachel Michetti / Pikolo Espresso Bar"),
)

# Stereo evaluation only (never trained on): Middlebury 2014 "Motorcycle", 4x down-sampled by scikit-image.
STEREO_SOURCE = SourceImage(
    "stereo_motorcycle",
    "Middlebury 2014 stereo dataset as redistributed by scikit-image (cite Scharstein et al., GCPR 2014)",
    "N. Nesic, P. Westling, X. Wang, Y. Kitajima, G. Krathwohl, D. Scharstein (Middlebury College)",
)


def load_skimage_rgb(name: str) -> np.ndarray:
    """An skimage.data photo as RGB uint8 [H, W, 3] (grey images replicated, alpha dropped)."""
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3].astype(np.uint8))


def pack_images(names: list[str], path: Path) -> None:
    """Write the named photos into one .npz (key = name) for machines without scikit-image data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Any: numpy's stubs type savez_compressed's keyword arguments as its allow_pickle flag
    arrays: dict[str, Any] = {n: load_skimage_rgb(n) for n in names}
    np.savez_compressed(path, **arrays)


def load_packed_images(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
