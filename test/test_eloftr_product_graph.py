"""The ELoFTR product graph (one module: uint8 images in, padded matches out) against the host path.

The host path (numpy preprocessing -> coarse graph -> numpy selection -> fine graph) is the reference
that the parity tests hold to the original code; on the CPU in fp32 the product graph must give the
same match lists in the same order, bit for bit. Real images: the bundled demo pair and scikit-image's
photos, with the bundled demo model.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch

from matchanything_ros.core.backends.torch_backend import TorchBackend
from matchanything_ros.core.checkpoint import load_state_dict
from matchanything_ros.core.eloftr.graphs import EloftrFine, dual_softmax_confidence, topk_candidates
from matchanything_ros.core.eloftr.product import (EloftrProduct, _tf32_split, lse_passing_mask, lse_topk_candidates,
                                                   select_on_device)
from matchanything_ros.core.eloftr.pipeline import EloftrPipeline
from matchanything_ros.core.eloftr.postprocess import select_coarse_matches
from matchanything_ros.core.eloftr.preprocess import pil_gray, preprocess_image, stage2_rgb, to_model_input
from matchanything_ros.core.matcher import DATA_DIR, resolve_eloftr_checkpoint, run_pipeline


@pytest.fixture(scope="module")
def demo_model() -> tuple[Any, dict[str, torch.Tensor]]:
    path, cfg, _ = resolve_eloftr_checkpoint("")
    return cfg, load_state_dict(str(path), "eloftr")


@pytest.fixture(scope="module")
def demo_pair() -> tuple[np.ndarray, np.ndarray]:
    with np.load(DATA_DIR / "demo_homography.npz") as z:
        return z["image0"], z["image1"]  # 600x400 real photos


def _pipelines(demo_model: Any, params: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    cfg, state = demo_model
    host = EloftrPipeline(params, cfg)
    host_backend = TorchBackend(host.torch_graphs(state, "cpu"), "cpu")
    product = EloftrPipeline(params, cfg)
    graphs = product.torch_graphs(state, "cpu", product=True)
    assert not product.product  # building graphs changes nothing: the backend's graphs are bound
    product.bind_graphs(graphs)
    product_backend = TorchBackend(graphs, "cpu")
    assert product.product and not host.product
    return host, host_backend, product, product_backend


@pytest.mark.parametrize("case", ["resized_on_host", "no_resize"])
def test_product_graph_gives_the_host_paths_matches_bit_for_bit(demo_model: Any, demo_pair: Any, case: str) -> None:
    a, b = demo_pair
    if case == "resized_on_host":  # 600x400 -> resize_max 416: stage 1 resamples on the host
        params: dict[str, Any] = {"threshold": 0.1, "resize_max": 416}
    else:  # multiples of 32 within resize_max: the images go to the graph as they are
        params = {"threshold": 0.1, "resize_max": 832}
        a, b = np.ascontiguousarray(a[:384, :576]), np.ascontiguousarray(b[:352, :512])  # different canvases
    host, hb, prod, pb = _pipelines(demo_model, params)
    ref = run_pipeline(host, hb, a, b)
    out = run_pipeline(prod, pb, a, b)
    assert len(ref) > 300, "the demo model finds hundreds of matches on the demo pair"
    assert out.extras["graph"] == "product" and out.extras["matches_capped"] is False
    assert out.extras["coarse_matches_total"] == len(ref)
    np.testing.assert_array_equal(out.extras["coarse_i_ids"], ref.extras["coarse_i_ids"])
    np.testing.assert_array_equal(out.extras["coarse_j_ids"], ref.extras["coarse_j_ids"])
    np.testing.assert_array_equal(out.confidence, ref.confidence)
    np.testing.assert_array_equal(out.keypoints0, ref.keypoints0)
    np.testing.assert_array_equal(out.keypoints1, ref.keypoints1)
    assert out.image0_size == ref.image0_size and out.extras["canvas1"] == ref.extras["canvas1"]


@pytest.mark.parametrize("size_hw", [(480, 640), (640, 480), (512, 512), (96, 320)])
def test_device_preprocessing_equals_the_host_reference(demo_model: Any, size_hw: tuple[int, int]) -> None:
    from skimage import data

    cfg, state = demo_model
    h, w = size_hw
    photo = np.ascontiguousarray(np.tile(data.coffee(), (2, 2, 1))[:h, :w])  # real photo, both orientations
    pipe = EloftrPipeline({"resize_max": 832}, cfg)
    canvas, mask, _ = preprocess_image(photo, pipe.settings)
    rgb, meta = stage2_rgb(photo, pipe.settings)
    assert rgb is photo or np.array_equal(rgb, photo)  # no resize: the image itself
    module = EloftrProduct(pipe.build_net(state), 0.1, 100)
    image, dmask = module.model_input(torch.from_numpy(rgb))
    np.testing.assert_array_equal(image.numpy(), to_model_input(canvas))  # luma, /255 and padding exact
    np.testing.assert_array_equal(dmask[0].numpy(), mask)
    assert meta.canvas == canvas.shape[0] and meta.hw_new == (1.0, 1.0)


def test_stage2_rgb_resizes_on_the_host_exactly_as_stage_1_2(demo_model: Any, demo_pair: Any) -> None:
    cfg, _ = demo_model
    pipe = EloftrPipeline({"resize_max": 416}, cfg)
    a = demo_pair[0]
    rgb, meta = stage2_rgb(a, pipe.settings)
    canvas, _, ref_meta = preprocess_image(a, pipe.settings)
    np.testing.assert_array_equal(pil_gray(rgb), canvas[: rgb.shape[0], : rgb.shape[1]])
    assert (meta.orig_wh, meta.stage1_wh, meta.canvas) == (ref_meta.orig_wh, ref_meta.stage1_wh, ref_meta.canvas)


def _host_candidates(demo_model: Any, demo_pair: Any, params: dict[str, Any]) -> tuple[Any, ...]:
    """The host path's features and dual-softmax top-K candidates of the demo pair: (feats, mask0, mask1, (j, conf))."""
    cfg, state = demo_model
    pipe = EloftrPipeline(params, cfg)
    net = pipe.build_net(state)
    (c0, m0, _), (c1, m1, _) = (preprocess_image(x, pipe.settings) for x in demo_pair)
    mask0, mask1 = torch.from_numpy(m0[None]), torch.from_numpy(m1[None])
    with torch.inference_mode():
        f = net.features(torch.from_numpy(to_model_input(c0)), torch.from_numpy(to_model_input(c1)), mask0, mask1)
        conf = dual_softmax_confidence(f["transformer0"], f["transformer1"], mask0, mask1, cfg.dsmax_temperature,
                                       cfg.d_model)
        return f, m0, m1, topk_candidates(conf, mask1, cfg.border_rm, cfg.candidates_per_cell)


