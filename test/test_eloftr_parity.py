"""ELoFTR parity with the official HF-space code, on the golden fixtures of the reference set.

Fixture pairs, thresholds and the weights seed are read from `index.json` under
$MATCHANYTHING_REFERENCE_DIR/eloftr (default: test/fixtures/reference), so the same tests run
on any fixture set of that layout. The network runs ONCE per pair (module cache); every check
below reuses that run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from typing import Any

import numpy as np
import pytest
import torch

from matchanything_ros.core.eloftr.config import EloftrConfig
from matchanything_ros.core.eloftr.model import EloftrNet, RepVGGBackbone, fuse_repvgg
from matchanything_ros.core.eloftr.graphs import (EloftrCoarse, EloftrFine, dual_softmax_confidence, fine_similarities,
                                                  gather_windows, topk_candidates)
from matchanything_ros.core.eloftr.pipeline import EloftrPipeline
from matchanything_ros.core.eloftr.postprocess import border_keep, select_coarse_matches
import parity_rules as pr
from reference import REFERENCE_ROOT, seeded_weights_module  # noqa: E402

pytestmark = pytest.mark.parity

REF_ROOT = REFERENCE_ROOT
REF = REF_ROOT / "eloftr"
if not (REF / "index.json").is_file():
    # The suite needs the reference set (CI has it beside the clone): a missing one is a failure, not a skip.
    raise FileNotFoundError(f"ELoFTR reference fixtures not found under {REF} (set MATCHANYTHING_REFERENCE_DIR)")
INDEX = json.loads((REF / "index.json").read_text())
PAIRS = sorted(INDEX["pairs"])
THR_MAIN = float(INDEX["threshold"])
THR2 = float(INDEX["threshold2"])  # the UI threshold: the top-K graph's exact range
FORCE_WH = tuple(INDEX["force_resize_wh"]) if INDEX.get("force_resize_wh") else None
FP32_RTOL = 1e-5  # features, relative to the tensor's largest magnitude (measured spread <= 3e-6: docs/parity.md)


def seeded_weights() -> Any:
    return seeded_weights_module(REF_ROOT)


@pytest.fixture(scope="module")
def prefixed_weights() -> dict[str, torch.Tensor]:
    return seeded_weights().seeded_state_dict(REF / "manifest.json", INDEX["seed"])


@pytest.fixture(scope="module")
def net(prefixed_weights: dict[str, torch.Tensor]) -> EloftrNet:
    pipe = EloftrPipeline({"threshold": THR_MAIN})
    return pipe.build_net({k.removeprefix("matcher."): v for k, v in prefixed_weights.items()})


def pipe_params(threshold: float) -> dict[str, Any]:
    params: dict[str, Any] = {"threshold": threshold, "preset": "hf_space"}
    if FORCE_WH:
        params.update(force_resize_width=FORCE_WH[0], force_resize_height=FORCE_WH[1])
    return params


def pipeline_for(threshold: float) -> EloftrPipeline:
    return EloftrPipeline(pipe_params(threshold))


_RUNS: dict[str, dict[str, Any]] = {}


def forward_pair(net: EloftrNet, pair: str) -> dict[str, Any]:
    """Preprocess a fixture pair's input images and run the network and the dual softmax once."""
    ref = dict(np.load(REF / INDEX["pairs"][pair]["file"]))
    pipe = pipeline_for(THR_MAIN)
    inputs, meta = pipe.preprocess(ref["input_image0_rgb_u8"], ref["input_image1_rgb_u8"])
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.inference_mode():
        feats = net.features(t["image0"], t["image1"], t["mask0"], t["mask1"])
        conf = dual_softmax_confidence(feats["transformer0"], feats["transformer1"], t["mask0"], t["mask1"],
                                       net.cfg.dsmax_temperature)
    return {"pair": pair, "ref": ref, "pipe": pipe, "inputs": t, "meta": meta, "feats": feats, "conf": conf}


