"""RoMa parity with the official HF-space code on the golden fixtures (CPU, fp32).

Pairs, sizes, seeds, strides and the one weight override are read from fixtures_meta.json and the
npz files. The network runs once per pair (test/roma_util.py caches it); pairs whose official CPU
forward took > 1 min (the default-size pair0) are marked `slow`.
Tolerances: the reference set's README (inputs <= 1e-6; DINOv2 ~1e-3 relative; flows <= 1e-3 in
normalised units; certainty logits <= 1e-2); the final certainty is a sigmoid of such logits, so
<= 1e-2 / 4.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import roma_util as ru
from matchanything_ros.core.roma.sampling import to_pixels, valid_mask

pytestmark = pytest.mark.parity

INPUT_TOL = 1e-6
DINO_RTOL = 1e-3
GP_RTOL = 1e-2  # the 1600x1600 inverse amplifies fp32 round-off (README: "GP posterior is sensitive")
FLOW_TOL = 1e-3
LOGIT_TOL = 1e-2
CERT_TOL = LOGIT_TOL / 4
PAIRS = ru.pair_params()
FULL_RES_PAIRS = ru.pair_params(only_full_res=True)
# the end-to-end run repeats a forward: once, on the quickest pair with full-resolution dense arrays
QUICKEST_FULL_RES = sorted(FULL_RES_PAIRS, key=lambda p: ru.pair_meta(p.values[0]).get("forward_seconds_cpu", 0))[:1]


def _rel(mine: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(mine - ref).max() / np.abs(ref).max())


def _every(z: dict[str, np.ndarray], prefix: str) -> tuple[str, int]:
    key = next(k for k in z if k.startswith(prefix))
    return key, int(re.search(r"every(\d+)$", key).group(1))  # type: ignore[union-attr]


@pytest.mark.parametrize("name", ru.pair_params(mark_slow=False))  # preprocessing only: fast for every pair
def test_preprocessed_images(name: str) -> None:
    z = ru.npz(name)
    coarse, fine, _, _ = ru.model_inputs(name)
    for i, side in enumerate("AB"):
        for key, full in ((f"coarse_im_{side}", coarse[i].numpy()), (f"fine_im_{side}", fine[i].numpy())):
            mine = ru.subsample(name, key, full)
            assert mine.shape == z[key].shape
            err = np.abs(mine - z[key]).max()
            assert err <= INPUT_TOL, f"{key}: max |diff| {err:.3g}"


@pytest.mark.parametrize("name", PAIRS)
def test_encoder_and_gp(name: str) -> None:
    z, out = ru.npz(name), ru.forward(name)
    key, k = _every(z, "dino_feat16_ch_every")
    assert _rel(out["dino_feat16"][:, ::k], z[key]) <= DINO_RTOL
    assert _rel(out["dino_feat16"].mean(axis=(2, 3)), z["dino_feat16_channel_mean"]) <= DINO_RTOL
    key, k = _every(z, "proj16_f1_ch_every")
    assert _rel(out["proj16_f1"][:, ::k], z[key]) <= DINO_RTOL
    key, k = _every(z, "gp_posterior16_ch_every")
    assert _rel(out["gp_posterior16"][:, ::k], z[key]) <= GP_RTOL
    assert _rel(out["gp_posterior16"].mean(axis=(2, 3)), z["gp_posterior16_channel_mean"]) <= GP_RTOL
    # the 64x64 classification grid picks the same cell everywhere
    cls = out["pass1_s16_gm_cls"]
    np.testing.assert_array_equal(cls.argmax(axis=1), z["pass1_s16_gm_cls_argmax"])
    assert np.abs(cls.max(axis=1) - z["pass1_s16_gm_cls_max_logit"]).max() <= LOGIT_TOL
    assert np.abs(out["pass1_s16_gm_certainty"] - z["pass1_s16_gm_certainty"]).max() <= LOGIT_TOL


@pytest.mark.parametrize("name", PAIRS)
def test_flows_and_certainty_logits_every_scale(name: str) -> None:
    z, out = ru.npz(name), ru.forward(name)
    keys = sorted(k for k in z if re.fullmatch(r"pass\d_s\d+_(flow|certainty)", k))
    assert keys, "fixture has no per-scale arrays"
    for key in keys:
        mine = ru.subsample(name, key, out[key])
        assert mine.shape == z[key].shape, key
        err = np.abs(mine - z[key]).max()
        assert err <= (FLOW_TOL if key.endswith("flow") else LOGIT_TOL), f"{key}: max |diff| {err:.3g}"


@pytest.mark.parametrize("name", PAIRS)
def test_final_warp_and_certainty(name: str) -> None:
    z, out = ru.npz(name), ru.forward(name)
    warp, cert = out["warp"], out["certainty"]
    w = warp.shape[1] // 2
    a2b = ru.subsample(name, "final_warp_A_to_B", warp[:, :w, 2:].transpose(2, 0, 1))
    b2a = ru.subsample(name, "final_warp_B_to_A", warp[:, w:, :2].transpose(2, 0, 1))
    assert np.abs(a2b - z["final_warp_A_to_B"]).max() <= FLOW_TOL
    assert np.abs(b2a - z["final_warp_B_to_A"]).max() <= FLOW_TOL
    mine_cert = ru.subsample(name, "final_certainty", cert)
    assert np.abs(mine_cert - z["final_certainty"]).max() <= CERT_TOL
    # the grid halves are the exact pixel-centre grid, the out-of-range rule holds
    assert np.all(np.abs(warp) <= 1)


@pytest.mark.parametrize("name", PAIRS)
def test_replayed_indices_give_the_official_matches(name: str) -> None:
    """The stored multinomial draws replayed on OUR dense output give the official sparse matches."""
    z, out = ru.npz(name), ru.forward(name)
    warp, cert = out["warp"].reshape(-1, 4), out["certainty"].reshape(-1).copy()
    cert[cert > 0.05] = 1
    m = warp[z["sample_stage1_idx"]][z["sample_stage2_idx"]]
    c = cert[z["sample_stage1_idx"]][z["sample_stage2_idx"]]
    h0, w0 = z["img0_uint8"].shape[:2]
    h1, w1 = z["img1_uint8"].shape[:2]
    k0, k1 = to_pixels(m, (w0, h0), (w1, h1))
    keep = valid_mask(k0, k1, c, (w0, h0), (w1, h1))
    assert keep.sum() == len(z["mkpts0_f"])
    px_tol = FLOW_TOL * max(w0, h0, w1, h1) / 2
    assert np.abs(k0[keep] - z["mkpts0_f"]).max() <= px_tol
    assert np.abs(k1[keep] - z["mkpts1_f"]).max() <= px_tol
    # mconf: 1.0 exactly where thresholded, else the raw certainty
    np.testing.assert_array_equal(c[keep] == 1.0, z["mconf"] == 1.0)
    assert np.abs(c[keep] - z["mconf"]).max() <= CERT_TOL


@pytest.mark.parametrize("name", QUICKEST_FULL_RES)
def test_pipeline_end_to_end_matches_official(name: str) -> None:
    """RomaPipeline + TorchBackend from the image files' arrays to original-pixel matches, seeded as the fixture.

    Our dense output differs from the official one by ~1e-7, which can move a few near-tied draws of the
    sampler; the rest of the matches must be the official ones."""
    from matchanything_ros.core.backends.torch_backend import TorchBackend
    from matchanything_ros.core.roma.model import RomaDenseGraph
    from matchanything_ros.core.roma.pipeline import RomaPipeline

    z = ru.npz(name)
    pipe = RomaPipeline({"coarse_res": int(z["coarse_res"][0]), "upsample_res": int(z["upsample_res"][0]),
                         "sample_seed": int(z["sample_seed"]), "roma_webui_resize": False,
                         "num_samples": len(z["sample_stage2_idx"])})
    model = ru.net()
    backend = TorchBackend({"dense": RomaDenseGraph(model)}, "cpu", "fp32")
    inputs, meta = pipe.preprocess(z["img0_uint8"], z["img1_uint8"])
    with ru.weight_override(model, name):
        outputs = pipe.infer(backend, inputs, meta)
    result = pipe.postprocess(outputs, meta)
    assert result.image0_size == (z["img0_uint8"].shape[1], z["img0_uint8"].shape[0])
    assert abs(len(result) - len(z["mkpts0_f"])) <= 0.01 * len(z["mkpts0_f"])
    official = np.concatenate([z["mkpts0_f"], z["mkpts1_f"]], axis=1)
    mine = np.concatenate([result.keypoints0, result.keypoints1], axis=1)
    d = torch.cdist(torch.from_numpy(official).double(), torch.from_numpy(mine).double(),
                    compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values.numpy()
    found = float((d <= 1e-3).mean())
    assert found >= 0.98, f"only {found:.3%} of the official matches reproduced"