def test_log_sum_exp_head_keeps_the_dual_softmax_candidates(demo_model: Any, demo_pair: Any) -> None:
    cfg, _ = demo_model
    f, m0, m1, (ref_j, ref_c) = _host_candidates(demo_model, demo_pair, {"resize_max": 416})
    mask0, mask1 = torch.from_numpy(m0[None]), torch.from_numpy(m1[None])
    with torch.inference_mode():
        lse_j, lse_c = lse_topk_candidates(f["transformer0"], f["transformer1"], mask0, mask1,
                                           cfg.dsmax_temperature, cfg.d_model, cfg.border_rm, cfg.candidates_per_cell)
    for thr in (0.01, 0.1, 0.5):
        ref = select_coarse_matches({"cand_j": ref_j.numpy(), "cand_conf": ref_c.numpy()}, m0, m1, thr, cfg.border_rm)
        lse = select_coarse_matches({"cand_j": lse_j.numpy(), "cand_conf": lse_c.numpy()}, m0, m1, thr, cfg.border_rm)
        assert ref.i_ids.size > 0
        np.testing.assert_array_equal(lse.i_ids, ref.i_ids)
        np.testing.assert_array_equal(lse.j_ids, ref.j_ids)
        np.testing.assert_allclose(lse.mconf, ref.mconf, rtol=1e-4, atol=1e-6)