@pytest.fixture
def run(request: pytest.FixtureRequest, net: EloftrNet) -> dict[str, Any]:
    """forward_pair, cached per pair for the module."""
    if request.param not in _RUNS:
        _RUNS[request.param] = forward_pair(net, request.param)
    return _RUNS[request.param]


parametrize_pairs = pytest.mark.parametrize("run", PAIRS, indirect=True)


def assert_close(actual: torch.Tensor | np.ndarray, expected: np.ndarray, name: str, rtol: float = FP32_RTOL) -> None:
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{name}: shape {a.shape} != {e.shape}"
    err = float(np.abs(a - e).max()) if a.size else 0.0
    scale = max(float(np.abs(e).max()) if e.size else 0.0, 1e-12)
    assert err <= rtol * scale, f"{name}: max abs error {err:.3g} > {rtol:g} x {scale:.3g}"


# --- weights and checkpoint layout ----------------------------------------------------------------

def test_seeded_weights_fingerprint(prefixed_weights: dict[str, torch.Tensor]) -> None:
    expected = INDEX["weights_fingerprint_sha256"]
    h = hashlib.sha256()
    for key in sorted(prefixed_weights):
        h.update(key.encode())
        h.update(prefixed_weights[key].contiguous().numpy().tobytes())
    assert h.hexdigest() == expected, "seeded_weights.py or the manifest drifted from the fixtures"


def test_model_layout_is_the_released_checkpoint() -> None:
    manifest = json.loads((REF / "manifest.json").read_text())
    prefix = manifest.get("key_prefix", "")
    expected = {k.removeprefix(prefix): tuple(v["shape"]) for k, v in manifest["tensors"].items()}
    model = {k: tuple(v.shape) for k, v in EloftrNet(EloftrConfig()).state_dict().items()}
    assert model == expected
    n_params = sum(p.numel() for p in EloftrNet(EloftrConfig()).parameters())
    assert n_params == manifest["total_parameters"]


# --- preprocessing (bit-exact) ---------------------------------------------------------------------

@parametrize_pairs
def test_preprocessing_bit_exact(run: dict[str, Any]) -> None:
    ref, meta = run["ref"], run["meta"]
    np.testing.assert_array_equal(meta.canvas0_u8, ref["model_input0_gray_u8"])
    np.testing.assert_array_equal(meta.canvas1_u8, ref["model_input1_gray_u8"])
    np.testing.assert_array_equal(meta.mask0, ref["model_mask0_coarse"])
    np.testing.assert_array_equal(meta.mask1, ref["model_mask1_coarse"])
    np.testing.assert_array_equal(run["inputs"]["image0"][0, 0].numpy(),
                                  torch.from_numpy(ref["model_input0_gray_u8"]).float().numpy() / 255.0)
    for k, m in enumerate((meta.image0, meta.image1)):
        np.testing.assert_array_equal(m.scale_orig_over_model, ref[f"scale{k}_orig_over_model"])


@parametrize_pairs
def test_stage1_intermediates_bit_exact(run: dict[str, Any]) -> None:
    from matchanything_ros.core.eloftr.preprocess import stage1

    ref, pipe = run["ref"], run["pipe"]
    for k in (0, 1):
        chw = stage1(ref[f"input_image{k}_rgb_u8"], pipe.settings)
        crop = ref[f"stage1_resized_rgb_f32_crop{k}"]
        np.testing.assert_array_equal(chw[:, : crop.shape[1], : crop.shape[2]], crop)
        u8 = (chw * np.float32(255.0)).transpose(1, 2, 0).astype(np.uint8)
        assert list(u8.shape) == list(ref[f"stage1_rgb_u8_after_trunc{k}_shape"])
        assert hashlib.sha256(np.ascontiguousarray(u8).tobytes()).digest() == ref[
            f"stage1_rgb_u8_after_trunc{k}_sha256"].tobytes()


# --- network intermediates (fp32 tolerance) --------------------------------------------------------

