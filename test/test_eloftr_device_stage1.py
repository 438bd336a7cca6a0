"""Stage 1 (the camera image's shrink to the model size) inside the product graph, against the host reference.

On the GPU the product graph takes the camera's images as they come and resamples them itself, so the host
does no per-pixel work. Its arithmetic replays OpenCV's INTER_AREA and torch's antialiased bilinear tap by tap,
so the stage-2 image must equal `stage2_rgb`'s bit for bit at every size a camera publishes, on this CPU's
kernels and on the generic ones (`make test-capped`). Here the same code runs on the CPU; the device script
checks it on the GPU against that machine's host.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from matchanything_ros.core.checkpoint import load_state_dict
from matchanything_ros.core.eloftr.product import EloftrProduct
from matchanything_ros.core.eloftr.pipeline import EloftrPipeline
from matchanything_ros.core.eloftr.preprocess import PreprocessSettings, plan_stage1, stage2_meta, stage2_rgb
from matchanything_ros.core.matcher import DATA_DIR, resolve_eloftr_checkpoint, run_pipeline

pytestmark = pytest.mark.parity

CAMERA_SIZES = [(640, 480), (848, 480), (1024, 768), (1280, 720), (1920, 1080), (1000, 700)]


@pytest.fixture(scope="module")
def demo() -> tuple[Any, Any]:
    path, cfg, _ = resolve_eloftr_checkpoint("")
    return cfg, load_state_dict(str(path), "eloftr")


def camera_photo(width: int, height: int) -> np.ndarray:
    """A real photo at a camera's size (scikit-image's astronaut and coffee, tiled)."""
    from skimage import data

    tile = np.concatenate([data.astronaut()[:400, :600], data.coffee()[:400, :600]], axis=1)
    reps = (-(-height // tile.shape[0]), -(-width // tile.shape[1]), 1)
    return np.ascontiguousarray(np.tile(tile, reps)[:height, :width])


@pytest.mark.parametrize("settings", [PreprocessSettings(), PreprocessSettings(resize_max=640),
                                      PreprocessSettings(force_resize_wh=(640, 480))],
                         ids=["robot832", "robot640", "hf_space"])
@pytest.mark.parametrize("size", CAMERA_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_device_stage1_equals_the_host_bit_for_bit(demo: Any, size: tuple[int, int],
                                                   settings: PreprocessSettings) -> None:
    cfg, state = demo
    photo = camera_photo(*size)
    plan = plan_stage1(size[0], size[1], settings)
    ref, meta = stage2_rgb(photo, settings)
    assert stage2_meta(size[0], size[1], settings) == meta
    if not plan.device:  # a side grows (INTER_LINEAR) or an integer factor (OpenCV's fast path): the host's job
        assert any(w < tw or h < th or (w % tw == 0 and h % th == 0) for (w, h), (tw, th) in _steps(size, settings))
        return
    module = EloftrProduct(EloftrPipeline({}, cfg).build_net(state), 0.1, 100, stage1=settings)
    got = module.stage1_rgb(torch.from_numpy(photo)).numpy()
    assert got.shape == ref.shape and module.stage2_shape(photo) == ref.shape
    if plan.steps:
        differ = int((got != ref).sum())
        assert differ == 0, f"{differ} of {ref.size} stage-2 values differ from the host's"
        # a camera pair runs stage 1 once for both (product.front): each image as the host makes it
        other = np.ascontiguousarray(photo[::-1, ::-1])
        pair = module.stage1_rgb(torch.from_numpy(np.stack([photo, other]))).numpy()
        assert np.array_equal(pair[0], ref) and np.array_equal(pair[1], stage2_rgb(other, settings)[0])
    else:
        assert got is not None and np.array_equal(got, photo)


def _steps(size: tuple[int, int], settings: PreprocessSettings) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """stage 1's (from, to) sizes: the resize_max shrink, then the forced size."""
    w, h = size
    out = []
    if settings.resize_max and max(w, h) > settings.resize_max:
        s = settings.resize_max / max(w, h)
        out.append(((w, h), (int(round(w * s)), int(round(h * s)))))
        w, h = out[-1][1]
    if settings.force_resize_wh:
        out.append(((w, h), settings.force_resize_wh))
    return out


@pytest.mark.parametrize("size,settings", [((1664, 1248), PreprocessSettings()),  # factor 2: OpenCV's fast path
                                           ((320, 240), PreprocessSettings(force_resize_wh=(640, 480)))],  # grows
                         ids=["integer_factor", "upscale"])
def test_sizes_without_a_device_form_are_resampled_on_the_host(demo: Any, size: tuple[int, int],
                                                               settings: PreprocessSettings) -> None:
    cfg, state = demo
    assert not plan_stage1(size[0], size[1], settings).device
    pipe = EloftrPipeline({}, cfg)
    pipe.settings = settings
    product = EloftrProduct(pipe.build_net(state), pipe.threshold, pipe.max_matches, stage1=settings)
    pipe.bind_graphs({"product": product})
    assert pipe.product and pipe.stage1_on_device
    photo = camera_photo(*size)
    inputs, meta = pipe.preprocess(photo, photo)
    ref, _ = stage2_rgb(photo, settings)
    np.testing.assert_array_equal(inputs["rgb0"], ref)  # the host resampled it
    assert meta.image0.stage1_wh == (ref.shape[1], ref.shape[0])


def test_product_graph_with_stage1_on_device_gives_the_host_paths_matches(demo: Any) -> None:
    """End to end on a 1280x720 camera pair (the demo pair, enlarged): the same lists as the host path."""
    import cv2

    cfg, state = demo
    with np.load(DATA_DIR / "demo_homography.npz") as z:
        a, b = (cv2.resize(z[k], (1280, 720), interpolation=cv2.INTER_CUBIC) for k in ("image0", "image1"))
    params = {"threshold": 0.1, "resize_max": 416}
    host = EloftrPipeline(params, cfg)
    from matchanything_ros.core.backends.torch_backend import TorchBackend

    host_backend = TorchBackend(host.torch_graphs(state, "cpu"), "cpu")
    prod = EloftrPipeline(params, cfg)
    module = EloftrProduct(prod.build_net(state), prod.threshold, prod.max_matches, stage1=prod.settings).eval()
    prod.bind_graphs({"product": module})
    prod_backend = TorchBackend({"product": module}, "cpu")
    inputs, _ = prod.preprocess(a, b)
    assert inputs["rgb0"].shape == (720, 1280, 3)  # the camera image itself goes to the graph
    ref = run_pipeline(host, host_backend, a, b)
    out = run_pipeline(prod, prod_backend, a, b)
    assert len(ref) > 200
    np.testing.assert_array_equal(out.keypoints0, ref.keypoints0)
    np.testing.assert_array_equal(out.keypoints1, ref.keypoints1)
    np.testing.assert_array_equal(out.confidence, ref.confidence)