def test_split_tf32_head_keeps_the_dual_softmax_matches(demo_model: Any, demo_pair: Any) -> None:
    """CUDA fp16's matching head multiplies fp32 features as TF32 splits (a_hi.b_hi + a_hi.b_lo + a_lo.b_hi in
    one GEMM): the split is exact, and the head keeps the fp32 head's matches and counts. Here the products
    run in fp32 (the CPU has no TF32): this checks the algebra; the tensor cores' share is the GPU run's
    (third round, bench/results/README.md: fp16 keeps 99.7-99.8 % of fp32's matches)."""
    cfg, _ = demo_model
    f, m0, m1, _ = _host_candidates(demo_model, demo_pair, {"resize_max": 416})
    t0, t1 = f["transformer0"], f["transformer1"]
    hi, lo = _tf32_split(t0)
    assert torch.equal(hi + lo, t0)
    assert not (hi.view(torch.int32) & 0x1FFF).any()  # TF32 keeps 10 of fp32's 23 mantissa bits
    assert (lo.abs() <= t0.abs() * 2.0**-10).all()
    mask0, mask1 = torch.from_numpy(m0[None]), torch.from_numpy(m1[None])
    args = (t0, t1, mask0, mask1, cfg.dsmax_temperature, cfg.d_model, cfg.border_rm, 0.1)
    with torch.inference_mode():
        sim, lse_row, lse_col, passed, count = lse_passing_mask(*args)
        sim_s, lse_row_s, lse_col_s, passed_s, count_s = lse_passing_mask(*args, split_tf32=True)
    assert int(count) == int(passed.sum()) > 100
    assert int(count_s) == int(count) and torch.equal(passed_s, passed)
    torch.testing.assert_close(sim_s, sim, rtol=1e-5, atol=1e-5)  # fp32 rounding of values up to ~100
    torch.testing.assert_close(lse_row_s, lse_row, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.2])
def test_device_selection_equals_host_selection(threshold: float) -> None:
    rng = np.random.default_rng(int(threshold * 100))
    hc, wc, k = 12, 10, 4
    mask0 = np.zeros((hc, wc), bool)
    mask0[:9, :10] = True  # padded rows
    mask1 = np.zeros((hc, wc), bool)
    mask1[:12, :7] = True  # padded cols
    l0 = l1 = hc * wc
    cand_j = np.stack([rng.choice(l1, k, replace=False) for _ in range(l0)])[None]
    cand_conf = rng.uniform(0, 0.4, (1, l0, k)).astype(np.float32)
    cand_conf[0, ::7] = 0.0  # exact zeros: dropped at threshold 0
    cand_conf[0, 5] = 0.3  # a row whose every candidate passes (truncation is reported)
    ref = select_coarse_matches({"cand_j": cand_j, "cand_conf": cand_conf}, mask0, mask1, threshold, 2)
    i_ids, j_ids, mconf, count, truncated = select_on_device(
        torch.from_numpy(cand_j), torch.from_numpy(cand_conf), torch.from_numpy(mask0[None]),
        torch.from_numpy(mask1[None]), threshold, 2, l0 * k)
    n = int(count)
    assert n == ref.i_ids.size > 0
    np.testing.assert_array_equal(i_ids[:n].numpy(), ref.i_ids)
    np.testing.assert_array_equal(j_ids[:n].numpy(), ref.j_ids)
    np.testing.assert_array_equal(mconf[:n].numpy(), ref.mconf)
    assert int(truncated) == ref.truncated_rows
    assert (mconf[n:] == 0).all() and (i_ids[n:] == 0).all()  # padding rows