@parametrize_pairs
def test_backbone_and_transformer(run: dict[str, Any]) -> None:
    ref, f = run["ref"], run["feats"]
    c = torch.cat([f["feats_c0"], f["feats_c1"]])
    assert_close(c[:, :8], ref["backbone_feats_c_ch0to8"], "backbone feats_c")
    assert_close(c.mean((2, 3)), ref["backbone_feats_c_chmean"], "backbone feats_c mean")
    x2 = torch.cat([f["feats_x2_0"], f["feats_x2_1"]])
    x1 = torch.cat([f["feats_x1_0"], f["feats_x1_1"]])
    assert_close(x2.mean((2, 3)), ref["backbone_feats_x2_chmean"], "feats_x2 mean")
    assert_close(x1.mean((2, 3)), ref["backbone_feats_x1_chmean"], "feats_x1 mean")
    cx2, cx1 = ref["backbone_feats_x2_crop"], ref["backbone_feats_x1_crop"]
    assert_close(x2[:, : cx2.shape[1], : cx2.shape[2], : cx2.shape[3]], cx2, "feats_x2 crop")
    assert_close(x1[:, : cx1.shape[1], : cx1.shape[2], : cx1.shape[3]], cx1, "feats_x1 crop")
    for k in (0, 1):
        t = f[f"transformer{k}"]
        assert_close(t[:, :8], ref[f"transformer_out{k}_ch0to8"], f"transformer {k}")
        assert_close(t.mean((2, 3)), ref[f"transformer_out{k}_chmean"], f"transformer {k} mean")
        # padded coarse positions of the transformer output are exactly zero, as the original's
        valid = torch.from_numpy(ref[f"model_mask{k}_coarse"])
        assert torch.count_nonzero(t[0][:, ~valid]) == 0


@parametrize_pairs
def test_dual_softmax_confidence(run: dict[str, Any]) -> None:
    ref, conf = run["ref"], run["conf"][0]
    hw = ref["hw_c"]
    assert tuple(run["feats"]["transformer0"].shape[-2:]) == (hw[0], hw[1])
    pr.assert_conf_close(conf.max(1).values, ref["conf_row_max"], "conf row max")
    pr.assert_conf_close(conf.max(0).values, ref["conf_col_max"], "conf col max")
    pr.assert_conf_close(conf[torch.from_numpy(ref["conf_rows_idx"])], ref["conf_rows"], "conf rows")
    informative = ref["conf_row_max"] > 0  # rows of padded cells are all-zero: argmax is arbitrary there
    rows = conf.numpy()[informative]
    excused = pr.compare_argmax(rows.argmax(1), ref["conf_row_argmax"][informative], pr.relative_margin(rows),
                                pr.CONF_ARGMAX_TIE_RTOL, f"{run['pair']} conf row argmax")
    pr.report(excused)


# --- matches ---------------------------------------------------------------------------------------

def _fine_margins(feats: dict[str, torch.Tensor], i_ids: torch.Tensor, j_ids: torch.Tensor,
                  pipe: EloftrPipeline) -> np.ndarray:
    """Each match's fine-level argmax margin (parity_rules.relative_margin of its dual-softmax scores)."""
    cfg = pipe.model_config
    with torch.inference_mode():
        w0 = gather_windows(feats["feat_f0"], i_ids, cfg.fine_window_size, 0, cfg.coarse_stride)
        w1 = gather_windows(feats["feat_f1"], j_ids, cfg.fine_window_size, 1, cfg.coarse_stride)
        p, _ = fine_similarities(w0, w1, cfg)
    return pr.relative_margin(p.reshape(p.shape[0], -1).numpy())


def fine_margins_of_pair(pair: str) -> np.ndarray:
    """The fine argmax margin of every match of `pair` at the main threshold (for tests that only see final
    outputs, e.g. the CLI's): one forward with the seeded weights, outside the module cache."""
    state = seeded_weights().seeded_state_dict(REF / "manifest.json", INDEX["seed"])
    net = pipeline_for(THR_MAIN).build_net({k.removeprefix("matcher."): v for k, v in state.items()})
    run = forward_pair(net, pair)
    pipe, meta = run["pipe"], run["meta"]
    cm = select_coarse_matches({"conf": run["conf"].numpy()}, meta.mask0, meta.mask1, pipe.threshold,
                               pipe.model_config.border_rm)
    return _fine_margins(run["feats"], torch.from_numpy(cm.i_ids), torch.from_numpy(cm.j_ids), pipe)


