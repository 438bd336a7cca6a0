"""RoMa's stretch-resize inside the graph (the CUDA speed form), checked on the CPU.

* The MatMul resize vs the bit-exact numpy path on real photos (the fixtures' images), at the
  fixtures' sizes and at the defaults (640x480 -> 560 / 864): float32 summation order is the only
  difference, bounded by RESIZE_TOL (measured here ~1e-7; the issue expects ~1e-7).
* The banded form (one Triton kernel per axis on CUDA): each matrix's band holds all its weights, and the
  kernel's sums (`banded_sums`, its arithmetic in numpy; test_gpu.py holds the kernel to it) are within
  RESIZE_TOL of the numpy path at every camera size, equal to it at 640x480.
* The stage-1 host part hands over exactly what the numpy path resizes.
* It exports to ONNX as MatMuls and ONNX Runtime reproduces it.
* The gathered local correlation equals the grid_sample one (flows reaching past the borders too).
* The whole speed-form graph (image-fed, Cholesky GP, folded BatchNorms, gathered correlation) through the
  pipeline and the torch backend reproduces the official dense output of a fixture pair within the
  parity tolerances.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import parity_rules as pr
import roma_util as ru
from matchanything_ros.core.roma.config import WEBUI_SIZE_WH
from matchanything_ros.core.roma.device_graph import RomaImageGraph, StretchResize, band_of
from matchanything_ros.core.roma.model import (ConvRefiner, fold_batchnorm, local_correlation,
                                               local_correlation_gathered)
from matchanything_ros.core.roma.preprocess import _fma32, prepare_image, prepare_stage1, resize_matrix, webui_stage

RESIZE_TOL = 5e-7  # float32 summation order (the numpy path's FMA chain vs a GEMM); outputs are in [~-0.1, ~1.1]
FLOW_TOL, CERT_TOL = 1e-3, 1e-2 / 4  # the parity tolerances of test_roma_parity.py
PAIR_NAMES = [p.values[0] for p in ru.pair_params(mark_slow=False)]


def _photo(name: str, side: int = 0) -> np.ndarray:
    return ru.npz(name)[f"img{side}_uint8"]


def _stretch(image_hwc: np.ndarray, sizes: tuple[int, ...]) -> list[np.ndarray]:
    with torch.inference_mode():
        return [t[0].numpy() for t in StretchResize(sizes)(torch.from_numpy(image_hwc)[None])]


@pytest.mark.parametrize("name", PAIR_NAMES)
def test_matmul_resize_matches_numpy_at_fixture_sizes(name: str) -> None:
    z = ru.npz(name)
    c, u = int(z["coarse_res"][0]), int(z["upsample_res"][0])
    for side in (0, 1):
        img = _photo(name, side)
        ref = prepare_image(img, c, u, webui_resize=False)
        coarse, fine = _stretch(img, (c, u))
        assert coarse.shape == ref.coarse.shape and fine.shape == ref.fine.shape
        err = max(np.abs(coarse - ref.coarse).max(), np.abs(fine - ref.fine).max())
        print(f"{name} image{side} -> {c}/{u}: max |diff| {err:.3g}")
        assert err <= RESIZE_TOL, f"{name} image{side}: max |diff| {err:.3g}"


def test_matmul_resize_matches_numpy_at_default_sizes() -> None:
    """The product's case: 640x480 web-UI stage output (uint8 straight, and a float32 one) -> 560 / 864."""
    img = _photo(PAIR_NAMES[0])
    for stage1_input in (np.ascontiguousarray(np.resize(img, (480, 640, 3))), img):
        stage1, meta = prepare_stage1(stage1_input, webui_resize=True)
        assert meta.model_size_wh == WEBUI_SIZE_WH and stage1.shape == (480, 640, 3)
        ref = prepare_image(stage1_input, 560, 864, webui_resize=True)
        coarse, fine = _stretch(stage1, (560, 864))
        err = max(np.abs(coarse - ref.coarse).max(), np.abs(fine - ref.fine).max())
        print(f"640x480 ({stage1.dtype}) -> 560/864: max |diff| {err:.3g}")
        assert err <= RESIZE_TOL, f"max |diff| {err:.3g}"


