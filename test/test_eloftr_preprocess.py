"""ELoFTR preprocessing beyond the fixtures: the robot preset, stage-2 resampling, the inverse
mapping to original pixels, input formats, and settings errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from matchanything_ros.core.eloftr.config import EloftrConfig
from matchanything_ros.core.eloftr.pipeline import EloftrPipeline, preprocess_settings
from matchanything_ros.core.eloftr.postprocess import border_keep, to_original_pixels
from matchanything_ros.core.eloftr.preprocess import (PreprocessSettings, pil_gray, preprocess_image, stage1,
                                                       stage2)
from matchanything_ros.core.errors import ConfigError, InputImageError
from matchanything_ros.core.images import to_rgb_u8
from matchanything_ros.core.params import HF_SPACE_FORCE_RESIZE_WH


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut())  # 512x512 RGB


def test_pil_gray_formula_matches_pillow() -> None:
    from PIL import Image

    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    np.testing.assert_array_equal(pil_gray(rgb), np.asarray(Image.fromarray(rgb).convert("L")))


def test_robot_preset_keeps_aspect_and_floors_to_32(photo: np.ndarray) -> None:
    wide = np.ascontiguousarray(np.concatenate([photo, photo[:, :488]], axis=1))  # 1000 x 512
    pipe = EloftrPipeline({"preset": "robot", "resize_max": 832})
    inputs, meta = pipe.preprocess(wide, wide)
    # 1000x512 -> 832x426 (round) -> stage 1 floors to 832x416 with a bilinear antialiased resize
    assert meta.image0.stage1_wh == (832, 416)
    assert meta.image0.gray_wh == (832, 416) and meta.image0.hw_new == (1.0, 1.0)
    assert meta.image0.canvas == 832 and inputs["image0"].shape == (1, 1, 832, 832)
    assert inputs["mask0"].shape == (1, 104, 104)
    assert meta.mask0[:52].all() and not meta.mask0[52:].any()  # 416 / 8 valid rows
    assert (meta.canvas0_u8[416:] == 0).all()
    np.testing.assert_allclose(meta.image0.scale_orig_over_model, [1000 / 832, 512 / 416])


def test_robot_stage1_equals_the_torchvision_style_resize(photo: np.ndarray) -> None:
    img = photo[:500, :450]  # not multiples of 32: stage 1 resamples
    chw = stage1(img, PreprocessSettings(resize_max=832))
    ref = F.interpolate(torch.from_numpy(img.astype(np.float32).transpose(2, 0, 1) / np.float32(255))[None],
                        size=(480, 448), mode="bilinear", align_corners=False, antialias=True)[0].numpy()
    np.testing.assert_array_equal(chw, ref)


def test_no_shrink_when_resize_max_is_zero(photo: np.ndarray) -> None:
    big = np.ascontiguousarray(np.tile(photo, (2, 2, 1)))  # 1024x1024
    _, _, meta = preprocess_image(big, PreprocessSettings(resize_max=0))
    assert meta.canvas == 1024
    _, _, meta = preprocess_image(big, PreprocessSettings(resize_max=832))
    assert meta.canvas == 832


def test_hf_space_preset_forces_640x480(photo: np.ndarray) -> None:
    pipe = EloftrPipeline({"preset": "hf_space"})
    assert pipe.settings.force_resize_wh == HF_SPACE_FORCE_RESIZE_WH
    _, meta = pipe.preprocess(photo, photo)
    assert meta.image0.stage1_wh == (640, 480) and meta.image0.canvas == 640
    explicit = preprocess_settings({"preset": "hf_space", "force_resize_width": 320, "force_resize_height": 256},
                                   EloftrConfig())
    assert explicit.force_resize_wh == (320, 256)


def test_force_resize_needs_both_sizes() -> None:
    with pytest.raises(ConfigError, match="both"):
        EloftrPipeline({"force_resize_width": 640})


def test_stage2_lanczos_path_sets_hw_new() -> None:
    rng = np.random.default_rng(2)
    chw = rng.random((3, 70, 100), dtype=np.float32)
    gray, hw_new = stage2(chw)
    assert gray.shape == (64, 96)
    assert hw_new == (100 / 96, 70 / 64)


def test_inverse_mapping_returns_original_pixels(photo: np.ndarray) -> None:
    """A canvas pixel centre maps to where that content sits in the original image."""
    img = photo[:, :400]  # 400 x 512 -> hf_space 640x480 (stretch), scale (0.625, 1.0667)
    _, _, meta = preprocess_image(img, PreprocessSettings(resize_max=832, force_resize_wh=(640, 480)))
    canvas_pts = np.array([[0.0, 0.0], [639.0, 479.0], [319.5, 239.5]], np.float32)
    orig = to_original_pixels(canvas_pts, meta)
    sx, sy = 400 / 640, 512 / 480
    expected = (canvas_pts + 0.5) * np.array([sx, sy], np.float32) - 0.5
    np.testing.assert_allclose(orig, expected, atol=1e-5)
    np.testing.assert_allclose(orig[2], [199.5, 255.5], atol=1e-4)  # centre -> centre


@pytest.mark.parametrize("convert", ["mono8", "mono16", "rgba", "float"])
def test_input_formats_give_the_same_canvas(photo: np.ndarray, convert: str) -> None:
    gray = pil_gray(photo)
    rgb_from_gray = to_rgb_u8(gray)
    variants = {
        "mono8": gray,
        "mono16": gray.astype(np.uint16) << 8,
        "rgba": np.concatenate([rgb_from_gray, np.full(gray.shape + (1,), 9, np.uint8)], axis=2),
        "float": gray.astype(np.float32) / 255.0,
    }
    ref, _, _ = preprocess_image(rgb_from_gray, PreprocessSettings())
    out, _, _ = preprocess_image(to_rgb_u8(variants[convert]), PreprocessSettings())
    np.testing.assert_array_equal(out, ref)
    # gray replicated to RGB converts back to the same gray (Pillow's weights sum to 65536)
    np.testing.assert_array_equal(out[:512, :512], gray)


def test_too_small_after_stage1_is_refused() -> None:
    thin = np.zeros((40, 1000, 3), np.uint8)  # 832 x 33 after shrinking -> 33 floors to 32: ok
    _, _, meta = preprocess_image(thin, PreprocessSettings(resize_max=832))
    assert meta.gray_wh == (832, 32)
    thinner = np.zeros((36, 1000, 3), np.uint8)  # -> 832 x 30: below 32
    with pytest.raises(InputImageError, match="too small"):
        preprocess_image(thinner, PreprocessSettings(resize_max=832))


def test_border_removal_uses_the_valid_region() -> None:
    mask = np.zeros((10, 10), bool)
    mask[:6, :] = True  # 6 valid rows, 10 valid cols
    keep = border_keep(mask, 2).reshape(10, 10)
    assert keep[2:4, 2:8].all()
    assert keep.sum() == 2 * 6


def test_pipeline_runs_images_of_different_sizes(photo: np.ndarray) -> None:
    """Robot preset with two cameras of different sizes: separate canvases, keypoints inside each image."""
    from matchanything_ros.core.backends.torch_backend import TorchBackend
    from matchanything_ros.core.eloftr.model import EloftrNet

    small = EloftrConfig(block_dims=(16, 16, 32), layer_depths=(1, 1, 1), d_model=32, nhead=4,
                         layer_names=("self", "cross"), fine_d_model=16, fine_regress_dim=4)
    torch.manual_seed(0)
    pipe = EloftrPipeline({"preset": "robot", "threshold": 2.6e-6}, small)  # random weights: tiny confidences
    assert pipe.coarse_full
    backend = TorchBackend(pipe.torch_graphs(EloftrNet(small).state_dict()), "cpu", "fp32")
    img0, img1 = photo[:320, :448], photo[100:356, 50:306]  # 448x320 and 256x256
    inputs, meta = pipe.preprocess(img0, img1)
    assert inputs["image0"].shape[-1] == 448 and inputs["image1"].shape[-1] == 256
    result = pipe.postprocess(pipe.infer(backend, inputs, meta), meta)
    backend.close()
    assert len(result) > 0 and result.image0_size == (448, 320) and result.image1_size == (256, 256)
    for kp, (w, h) in ((result.keypoints0, (448, 320)), (result.keypoints1, (256, 256))):
        assert (kp >= -4).all() and (kp[:, 0] < w).all() and (kp[:, 1] < h).all()
    assert result.confidence.dtype == np.float32 and (result.confidence > 2.6e-6).all()