def test_a_frame_over_the_cap_says_so(demo_model: Any, demo_pair: Any, caplog: pytest.LogCaptureFixture) -> None:
    params = {"threshold": 0.1, "resize_max": 416}
    host, hb, _, _ = _pipelines(demo_model, params)
    _, _, prod, pb = _pipelines(demo_model, {**params, "engine_max_matches": 100})
    ref = run_pipeline(host, hb, *demo_pair)
    with caplog.at_level(logging.WARNING):
        out = run_pipeline(prod, pb, *demo_pair)
    assert out.extras["matches_capped"] is True and out.extras["coarse_matches_total"] == len(ref) > 100
    # the most confident 100 (those above the 101st largest confidence), in the usual row-major order
    keep = ref.confidence > np.sort(ref.confidence)[::-1][100]
    assert len(out) == int(keep.sum()) == 100
    np.testing.assert_array_equal(out.keypoints1, ref.keypoints1[keep])
    assert out.confidence.min() > np.median(ref.confidence)
    assert any("more than the cap of 100" in r.getMessage() for r in caplog.records)


def test_fast_fine_level_finds_the_original_fine_matches(demo_model: Any, demo_pair: Any) -> None:
    """The GPU's fine level (argmax in log space, one regression row per match) against the original's."""
    cfg, _ = demo_model
    f, m0, m1, (cj, cc) = _host_candidates(demo_model, demo_pair, {"resize_max": 832, "threshold": 0.1})
    with torch.inference_mode():
        cm = select_coarse_matches({"cand_j": cj.numpy(), "cand_conf": cc.numpy()}, m0, m1, 0.1, cfg.border_rm)
        i_ids, j_ids = torch.from_numpy(cm.i_ids), torch.from_numpy(cm.j_ids)
        ref0, ref1 = EloftrFine(cfg)(f["feat_f0"], f["feat_f1"], i_ids, j_ids)
        fast0, fast1 = EloftrFine(cfg, fast=True)(f["feat_f0"], f["feat_f1"], i_ids, j_ids)
    assert len(cm.i_ids) > 1000
    same_window = (ref0 == fast0).all(1) & ((ref1 - fast1).abs().max(1).values < 1.0)
    # a changed argmax is a float near-tie between two window positions: rare, never systematic
    assert same_window.float().mean() >= 0.999
    err = (ref1 - fast1).abs()[same_window]
    assert float(err.max()) < 1e-4  # the sub-pixel offsets agree to float rounding


def test_product_halves_run_only_the_rows_a_frame_needs(demo_model: Any, demo_pair: Any) -> None:
    """front() + back(rows) — what the CUDA runner replays — equals forward()'s first rows, bit for bit."""
    cfg, state = demo_model
    pipe = EloftrPipeline({"threshold": 0.1, "resize_max": 416}, cfg)
    product = pipe.torch_graphs(state, "cpu", product=True)["product"]
    rgb0, _ = stage2_rgb(demo_pair[0], pipe.settings)
    rgb1, _ = stage2_rgb(demo_pair[1], pipe.settings)
    a, b = torch.from_numpy(rgb0), torch.from_numpy(rgb1)
    with torch.inference_mode():
        whole = product(a, b)
        state_ = product.front(a, b)
        cap = product.cap_of(tuple(a.shape))
        rows = product.rows_for(state_[-1].numpy(), cap)
        part = product.back(state_, rows)
    count = int(whole[0, 0])
    buckets = product.row_buckets(cap)
    assert 64 <= count <= rows < cap and rows in buckets  # the smallest bucket that holds them
    assert buckets.index(rows) == 0 or buckets[buckets.index(rows) - 1] < count
    assert whole.shape[0] == 1 + cap and part.shape[0] == 1 + rows
    torch.testing.assert_close(part, whole[:1 + rows], rtol=0, atol=0)
    assert product.rows_for(np.array([[0.0, 0, cap]]), cap) == 64
    assert product.rows_for(np.array([[cap + 5.0, 0, cap]]), cap) == cap
    # padding stays under a quarter of the rows above 1024, at every count up to the default cap
    for n in range(1025, 20001, 97):
        assert n <= product.rows_for(np.array([[float(n), 0, 20000]]), 20000) <= max(1.25 * n, 1024)