def _check_final(result: Any, ref: dict[str, np.ndarray], ri: np.ndarray, compared: np.ndarray, what: str) -> None:
    """Final keypoints/confidences of the common matches (ri: their rows in the fixture; compared: the
    matches whose keypoints were not excused as fine-argmax near-ties)."""
    np.testing.assert_allclose(result.keypoints0[compared], ref["keypoints0"][ri][compared], rtol=0,
                               atol=pr.KEYPOINT_ATOL_PX, err_msg=what)
    np.testing.assert_allclose(result.keypoints1[compared], ref["keypoints1"][ri][compared], rtol=0,
                               atol=pr.KEYPOINT_ATOL_PX, err_msg=what)
    pr.assert_conf_close(result.confidence, ref["confidence"][ri], f"{what} confidence")


@parametrize_pairs
def test_same_matches_as_official_at_main_threshold(run: dict[str, Any]) -> None:
    ref, pipe, meta, f = run["ref"], run["pipe"], run["meta"], run["feats"]
    conf = run["conf"].numpy()  # the exact full matrix, whatever coarse mode the threshold would pick
    cm = select_coarse_matches({"conf": conf}, meta.mask0, meta.mask1, pipe.threshold, pipe.model_config.border_rm)
    # the SAME list, in the same order (row-major i then j), except matches at the threshold
    ri, gi, coarse_excused = pr.compare_match_lists(
        ref["coarse_i_ids"], ref["coarse_j_ids"], cm.i_ids, cm.j_ids,
        lambda i, j: bool(pr.is_threshold_tie(conf[0, i, j], pipe.threshold)), f"{run['pair']} coarse list")
    pr.assert_conf_close(cm.mconf[gi], ref["coarse_mconf"][ri], "coarse mconf")
    with torch.inference_mode():
        # the fine windows of the fixture's first matches (the ones it stored)
        n = ref["fine_feat0_unfold_first"].shape[0]
        i_first, j_first = torch.from_numpy(ref["coarse_i_ids"][:n]), torch.from_numpy(ref["coarse_j_ids"][:n])
        stride = pipe.model_config.coarse_stride
        w0 = gather_windows(f["feat_f0"], i_first, pipe.model_config.fine_window_size, 0, stride)
        w1 = gather_windows(f["feat_f1"], j_first, pipe.model_config.fine_window_size, 1, stride)
        assert_close(w0, ref["fine_feat0_unfold_first"], "fine windows 0")
        assert_close(w1, ref["fine_feat1_unfold_first"], "fine windows 1")
        p, sim_ff = fine_similarities(w0, w1, pipe.model_config)
        assert_close(p, ref["fine_dualsoftmax_inner_first"], "fine dual softmax", rtol=1e-4)
        assert_close(sim_ff, ref["fine_sim_ff_first"], "fine regression similarity")
        i_ids, j_ids = torch.from_numpy(cm.i_ids), torch.from_numpy(cm.j_ids)
        k0, k1 = EloftrFine(pipe.model_config)(f["feat_f0"], f["feat_f1"], i_ids, j_ids)
    margins = _fine_margins(f, i_ids, j_ids, pipe)[gi]
    compared, fine_excused = pr.compare_keypoints(k0.numpy()[gi], ref["model_mkpts0_f"][ri], k1.numpy()[gi],
                                                  ref["model_mkpts1_f"][ri], margins, f"{run['pair']} fine keypoints")
    result = pipe.postprocess({"mkpts0_c": k0.numpy()[gi], "mkpts1_c": k1.numpy()[gi], "mconf": cm.mconf[gi]}, meta)
    _check_final(result, ref, ri, compared, f"{run['pair']} final")
    assert result.image0_size == tuple(ref["input_image0_rgb_u8"].shape[1::-1])
    pr.report(coarse_excused, fine_excused)


