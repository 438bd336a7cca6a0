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


@pytest.mark.parametrize("preset", ["robot832", "robot640", "hf_space"])
def test_stage1_kernels_give_the_torch_forms_bytes(preset: str) -> None:
    """The Triton form of stage 1 (core/resample_kernel.py, the default on CUDA) gives the bytes of the torch ops' form
    (which test_eloftr_device_stage1.py holds to the host's stage 1 bit for bit), for one image and a stacked
    pair, at every camera size and preset that resamples on the device."""
    from matchanything_ros.core.bundled import resolve_eloftr_checkpoint
    from matchanything_ros.core.checkpoint import load_state_dict
    from matchanything_ros.core.eloftr.pipeline import EloftrPipeline
    from matchanything_ros.core.eloftr.preprocess import PreprocessSettings, plan_stage1
    from matchanything_ros.core.eloftr.product import EloftrProduct
    from matchanything_ros.core.kernels import resample_kernel

    assert resample_kernel() is not None, "Triton is not importable on this CUDA machine"
    settings = {"robot832": PreprocessSettings(), "robot640": PreprocessSettings(resize_max=640),
                "hf_space": PreprocessSettings(force_resize_wh=(640, 480))}[preset]
    path, cfg, _ = resolve_eloftr_checkpoint("")
    net = EloftrPipeline({}, cfg).build_net(load_state_dict(str(path), "eloftr"))
    torch_form = EloftrProduct(net, 0.1, 100, stage1=settings)  # on the CPU
    kernels = EloftrProduct(net, 0.1, 100, stage1=settings, stage1_kernel=True).cuda()
    checked = 0
    for width, height in CAMERA_SIZES:
        plan = plan_stage1(width, height, settings)
        if not plan.steps or not plan.device:
            continue
        photo = camera_photo(width, height)
        pair = torch.from_numpy(np.stack([photo, np.ascontiguousarray(photo[::-1, ::-1])]))
        for images in (pair[0], pair):
            got = kernels.stage1_rgb(images.cuda()).cpu()
            want = torch_form.stage1_rgb(images)
            assert got.dtype == torch.uint8 and got.shape == want.shape
            differ = int((got != want).sum())
            assert differ == 0, f"{width}x{height} {preset}: {differ} of {want.numel()} values differ"
        checked += 1
    assert checked >= 2  # hf_space resamples on the device at 2 of the sizes, the robot presets at 3-5


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