@pytest.mark.parametrize("head", ["lse_compiled", "lse_nonzero"])
def test_the_cuda_speed_form_keeps_the_matches_when_run_on_the_cpu(demo_model: Any, demo_pair: Any, head: str) -> None:
    """The product graph as CUDA builds it (compiled feature stack, log-sum-exp head — top-K, or the mask and
    a fixed-size nonzero —, compiled log-space fine level, row buckets), run here on the CPU: the host path's
    match list, keypoints to float rounding. Their GPU timings: bench/results/README.md."""
    cfg, state = demo_model
    params = {"threshold": 0.1, "resize_max": 256}
    pipe = EloftrPipeline(params, cfg)
    speed = EloftrProduct(pipe.build_net(state), 0.1, pipe.max_matches, head, "fast_compiled", "features")
    exact = EloftrProduct(pipe.build_net(state), 0.1, pipe.max_matches)
    a, b = (torch.from_numpy(stage2_rgb(x, pipe.settings)[0]) for x in demo_pair)
    with torch.inference_mode():
        front = speed.front(a, b)
        cap = speed.cap_of(tuple(a.shape))
        fast = speed.back(front, speed.rows_for(front[-1].numpy(), cap))
        ref = exact(a, b)
    n = int(ref[0, 0])
    assert int(fast[0, 0]) == n > 100
    torch.testing.assert_close(fast[1:1 + n, :2], ref[1:1 + n, :2], rtol=0, atol=0)  # same (i, j), same order
    torch.testing.assert_close(fast[1:1 + n, 2:6], ref[1:1 + n, 2:6], rtol=0, atol=1e-3)
    torch.testing.assert_close(fast[1:1 + n, 6], ref[1:1 + n, 6], rtol=1e-4, atol=1e-6)  # confidences
    assert (fast[1 + n:, 6] == 0).all()  # padding rows


@pytest.mark.parametrize("shapes", ["16:9 both", "16:9 and 9:16", "9:16 both"])
@pytest.mark.parametrize("cap", [None, 150])
def test_the_head_on_the_valid_cells_keeps_every_match(demo_model: Any, demo_pair: Any, shapes: str,
                                                       cap: int | None) -> None:
    """`head_on_valid_cells` (CUDA's default): the log-space head's similarity matrix over the valid cells only
    (a 16:9 camera: 36x64 of 64x64 cells here) gives the whole canvas's matches — the same (i, j) canvas
    cells in the same order, the same keypoints, confidences to float rounding —, also for a frame over the
    cap (the most confident kept) and for image pairs of different orientation."""
    import cv2

    cfg, state = demo_model
    pipe = EloftrPipeline({"threshold": 0.1, "resize_max": 512}, cfg)
    size0, size1 = {"16:9 both": ((1280, 720), (1280, 720)), "16:9 and 9:16": ((1280, 720), (720, 1280)),
                    "9:16 both": ((720, 1280), (720, 1280))}[shapes]
    a, b = (torch.from_numpy(stage2_rgb(np.ascontiguousarray(cv2.resize(x, wh, interpolation=cv2.INTER_AREA)),
                                        pipe.settings)[0]) for x, wh in zip(demo_pair, (size0, size1)))
    net = pipe.build_net(state)
    max_matches = cap or pipe.max_matches
    whole, block = (EloftrProduct(net, 0.1, max_matches, "lse_nonzero", head_on_valid_cells=on) for on in (False, True))
    assert block.head_block(tuple(a.shape), 64) == ((36, 64) if size0[0] > size0[1] else (64, 36))
    with torch.inference_mode():
        ref, got = whole(a, b), block(a, b)
    n = min(int(ref[0, 0]), max_matches)
    assert int(got[0, 0]) == int(ref[0, 0]) > 300 and (cap is None or int(ref[0, 0]) > cap)
    torch.testing.assert_close(got[1:1 + n, :2], ref[1:1 + n, :2], rtol=0, atol=0)  # same canvas cells, order
    torch.testing.assert_close(got[1:1 + n, 2:6], ref[1:1 + n, 2:6], rtol=0, atol=1e-4)
    torch.testing.assert_close(got[1:1 + n, 6], ref[1:1 + n, 6], rtol=1e-5, atol=1e-7)
    assert (got[1 + n:, :2] == 0).all() and (got[1 + n:, 6] == 0).all()  # padding rows: cell 0, confidence 0