@pytest.mark.parametrize("size", [(848, 480), (1024, 768), (1280, 720), (1920, 1080), (832, 832)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_web_ui_stage_on_the_device_matches_numpy_at_camera_sizes(size: tuple[int, int]) -> None:
    """The camera image straight to the graph: OpenCV's INTER_AREA shrink and INTER_LINEAR stretch to 640x480
    composed with the stretch-resize into the same two MatMuls (the host does no per-pixel work)."""
    from test_eloftr_device_stage1 import camera_photo

    img = camera_photo(*size)
    stage1, meta = prepare_stage1(img, webui_resize=True, webui_on_device=True)
    assert stage1 is img and meta.model_size_wh == WEBUI_SIZE_WH and meta.original_size_wh == size
    ref = prepare_image(img, 560, 864, webui_resize=True)
    with torch.inference_mode():
        coarse, fine = (t[0].numpy() for t in StretchResize((560, 864), webui=True)(torch.from_numpy(img)[None]))
    err = max(np.abs(coarse - ref.coarse).max(), np.abs(fine - ref.fine).max())
    print(f"{size[0]}x{size[1]} -> 640x480 -> 560/864: max |diff| {err:.3g}")
    assert err <= RESIZE_TOL, f"max |diff| {err:.3g}"


def banded_sums(image_hwc: np.ndarray, wh: np.ndarray, ww: np.ndarray) -> np.ndarray:
    """What the resample kernel computes for `StretchResize(banded=True)`, in numpy: each value / 255 first, the
    width pass then the height pass over each matrix's band (`band_of`), tap 0 a product, the others fused
    multiply-adds in tap order. [H, W, 3] -> [3, S, S] float32."""
    x = image_hwc.astype(np.float32) / np.float32(255)
    index, weight = band_of(ww)
    rows = x[:, index[:, 0], :] * weight[:, 0][None, :, None]
    for t in range(1, index.shape[1]):
        rows = _fma32(x[:, index[:, t], :], weight[:, t][None, :, None], rows)
    index, weight = band_of(wh)
    out = rows[index[:, 0]] * weight[:, 0][:, None, None]
    for t in range(1, index.shape[1]):
        out = _fma32(rows[index[:, t]], weight[:, t][:, None, None], out)
    return out.transpose(2, 0, 1)


@pytest.mark.parametrize("size", [(640, 480), (848, 480), (1024, 768), (1280, 720), (1920, 1080), (3840, 2160)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_bands_hold_every_weight_of_the_resize_matrices(size: tuple[int, int]) -> None:
    """A 1920x1080 camera image's 864-pixel rows read 13-19 source pixels each, not 1,080-1,920."""
    w, h = size
    for webui in (True, False):
        for s in (560, 864):
            for matrix in StretchResize((s,), webui=webui).matrices(h, w, s):
                index, weight = band_of(matrix)
                assert index.dtype == np.int32 and weight.dtype == np.float32 and index.shape == weight.shape
                assert index.min() >= 0 and index.max() < matrix.shape[1]
                rebuilt = np.zeros_like(matrix)
                np.add.at(rebuilt, (np.arange(matrix.shape[0])[:, None].repeat(index.shape[1], 1), index), weight)
                np.testing.assert_array_equal(rebuilt, matrix)
                assert index.shape[1] <= (20 if w <= 1920 else 40), (webui, s, index.shape)  # measured 13-19, 24-38


@pytest.mark.parametrize("size", [(640, 480), (848, 480), (1024, 768), (1280, 720), (1920, 1080), (1000, 700)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_banded_sums_match_numpy_at_camera_sizes(size: tuple[int, int]) -> None:
    from test_eloftr_device_stage1 import camera_photo

    img = camera_photo(*size)
    ref = prepare_image(img, 560, 864, webui_resize=True)
    stretch = StretchResize((560, 864), webui=True)
    errs = [float(np.abs(banded_sums(img, *stretch.matrices(*img.shape[:2], s)) - r).max())
            for s, r in ((560, ref.coarse), (864, ref.fine))]
    print(f"{size[0]}x{size[1]} -> 560 / 864, banded sums: max |diff| {errs}")
    assert max(errs) <= RESIZE_TOL
    if size == WEBUI_SIZE_WH:
        assert max(errs) == 0  # the numpy path's own taps in its own order


def test_stage1_is_what_the_numpy_path_resizes() -> None:
    img = _photo(PAIR_NAMES[0])
    at_640 = np.ascontiguousarray(np.resize(img, (480, 640, 3)))
    stage1, _ = prepare_stage1(at_640, webui_resize=True)
    assert stage1.dtype == np.uint8  # the identity: the uint8 image goes to the device as it is (0.9 MB)
    np.testing.assert_array_equal(stage1.astype(np.float32), webui_stage(at_640))
    stage1, meta = prepare_stage1(img, webui_resize=True)
    np.testing.assert_array_equal(stage1, webui_stage(img))
    stage1, meta = prepare_stage1(img, webui_resize=False)
    assert stage1 is img and meta.model_size_wh == (img.shape[1], img.shape[0])


def test_resize_matrix_rows_are_normalised_and_identity_when_size_kept() -> None:
    w = resize_matrix(640, 560)
    assert w.shape == (560, 640) and np.abs(w.sum(axis=1) - 1).max() < 1e-6
    np.testing.assert_array_equal(resize_matrix(480, 480), np.eye(480, dtype=np.float32))


def test_stretch_exports_to_onnx_as_matmuls() -> None:
    import onnx
    import onnxruntime as ort

    img = _photo(PAIR_NAMES[0])
    module = StretchResize((112, 168)).eval()
    x = torch.from_numpy(img)[None]
    expected = [t.numpy() for t in module(x)]
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module, (x,), buf, input_names=["image"], output_names=["coarse", "fine"],
                          opset_version=17, dynamo=False)
    model = onnx.load_from_string(buf.getvalue())
    ops = {n.op_type for n in model.graph.node}
    assert [n.op_type for n in model.graph.node].count("MatMul") == 4
    assert not ops & {"Resize", "Loop", "Gather"}, ops
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": img[None]})
    for g, e in zip(got, expected):
        assert np.abs(g - e).max() <= 1e-6


@pytest.mark.parametrize("radius", [7, 3, 2])  # the refiners' radii at scales 16, 8, 4
def test_gathered_correlation_equals_grid_sample_correlation(radius: int) -> None:
    gen = torch.Generator().manual_seed(radius)
    f1, f2 = (torch.randn(2, 48, 19, 23, generator=gen) for _ in range(2))
    flow = torch.rand(2, 2, 19, 23, generator=gen) * 2.6 - 1.3  # some windows partly or wholly outside
    with torch.inference_mode():
        expected = local_correlation(f1, f2, flow, radius)
        got = local_correlation_gathered(f1, f2, flow, radius, max_chunk_elems=40_000)  # several chunks
    assert got.shape == expected.shape == (2, (2 * radius + 1) ** 2, 19, 23)
    assert (expected == 0).any()  # windows wholly outside the map are zero in both
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_fold_batchnorm_keeps_a_refiner_block() -> None:
    refiner = ConvRefiner(24, 6, 0).eval()
    gen = torch.Generator().manual_seed(0)
    bn = refiner.block1[1]
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.copy_(torch.randn(t.shape, generator=gen))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) + 0.5)
    x = torch.randn(1, 24, 20, 20, generator=gen)
    with torch.inference_mode():
        expected = refiner.block1(x)
    fold_batchnorm(refiner.block1[0], bn)
    refiner.block1[1] = torch.nn.Identity()
    with torch.inference_mode():
        got = refiner.block1(x)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_speed_form_graph_reproduces_official_dense_output() -> None:
    """Image-fed graph + Cholesky GP + folded BatchNorms + gathered correlation, through RomaPipeline.preprocess and
    the torch backend, on the quickest pair stored at full resolution: the official final warp and certainty within
    the parity tolerances (a scale-16 anchor near-tie decided as the fixture's, counted: docs/parity.md)."""
    from matchanything_ros.core.backends.torch_backend import TorchBackend
    from matchanything_ros.core.roma.pipeline import RomaPipeline

    name = ru.quickest_pair(full_res=True)
    z = ru.npz(name)
    ckpt, dino = ru.weight_files_for(name)
    pipe = RomaPipeline({"coarse_res": int(z["coarse_res"][0]), "upsample_res": int(z["upsample_res"][0]),
                         "roma_webui_resize": False, "sample_mode": "topk", "dinov2_path": str(dino)})
    net = pipe.build_net(pipe.load_weights({"checkpoint_path": str(ckpt), "dinov2_path": str(dino)}),
                         gp_solver="cholesky")
    assert net.fold_batchnorms() == 12 + 5 + 5 * 9  # VGG features[:40], projections, 5 refiners x 9 blocks
    net.use_gathered_correlation()
    net.dinov2.freeze_pos_embed(pipe.config.coarse_res // 14, pipe.config.coarse_res // 14)
    graphs = {"dense": RomaImageGraph(net, pipe.config.coarse_res, pipe.config.upsample_res)}
    pipe.bind_graphs(graphs)  # the image-fed graph: preprocess hands over the stage-1 images
    backend = TorchBackend(graphs, "cpu", "fp32")
    inputs, meta = pipe.preprocess(z["img0_uint8"], z["img1_uint8"])
    assert set(inputs) == {"image0", "image1"} and inputs["image0"].dtype == np.uint8
    with ru.anchor_ties_decided_as(net, z["pass1_s16_gm_cls_argmax"], f"{name} speed form") as decided:
        outputs = pipe.infer(backend, inputs, meta)
    backend.close()
    pr.report(decided)
    warp, cert = ru.stored_dense(name)
    assert outputs["warp"].shape == (1, *warp.shape)
    warp_err = float(np.abs(outputs["warp"][0] - warp).max())
    cert_err = float(np.abs(outputs["certainty"][0] - cert).max())
    print(f"speed form vs official: warp {warp_err:.2e}, certainty {cert_err:.2e}")
    assert warp_err <= FLOW_TOL and cert_err <= CERT_TOL
    result = pipe.postprocess(outputs, meta)  # the matches in the original images
    h0, w0 = z["img0_uint8"].shape[:2]
    assert len(result) and np.all((result.keypoints0 >= -0.5) & (result.keypoints0 <= [w0 - 0.5, h0 - 0.5]))
