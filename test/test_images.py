"""Input arrays and files -> RGB uint8, and the specific errors for what cannot be matched."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from matchanything_ros.core.errors import InputImageError
from matchanything_ros.core.images import MIN_SIDE, load_image, to_rgb_u8


@pytest.fixture
def rgb() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)


def test_rgb_passes_through_unchanged(rgb: np.ndarray) -> None:
    out = to_rgb_u8(rgb)
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, rgb)


def test_mono8_is_replicated_to_three_channels(rgb: np.ndarray) -> None:
    gray = rgb[:, :, 0]
    out = to_rgb_u8(gray)
    assert out.shape == (48, 64, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)
    np.testing.assert_array_equal(to_rgb_u8(gray[:, :, None]), out)


def test_mono16_keeps_the_top_byte() -> None:
    mono16 = np.full((40, 40), 0xABCD, dtype=np.uint16)
    out = to_rgb_u8(mono16)
    assert out.dtype == np.uint8 and (out == 0xAB).all()


def test_rgba_drops_alpha(rgb: np.ndarray) -> None:
    rgba = np.concatenate([rgb, np.zeros((48, 64, 1), np.uint8)], axis=2)
    np.testing.assert_array_equal(to_rgb_u8(rgba), rgb)


def test_float_in_unit_range_is_scaled(rgb: np.ndarray) -> None:
    for dtype in (np.float32, np.float64):
        np.testing.assert_array_equal(to_rgb_u8(rgb.astype(dtype) / 255.0), rgb)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((0, 0, 3), np.uint8), "empty"),
    (np.zeros((100,), np.uint8), "1-D"),
    (np.zeros((40, 40, 2), np.uint8), "channels"),
    (np.zeros((40, 40, 3), np.int32), "dtype"),
    (np.zeros((MIN_SIDE - 1, 100, 3), np.uint8), "too small"),
    (np.full((40, 40), np.nan, np.float32), "NaN"),
    (np.full((40, 40), np.inf, np.float64), "NaN or inf"),
    (np.full((40, 40), 2.0, np.float32), "[0, 1]"),
])
def test_bad_arrays_raise_specific_errors(bad: np.ndarray, message: str) -> None:
    with pytest.raises(InputImageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        to_rgb_u8(bad)


def test_not_an_array() -> None:
    with pytest.raises(InputImageError, match="numpy array"):
        to_rgb_u8([[1, 2], [3, 4]])  # type: ignore[arg-type]


def test_load_image_reads_png_modes(tmp_path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(load_image(tmp_path / "rgb.png"), rgb)
    rgba = np.concatenate([rgb, np.full((48, 64, 1), 7, np.uint8)], axis=2)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png"), rgb)
    mono16 = (rgb[:, :, 0].astype(np.uint16) << 8) | 0x55
    Image.fromarray(mono16).save(tmp_path / "mono16.png")
    np.testing.assert_array_equal(load_image(tmp_path / "mono16.png")[:, :, 1], rgb[:, :, 0])


def test_load_image_refuses_non_image_and_missing_files(tmp_path: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(InputImageError, match="not a readable image"):
        load_image(text)
    with pytest.raises(InputImageError, match="not found"):
        load_image(tmp_path / "missing.png")
