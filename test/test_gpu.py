"""What only a CUDA GPU can check, run by the device call (`bench/device_run.sh`): `pytest -m gpu`.

On a machine without CUDA (ours, CI's) these are skipped for that reason alone; the same code paths run on the
CPU in test_eloftr_device_stage1.py, test_eloftr_thresholds.py and test_roma_device_resize.py.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from test_eloftr_device_stage1 import CAMERA_SIZES, camera_photo

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")]


def demo_pair(size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    from matchanything_ros.core.bundled import DATA_DIR

    with np.load(DATA_DIR / "demo_homography.npz") as z:
        return tuple(np.ascontiguousarray(cv2.resize(z[k], size, interpolation=cv2.INTER_CUBIC))
                     for k in ("image0", "image1"))  # type: ignore[return-value]


@pytest.mark.parametrize("size", CAMERA_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_device_stage1_equals_this_hosts_stage1_bit_for_bit(size: tuple[int, int]) -> None:
    from matchanything_ros.core.bundled import resolve_eloftr_checkpoint
    from matchanything_ros.core.checkpoint import load_state_dict
    from matchanything_ros.core.eloftr.pipeline import EloftrPipeline
    from matchanything_ros.core.eloftr.preprocess import PreprocessSettings, plan_stage1, stage2_rgb
    from matchanything_ros.core.eloftr.product import EloftrProduct

    path, cfg, _ = resolve_eloftr_checkpoint("")
    net = EloftrPipeline({}, cfg).build_net(load_state_dict(str(path), "eloftr")).cuda()
    settings = PreprocessSettings()
    photo = camera_photo(*size)
    module = EloftrProduct(net, 0.1, 100, stage1=settings)
    if not plan_stage1(size[0], size[1], settings).device:
        pytest.fail(f"{size}: stage 1 has no device form at the default settings")
    got = module.stage1_rgb(torch.from_numpy(photo).cuda()).cpu().numpy()
    ref, _ = stage2_rgb(photo, settings)
    # bit for bit against the pinned OpenCV on our CPUs (test_eloftr_device_stage1.py); a GPU machine's own
    # OpenCV build may round INTER_AREA differently (seen: an H100 host, 2026-12-06, <= 669 of 1.1 M values)
    differ = np.abs(got.astype(int) - ref.astype(int))
    print(f"{size}: {int((differ > 0).sum())} of {ref.size} stage-2 values differ from this host's")
    assert differ.max() <= 1 and (differ > 0).mean() <= 1e-3


def test_cuda_fp32_gives_the_cpus_matches() -> None:
    from matchanything_ros.core.matcher import Matcher, MatcherConfig

    pair = demo_pair((1280, 720))
    base: dict[str, Any] = {"backend": "torch", "precision": "fp32", "threshold": 0.1}
    with Matcher(MatcherConfig(**base, device="cpu")) as cpu, Matcher(MatcherConfig(**base, device="cuda")) as gpu:
        ref, out = cpu.match(*pair), gpu.match(*pair)
    assert out.extras["graph"] == "product" and len(ref) > 1000
    from scipy.spatial import cKDTree

    d, _ = cKDTree(np.concatenate([out.keypoints0, out.keypoints1], 1)).query(
        np.concatenate([ref.keypoints0, ref.keypoints1], 1))
    # near-ties of the fine argmax and a few stage-2 values this host's OpenCV rounds otherwise move ~1 %
    assert abs(len(out) - len(ref)) <= 0.005 * len(ref) and np.mean(d <= 1e-2) >= 0.98, (len(out), len(ref))


def test_thresholds_change_in_place_on_cuda_without_recompiling_and_the_cap_keeps_the_most_confident() -> None:
    from matchanything_ros.core.matcher import Matcher, MatcherConfig

    pair = demo_pair((832, 832))
    base: dict[str, Any] = {"device": "cuda", "backend": "torch", "precision": "fp16", "engine_max_matches": 20000}
    counts = []
    with Matcher(MatcherConfig(**base, threshold=0.2)) as matcher:
        for thr in np.linspace(0.2, 0.01, 12):
            assert matcher.update(MatcherConfig(**base, threshold=float(thr)))
            out = matcher.match(*pair)
            assert (out.confidence > thr).all() and not out.extras["matches_capped"]
            counts.append(len(out))
        assert matcher.info["compile_fallbacks"] == ""
    assert counts == sorted(counts) and counts[-1] > counts[0]
    full = out
    with Matcher(MatcherConfig(**{**base, "engine_max_matches": 1000}, threshold=0.01)) as capped:
        out = capped.match(*pair)
    assert out.extras["matches_capped"] and abs(out.extras["coarse_matches_total"] - len(full)) <= 0.005 * len(full)
    assert 900 <= len(out) <= 1000
    assert out.confidence.min() >= np.sort(full.confidence)[::-1][1000] * (1 - 1e-3)


def test_roma_web_ui_stage_on_the_device_matches_numpy() -> None:
    from matchanything_ros.core.roma.device_graph import StretchResize
    from matchanything_ros.core.roma.preprocess import prepare_image

    img = camera_photo(1920, 1080)
    ref = prepare_image(img, 560, 864, webui_resize=True)
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False  # as RomaImageGraph's fp32_math
        with torch.inference_mode():
            coarse, fine = (t[0].cpu().numpy() for t in
                            StretchResize((560, 864), webui=True)(torch.from_numpy(img).cuda()[None]))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert max(np.abs(coarse - ref.coarse).max(), np.abs(fine - ref.fine).max()) <= 2e-6