@parametrize_pairs
def test_same_matches_at_second_threshold_with_topk_graph(run: dict[str, Any]) -> None:
    """The fixed-shape top-K coarse graph (what ONNX/TensorRT run) at the UI threshold."""
    ref2 = dict(np.load(REF / INDEX["pairs_threshold2"][run["pair"]]["file"]))
    pipe = pipeline_for(THR2)
    if not pipe.topk_exact:  # a threshold below 1/(K+1): enough candidates per cell that it is exact there
        k = math.ceil(1.0 / THR2)
        pipe = EloftrPipeline(pipe_params(THR2), dataclasses.replace(pipe.model_config, candidates_per_cell=k))
    assert pipe.topk_exact and not pipe.coarse_full
    meta, t = run["meta"], run["inputs"]
    coarse = EloftrCoarse(EloftrNet(pipe.model_config), exact_full_conf=False)  # head only: no weights used
    with torch.inference_mode():
        outs = coarse.head(run["feats"], t["mask0"], t["mask1"])
        named = {k: v for k, v in zip(coarse.output_names, outs)}
        cm = select_coarse_matches({k: v.numpy() for k, v in named.items() if k.startswith("cand")},
                                   meta.mask0, meta.mask1, THR2, pipe.model_config.border_rm)
        full = select_coarse_matches({"conf": run["conf"].numpy()}, meta.mask0, meta.mask1, THR2,
                                     pipe.model_config.border_rm)
        np.testing.assert_array_equal(cm.i_ids, full.i_ids)
        np.testing.assert_array_equal(cm.j_ids, full.j_ids)
        assert cm.truncated_rows == 0
        if cm.i_ids.size:
            i_ids, j_ids = torch.from_numpy(cm.i_ids), torch.from_numpy(cm.j_ids)
            k0, k1 = EloftrFine(pipe.model_config)(named["feat_f0"], named["feat_f1"], i_ids, j_ids)
            kp0, kp1 = k0.numpy(), k1.numpy()
            margins = _fine_margins(named, i_ids, j_ids, pipe)
        else:
            kp0 = kp1 = np.zeros((0, 2), np.float32)
            margins = np.zeros(0)
    result = pipe.postprocess({"mkpts0_c": kp0, "mkpts1_c": kp1, "mconf": cm.mconf}, meta)
    # the fixture holds final outputs only: the same number of matches, compared row by row
    assert len(result) == len(ref2["confidence"])
    compared, excused = pr.compare_keypoints(result.keypoints0, ref2["keypoints0"], result.keypoints1,
                                             ref2["keypoints1"], margins, f"{run['pair']} final keypoints (thr2)")
    pr.assert_conf_close(result.confidence, ref2["confidence"], "confidence (thr2)")
    pr.report(excused)