class _NoEdges(EloftrProduct):
    """A crop without its far-field edges: the convolutions' zero padding at the crop's edge."""

    def edges_for(self, side: int, extent: Any, device: torch.device) -> Any:
        return None


class _ShortReach(EloftrProduct):
    """A crop with its edges but a third of their reach (in whole coarse cells)."""

    def network_extent(self, shape0: tuple[int, ...], shape1: tuple[int, ...]) -> Any:
        extent = super().network_extent(shape0, shape1)
        if extent is None:
            return None
        rows, cols = (max(shape0[0], shape1[0]), max(shape0[1], shape1[1]))
        reach = -(-self.net.backbone.edge_reach() // 3)
        g = self.cfg.coarse_stride  # not the canvas granule, which would round it back up
        return (rows if extent[0] == rows else -(-(rows + reach) // g) * g,
                cols if extent[1] == cols else -(-(cols + reach) // g) * g)


@pytest.mark.parametrize("camera", ["16:9", "9:16"])
def test_the_network_on_the_valid_region_and_its_edge_reach_keeps_every_match(demo_model: Any, demo_pair: Any,
                                                                           camera: str) -> None:
    """`reach_crop`: a 16:9 camera's stage-2 image fills 9/16 of its square canvas; the network runs on the
    valid rows plus the backbone's edge reach, its stride-1 blocks given the far field's term at the crop's
    edge. The matches are those of the whole canvas (float rounding of the convolutions aside); the same crop
    without the edges, or with them but a third of the reach, changes them (so this test can tell)."""
    import cv2

    cfg, state = demo_model
    pipe = EloftrPipeline({"threshold": 0.1, "resize_max": 512}, cfg)
    size = (1280, 720) if camera == "16:9" else (720, 1280)
    wide = [np.ascontiguousarray(cv2.resize(x, size, interpolation=cv2.INTER_AREA)) for x in demo_pair]
    a, b = (torch.from_numpy(stage2_rgb(x, pipe.settings)[0]) for x in wide)
    net = pipe.build_net(state)
    whole, cropped, no_edges, short = (cls(net, 0.1, pipe.max_matches, reach_crop=crop)
                                       for cls, crop in ((EloftrProduct, False), (EloftrProduct, True),
                                                         (_NoEdges, True), (_ShortReach, True)))
    assert net.backbone.edge_reach() == 24  # the demo model: 53 px of receptive field
    assert whole.network_extent(tuple(a.shape), tuple(b.shape)) is None
    extent = (320, 512) if camera == "16:9" else (512, 320)  # 288 + 24 px, in 32s
    assert tuple(a.shape[:2]) == ((288, 512) if camera == "16:9" else (512, 288))
    assert cropped.network_extent(tuple(a.shape), tuple(b.shape)) == extent
    with torch.inference_mode():
        ref, got, bad, bad_short = whole(a, b), cropped(a, b), no_edges(a, b), short(a, b)
    n = int(ref[0, 0])
    assert int(got[0, 0]) == n > 100
    torch.testing.assert_close(got[1:1 + n, :2], ref[1:1 + n, :2], rtol=0, atol=0)  # same (i, j), same order
    torch.testing.assert_close(got[1:1 + n, 2:6], ref[1:1 + n, 2:6], rtol=0, atol=1e-3)
    torch.testing.assert_close(got[1:1 + n, 6], ref[1:1 + n, 6], rtol=1e-4, atol=1e-6)
    for wrong in (bad, bad_short):
        m = min(n, int(wrong[0, 0]))
        assert int(wrong[0, 0]) != n or not torch.allclose(wrong[1:1 + m, 2:7], ref[1:1 + m, 2:7], rtol=1e-4,
                                                           atol=1e-3)


def test_the_far_field_edges_give_the_released_models_features_on_the_valid_region() -> None:
    """The released model's depth (14 blocks at 1/8: 127 px of receptive field) with seeded weights: on a
    crop of the valid rows plus 63 px, with the far-field edges, the coarse features of every valid cell and
    the fine features of every pixel the fine windows read equal the whole canvas's; without the edges they
    do not, nor with a shorter reach."""
    from reference import REFERENCE_ROOT, seeded_weights_module

    index = REFERENCE_ROOT / "eloftr" / "manifest.json"
    seeded = seeded_weights_module(REFERENCE_ROOT).seeded_state_dict(index, 0)
    pipe = EloftrPipeline({"threshold": 0.1})
    net = pipe.build_net({k.removeprefix("matcher."): v for k, v in seeded.items()})
    assert net.backbone.edge_reach() == 63
    product = EloftrProduct(net, 0.1, pipe.max_matches, reach_crop=True)
    side, valid = 384, 192
    g = torch.Generator().manual_seed(3)
    rgb = [torch.randint(0, 256, (valid, side, 3), dtype=torch.uint8, generator=g) for _ in range(2)]
    # smooth content (a random image's features saturate): a blurred photo-like field
    rgb = [torch.nn.functional.avg_pool2d(x.permute(2, 0, 1)[None].float(), 9, 1, 4)[0].permute(1, 2, 0)
           .to(torch.uint8) for x in rgb]
    (image0, mask0), (image1, mask1) = product.model_input(rgb[0]), product.model_input(rgb[1])
    extent = product.network_extent(tuple(rgb[0].shape), tuple(rgb[1].shape))
    assert extent == (256, 384)  # 192 + 63 px, in 32s
    crop = product.crop_sizes(tuple(rgb[0].shape), tuple(rgb[1].shape))
    with torch.inference_mode():
        whole = product._features_channels_last(image0, image1, mask0, mask1, crop)
        cut = product._features_channels_last(image0, image1, mask0, mask1, crop, extent,
                                              product.edges_for(side, extent, image0.device))
        plain = product._features_channels_last(image0, image1, mask0, mask1, crop, extent, None)
        short = product._features_channels_last(image0, image1, mask0, mask1, crop, (224, side),
                                                product.edges_for(side, (224, side), image0.device))
    rows_c, rows_f = valid // 8, valid + 2  # valid cells; the fine windows reach one pixel past them

    def gap(feats: dict[str, torch.Tensor], key: str, rows: int) -> float:
        ref = whole[key][..., :rows, :]
        return float((feats[key][..., :rows, :] - ref).abs().max() / ref.abs().max())

    for key, rows in (("feats_c0", rows_c), ("feats_c1", rows_c), ("transformer0", rows_c),
                      ("transformer1", rows_c), ("feat_f0", rows_f), ("feat_f1", rows_f)):
        assert gap(cut, key, rows) < 1e-5, key  # float rounding (measured 5e-7 - 9e-7)
    # without the edges (measured 1.1e-4), or with them on 32 px past the valid rows (1.2e-4), it differs
    assert gap(plain, "feats_c0", rows_c) > 5e-5 and gap(short, "feats_c0", rows_c) > 5e-5


def test_a_crop_is_taken_only_where_one_side_of_the_canvas_is_left_over(demo_model: Any) -> None:
    """`reach_crop` crops rows for a wide pair and columns for a tall one; a square pair, a wide image beside a
    tall one (each fills a different side of the canvas), or a pair whose two canvases differ run on the whole
    canvas; and the far-field edges are refused for a crop of neither or both sides."""
    cfg, state = demo_model
    net = EloftrPipeline({"threshold": 0.1}, cfg).build_net(state)
    product = EloftrProduct(net, 0.1, 1000, reach_crop=True)
    wide, tall, square = (448, 832, 3), (832, 448, 3), (832, 832, 3)
    assert product.network_extent(wide, wide) == (480, 832)  # 448 + 24 px, in 32s
    assert product.network_extent(tall, tall) == (832, 480)
    assert product.network_extent(wide, (384, 832, 3)) == (480, 832)  # the larger valid region of the two
    for pair in ((square, square), (wide, tall), (wide, (448, 640, 3))):
        assert product.network_extent(*pair) is None, pair
    for rows, cols in ((832, 832), (480, 480)):
        with pytest.raises(ValueError, match="one side of the crop"):
            net.far_field_edges(832, rows, cols, torch.device("cpu"))