@pytest.mark.parametrize("banded", [True, False], ids=["banded_kernel", "matmuls"])
@pytest.mark.parametrize("size", CAMERA_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_roma_web_ui_stage_on_the_device_matches_numpy(size: tuple[int, int], banded: bool) -> None:
    """Both device forms of RoMa's web-UI stage + stretch against the numpy path; the banded one (the default with
    Triton) also against its arithmetic written in numpy (test_roma_device_resize.banded_sums: the same fused
    multiply-adds in the same order; up to a rounding apart, as the numpy FMA rounds through float64)."""
    from test_roma_device_resize import banded_sums

    from matchanything_ros.core.kernels import resample_kernel
    from matchanything_ros.core.roma.device_graph import StretchResize
    from matchanything_ros.core.roma.preprocess import prepare_image

    img = camera_photo(*size)
    ref = prepare_image(img, 560, 864, webui_resize=True)
    stretch = StretchResize((560, 864), webui=True, banded=banded)
    if banded:
        assert resample_kernel() is not None, "Triton is not importable on this CUDA machine"
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False  # as RomaImageGraph's fp32_math
        with torch.inference_mode():
            coarse, fine = (t[0].cpu().numpy() for t in stretch(torch.from_numpy(img).cuda()[None]))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    err = max(np.abs(coarse - ref.coarse).max(), np.abs(fine - ref.fine).max())
    print(f"{size}: {'banded' if banded else 'MatMuls'} vs numpy {err:.3g}")
    assert err <= 2e-6
    if banded:
        for got, s in ((coarse, 560), (fine, 864)):
            assert np.abs(got - banded_sums(img, *stretch.matrices(*img.shape[:2], s))).max() <= 2.4e-7


def test_fp16_keeps_fp32s_matches_on_cuda() -> None:
    """The fp16 promise (README: 99.7-99.8 % of CUDA fp32's matches within 1 px on held-out pairs, which
    bench/eloftr_heldout_pairs.py measures per pair and fp32 island); 98 % here leaves this one pair a margin."""
    from scipy.spatial import cKDTree

    from matchanything_ros.core.matcher import Matcher, MatcherConfig

    pair = demo_pair((832, 832))
    base: dict[str, Any] = {"device": "cuda", "backend": "torch", "threshold": 0.1}
    with Matcher(MatcherConfig(**base, precision="fp32")) as m32:
        ref = m32.match(*pair)
    with Matcher(MatcherConfig(**base, precision="fp16")) as m16:
        out = m16.match(*pair)
    d, _ = cKDTree(np.concatenate([out.keypoints0, out.keypoints1], 1)).query(
        np.concatenate([ref.keypoints0, ref.keypoints1], 1))
    assert len(ref) > 1000 and np.mean(d <= 1.0) >= 0.98, (len(out), len(ref), float(np.mean(d <= 1.0)))


def test_upload_through_pinned_buffers_gives_the_default_uploads_matches() -> None:
    """The default upload (straight from the arrays, staged by the driver) and EloftrOptions.pinned_upload (through
    the backend's pinned buffers) are two ways to the same device bytes: the same matches at a size the device
    resamples, frame after frame with new arrays (a new message's)."""
    from matchanything_ros.core.eloftr.options import EloftrOptions
    from matchanything_ros.core.matcher import Matcher, MatcherConfig

    pair = demo_pair((1920, 1080))
    base: dict[str, Any] = {"device": "cuda", "backend": "torch", "precision": "fp16", "threshold": 0.1}
    with Matcher(MatcherConfig(**base, options=EloftrOptions(pinned_upload=True))) as pinned:
        ref = pinned.match(*pair)
    with Matcher(MatcherConfig(**base)) as straight:
        for _ in range(3):
            out = straight.match(*(img.copy() for img in pair))
            assert len(ref) > 1000
            np.testing.assert_array_equal(out.keypoints0, ref.keypoints0)
            np.testing.assert_array_equal(out.keypoints1, ref.keypoints1)


@pytest.mark.parametrize("mode", ["cudnn_nhwc", "triton", "window_dots"])
def test_roma_speed_form_kernels_run_on_this_gpu(mode: str) -> None:
    """The CUDA speed form's Triton kernels run here (else RoMa falls back to torch's forms, slower, with only a
    log line): each is checked against its eager form on small tensors."""
    from matchanything_ros.core.roma.refiner_kernel import kernel_runs_here, triton_available

    assert triton_available(), "this torch has no Triton: RoMa runs its refiners in cuDNN's modules"
    assert kernel_runs_here(mode, "cuda")


ROMA_FORMS: dict[str, dict[str, Any]] = {"default": {}, "refiners_cudnn_nchw": {"refiner_blocks": None},
                                         "window_products_by_gemm": {"fused_window_dots": False},
                                         "stretch_by_matmuls": {"stage1_kernel": False}}


@pytest.mark.parametrize("form", list(ROMA_FORMS))
def test_roma_cuda_fp32_forms_reproduce_the_official_dense_output(form: str) -> None:
    """Each CUDA fp32 form (RomaOptions; the image-fed graph, Cholesky GP, gathered correlation) within the CPU
    parity tolerances of the original's dense output (test_roma_device_resize.py runs the same on the CPU)."""
    import roma_util as ru
    from test_roma_device_resize import CERT_TOL, FLOW_TOL

    from matchanything_ros.core.backends.torch_backend import TorchBackend
    from matchanything_ros.core.roma.options import RomaOptions
    from matchanything_ros.core.roma.pipeline import RomaPipeline

    name = ru.quickest_pair(full_res=True)
    z = ru.npz(name)
    ckpt, dino = ru.weight_files_for(name)
    pipe = RomaPipeline({"coarse_res": int(z["coarse_res"][0]), "upsample_res": int(z["upsample_res"][0]),
                         "roma_webui_resize": False, "sample_mode": "topk", "dinov2_path": str(dino)},
                        options=RomaOptions(**ROMA_FORMS[form]))
    graphs = pipe.torch_graphs(pipe.load_weights({"checkpoint_path": str(ckpt), "dinov2_path": str(dino)}), "cuda")
    pipe.bind_graphs(graphs)
    assert pipe.stage1_inputs
    backend = TorchBackend(graphs, "cuda", "fp32")
    try:
        inputs, meta = pipe.preprocess(z["img0_uint8"], z["img1_uint8"])
        outputs = pipe.infer(backend, inputs, meta)
    finally:
        backend.close()
    warp, cert = ru.stored_dense(name)
    warp_err = float(np.abs(torch.as_tensor(outputs["warp"]).cpu().numpy()[0] - warp).max())  # may stay on the GPU
    cert_err = float(np.abs(torch.as_tensor(outputs["certainty"]).cpu().numpy()[0] - cert).max())
    print(f"{form}: warp {warp_err:.2e}, certainty {cert_err:.2e}")
    assert warp_err <= FLOW_TOL and cert_err <= CERT_TOL


def test_roma_captured_sampler_draws_what_the_eager_sampler_draws() -> None:
    """The balanced sampler replayed as a CUDA graph (the default) draws the eager sampler's matches, seeded."""
    from matchanything_ros.core.roma.sampling import DeviceSampler

    g = torch.Generator().manual_seed(0)
    warp = (torch.rand(96 * 192, 4, generator=g) * 2 - 1).cuda()
    certainty = torch.rand(96 * 192, generator=g).cuda()
    eager = DeviceSampler(capture=False)(warp, certainty, 1000, 7)
    captured = DeviceSampler(capture=True)(warp, certainty, 1000, 7)
    assert captured.stage1_index is not None and eager.stage1_index is not None
    assert np.array_equal(captured.stage1_index, eager.stage1_index)
    assert np.array_equal(captured.matches, eager.matches) and np.array_equal(captured.confidence, eager.confidence)


@pytest.mark.parametrize("tile", [(16, 128), (32, 64), (8, 256)], ids=lambda t: f"{t[0]}x{t[1]}")
def test_the_kde_kernel_gives_the_float64_density(tile: tuple[int, int]) -> None:
    """The sampler's KDE kernel (the default on CUDA) at the sampler's size (4 x 5000 points, a ragged last tile
    too) within 1e-6 relative of a float64 KDE, at every tile the benchmark compares."""
    from matchanything_ros.core.roma.sampling import kde_density, kde_density_triton

    g = torch.Generator().manual_seed(1)
    x = torch.cat((torch.rand(15_000, 4, generator=g) * 2 - 1, torch.randn(5_003, 4, generator=g) * 0.05))
    ref = kde_density(x.double().cuda())
    got = kde_density_triton(x.cuda(), block_i=tile[0], block_j=tile[1]).double()
    rel = float(((got - ref).abs() / ref).max())
    print(f"tile {tile}: max relative {rel:.2e}")
    assert rel <= 1e-6


@pytest.mark.parametrize("model", ["homography", "essential"])  # essential: the fundamental path, calibrated
def test_cuda_verifier_is_compiled_once_captured_once_and_agrees_with_the_cpu(model: str) -> None:
    """The matcher's CUDA verifier (compiled by default, captured) gives the CPU eager fit's verdict on real
    matches, and a new inlier threshold or match count replays the same capture: no recompile, no re-capture."""
    from matchanything_ros.core.geometry import GeometryOptions
    from matchanything_ros.core.geometry_torch import TorchVerifier
    from test_geometry_compiled import (CASES, FIXTURE, MOTORCYCLE_K_LEFT, MOTORCYCLE_K_RIGHT, assert_same_verdict,
                                        compiled_graph_count)

    with np.load(FIXTURE) as data:
        k0, k1 = data[f"{CASES[model]}_k0"], data[f"{CASES[model]}_k1"]
    intrinsics = {"K0": MOTORCYCLE_K_LEFT, "K1": MOTORCYCLE_K_RIGHT} if model == "essential" else {}
    cuda, cpu = TorchVerifier("cuda"), TorchVerifier("cpu", compiled=False)
    assert cuda.compiled and cuda.cuda_graphs
    graphs_before = compiled_graph_count()
    poisoned = k1.copy()
    poisoned[-1] = np.nan  # refused after the launch; its row must not leak into the next, smaller frame's padding
    assert cuda.verify(k0, poisoned, GeometryOptions(model, 1.0, seed=7, **intrinsics)).reason_code == "non_finite"
    swapped = {"K0": MOTORCYCLE_K_RIGHT, "K1": MOTORCYCLE_K_LEFT} if intrinsics else {}  # new intrinsics: uploaded
    for threshold, rows, camera in ((1.0, slice(None, None, 3), intrinsics), (1.0, slice(None), intrinsics),
                                    (2.0, slice(None), intrinsics), (1.0, slice(None, None, 2), swapped)):
        options = GeometryOptions(model, threshold, seed=7, **camera)
        f0, f1 = k0[rows], k1[rows]
        assert_same_verdict(model, cuda.verify(f0, f1, options), cpu.verify(f0, f1, options), f0, f1, threshold,
                            **camera)
    assert cuda.compile_fallback == "" and cuda.compiled
    assert compiled_graph_count() == graphs_before + 1 and len(cuda._captured) == 1
    device_ms = cuda.fit_device_ms(model, 7, len(k0))
    assert device_ms is not None
    print(f"{model}: {len(k0)} matches, the captured compiled fit {device_ms:.3f} ms on {torch.cuda.get_device_name()}")