@parametrize_pairs
def test_topk_truncation_warns(run: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """Below 1/(K+1) the top-K graph can drop matches: the pipeline must say so. K = 1, and a threshold below
    the best candidate of some kept row (half of the largest such), so that a row has its every candidate passing."""
    meta, conf = run["meta"], run["conf"]
    with torch.inference_mode():
        cand_j, cand_conf = topk_candidates(conf, run["inputs"]["mask1"], 2, 1)
    keep0 = border_keep(meta.mask0, 2)
    threshold = min(THR_MAIN, 0.5 * float(cand_conf[0, torch.from_numpy(keep0), 0].max()))
    full = select_coarse_matches({"conf": conf.numpy()}, meta.mask0, meta.mask1, threshold, 2)
    with caplog.at_level(logging.WARNING):
        cm = select_coarse_matches({"cand_j": cand_j.numpy(), "cand_conf": cand_conf.numpy()},
                                   meta.mask0, meta.mask1, threshold, 2)
    assert cm.truncated_rows > 0 and "truncated" in caplog.text
    # the top-1 selection is exactly the full selection's best cell per row
    assert set(zip(cm.i_ids.tolist(), cm.j_ids.tolist())) <= set(zip(full.i_ids.tolist(), full.j_ids.tolist()))


# --- fused RepVGG (speed form) -----------------------------------------------------------------------

@pytest.mark.parametrize("run", PAIRS[:1], indirect=True)
def test_fused_repvgg_matches_multibranch(run: dict[str, Any], net: EloftrNet) -> None:
    """The re-parameterised backbone equals the released multi-branch one (float rounding only)."""
    fused = RepVGGBackbone(net.cfg)
    fused.load_state_dict(net.backbone.state_dict())
    fuse_repvgg(fused.eval())
    assert not any(k.endswith("rbr_1x1.conv.weight") for k in fused.state_dict())
    image = run["inputs"]["image0"][:, :, :128, :128]  # a crop keeps this quick
    with torch.inference_mode():
        ref = net.backbone(image)
        out = fused(image)
    for a, b, name in zip(out, ref, ("feats_c", "feats_x2", "feats_x1")):
        assert_close(a, b.numpy(), f"fused {name}", rtol=1e-4)


def test_speed_form_matches_exact_form(net: EloftrNet, prefixed_weights: dict[str, torch.Tensor]) -> None:
    """Fused RepVGG + SDPA + channels-last (the fp16 path's structure) computes the same network in fp32."""
    fast = EloftrPipeline({}).build_net({k.removeprefix("matcher."): v for k, v in prefixed_weights.items()})
    fast.to_speed_form()
    gen = torch.Generator().manual_seed(0)
    image0, image1 = torch.rand(1, 1, 128, 128, generator=gen), torch.rand(1, 1, 128, 128, generator=gen)
    mask = torch.zeros(1, 16, 16, dtype=torch.bool)
    mask[:, :12] = True  # a padded canvas: the transformer crop is exercised too
    with torch.inference_mode():
        ref = net.features(image0, image1, mask, mask)
        out = fast.features(image0, image1, mask, mask)
    for key in ("transformer0", "transformer1", "feat_f0", "feat_f1"):
        assert_close(out[key], ref[key].numpy(), f"speed form {key}", rtol=1e-4)


def test_static_crop_for_cuda_graphs_equals_eager(net: EloftrNet) -> None:
    """On CUDA the torch backend captures the coarse graph with the transformer's crop fixed from the
    host masks (a capture cannot read the device); that crop and the outputs must equal the eager ones,
    and a different valid region must map to a different capture.

    The input is built to need a crop: the first pair's images forced to a stage-1 size twice as wide as high,
    so that the lower half of the square canvas is padding rows whatever size the fixture set forces."""
    ref = dict(np.load(REF / INDEX["pairs"][PAIRS[0]]["file"]))
    pipe = EloftrPipeline({"threshold": THR_MAIN, "force_resize_width": 320, "force_resize_height": 160})
    host, _ = pipe.preprocess(ref["input_image0_rgb_u8"], ref["input_image1_rgb_u8"])
    t = {k: torch.from_numpy(v) for k, v in host.items()}
    coarse = EloftrCoarse(net)
    transformer = net.loftr_coarse
    with torch.inference_mode():
        eager = coarse(t["image0"], t["image1"], t["mask0"], t["mask1"])
        with coarse.static_crop(host):
            fixed = transformer.fixed_valid
            static = coarse(t["image0"], t["image1"], t["mask0"], t["mask1"])
    assert transformer.fixed_valid is None, "the fixed crop must not outlive the capture"
    expected = (transformer.valid_size(t["mask0"], transformer.agg_size0),
                transformer.valid_size(t["mask1"], transformer.agg_size1))
    assert fixed == expected
    assert fixed[0][0] < t["mask0"].shape[1]  # the built canvas has padding rows: the crop is shorter than it
    for name, a, b in zip(coarse.output_names, eager, static):
        assert torch.equal(a, b), name
    other = dict(host)
    shrunk = other["mask0"].copy()
    shrunk[:, :, -8:] = False  # the last 8 columns (rows at the bottom are padding already)
    other["mask0"] = shrunk
    assert coarse.capture_key(other) != coarse.capture_key(host)
