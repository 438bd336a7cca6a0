"""RoMa dense -> sparse: the original balanced sampler (seeded replay of the fixtures' draws), the
deterministic top-k mode, pixel conversion, the web-UI stage, and clear errors on bad input/weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import parity_rules as pr
import roma_util as ru
from matchanything_ros.core.errors import CheckpointError, ConfigError, InputImageError
from matchanything_ros.core.roma.config import SAMPLE_THRESH, RomaConfig
from matchanything_ros.core.roma.pipeline import RomaPipeline
from matchanything_ros.core.roma.preprocess import model_to_original, prepare_image
from matchanything_ros.core.roma.sampling import (balanced_sample, device_draws, draw_counts, race_noise,
                                                  seeded_generator, sparse_from_draws, to_pixels, topk_sample,
                                                  valid_mask)

FULL_RES_PAIRS = ru.pair_params(only_full_res=True)


def _sizes(z: dict[str, np.ndarray]) -> tuple[tuple[int, int], tuple[int, int]]:
    return (z["img0_uint8"].shape[1], z["img0_uint8"].shape[0]), (z["img1_uint8"].shape[1], z["img1_uint8"].shape[0])


@pytest.mark.parity
@pytest.mark.parametrize("name", FULL_RES_PAIRS)
def test_seeded_sampler_reproduces_the_official_draws(name: str) -> None:
    """On the official dense output: torch.manual_seed(s) before sampling (the original's only RNG use) and
    our sample_seed=s generator give the same draws; those are the stored ones except near-ties of the
    multinomial race (parity_rules: the KDE density rounds differently on other CPUs, and equal keys are
    ordered by the CPU's topk); replaying the stored draws gives the official sparse matches bit for bit."""
    z = ru.npz(name)
    warp, cert = ru.stored_dense(name)
    w, c = torch.from_numpy(warp), torch.from_numpy(cert)
    n = len(z["sample_stage2_idx"])
    torch.manual_seed(int(z["sample_seed"]))
    global_rng = balanced_sample(w, c, n)
    own_rng = balanced_sample(w, c, n, seeded_generator(int(z["sample_seed"])))
    for key in ("stage1_index", "stage2_index", "density", "matches", "confidence"):
        np.testing.assert_array_equal(getattr(own_rng, key), getattr(global_rng, key), err_msg=key)
    assert own_rng.stage1_index is not None and own_rng.stage2_index is not None and own_rng.density is not None
    # the KDE density of the same stage-1 matches: rounding only
    assert np.abs(own_rng.density / z["kde_density"] - 1).max() <= pr.KDE_RTOL
    keys1, keys2 = pr.balanced_draw_keys(cert, own_rng.density, int(z["sample_seed"]))
    np.testing.assert_array_equal(pr.top_draws(keys1, len(own_rng.stage1_index)), own_rng.stage1_index)
    np.testing.assert_array_equal(pr.top_draws(keys2, n), own_rng.stage2_index)
    pr.report(*pr.compare_draws(z["sample_stage1_idx"], own_rng.stage1_index, keys1, f"{name} stage-1 draws"),
              *pr.compare_draws(z["sample_stage2_idx"], own_rng.stage2_index, keys2, f"{name} stage-2 draws"))
    # the stored draws replayed: the official matches (within 1e-3 px: the grid half comes from torch.linspace,
    # which rounds in the last ulp by CPU path) and confidences (bit for bit)
    c_thr = cert.reshape(-1).copy()
    c_thr[c_thr > SAMPLE_THRESH] = 1
    cells = z["sample_stage1_idx"][z["sample_stage2_idx"]]
    s0, s1 = _sizes(z)
    k0, k1 = to_pixels(warp.reshape(-1, 4)[cells], s0, s1)
    keep = valid_mask(k0, k1, c_thr[cells], s0, s1)
    np.testing.assert_allclose(k0[keep], z["mkpts0_f"], rtol=0, atol=pr.KEYPOINT_ATOL_PX)
    np.testing.assert_allclose(k1[keep], z["mkpts1_f"], rtol=0, atol=pr.KEYPOINT_ATOL_PX)
    np.testing.assert_array_equal(c_thr[cells][keep], z["mconf"])


@pytest.mark.parity
@pytest.mark.parametrize("name", FULL_RES_PAIRS)
def test_topk_mode_matches_fixture(name: str) -> None:
    z = ru.npz(name)
    warp, cert = ru.stored_dense(name)
    s = topk_sample(warp, cert, len(z["topk_flat_idx"]))
    np.testing.assert_array_equal(s.flat_index, z["topk_flat_idx"])
    np.testing.assert_array_equal(s.confidence, z["topk_cert"])
    k0, k1 = to_pixels(s.matches, *_sizes(z))
    # within 1e-3 px, not bit for bit: the warp's grid half comes from torch.linspace (last-ulp CPU rounding)
    np.testing.assert_allclose(k0, z["topk_kpts0"], rtol=0, atol=pr.KEYPOINT_ATOL_PX)
    np.testing.assert_allclose(k1, z["topk_kpts1"], rtol=0, atol=pr.KEYPOINT_ATOL_PX)
    # deterministic: no RNG involved
    again = topk_sample(warp, cert, len(z["topk_flat_idx"]))
    np.testing.assert_array_equal(again.flat_index, s.flat_index)


@pytest.mark.parametrize("name", FULL_RES_PAIRS)
def test_the_capturable_device_half_draws_what_the_sampler_draws(name: str) -> None:
    """The CUDA form of the sampler (`device_draws` on noise made beforehand: fixed shapes, no host wait, so
    one CUDA graph replays it) is the same sampler: on a fixture's dense output and the noise of
    `sample_seed`'s generator it gives the draws, density and matches of `balanced_sample` bit for bit."""
    z = ru.npz(name)
    warp, cert = ru.stored_dense(name)
    w, c = torch.from_numpy(warp).reshape(-1, 4), torch.from_numpy(cert)
    n = len(z["sample_stage2_idx"])
    seed = int(z["sample_seed"])
    expected = balanced_sample(w, c, n, seeded_generator(seed))
    n1, n2 = draw_counts(w.shape[0], n)
    q1, q2 = race_noise(w.shape[0], n1, seeded_generator(seed), w.device)
    got = sparse_from_draws([t.numpy() for t in device_draws(w, c, n2, q1, q2)])
    for key in ("stage1_index", "stage2_index", "density", "matches", "confidence"):
        np.testing.assert_array_equal(getattr(got, key), getattr(expected, key), err_msg=key)
    # other noise, other draws: the noise is what the draws follow
    other = device_draws(w, c, n2, *race_noise(w.shape[0], n1, seeded_generator(seed + 1), w.device))
    assert not np.array_equal(other[2].numpy(), got.stage1_index)


def test_balanced_sampler_unseeded_differs_between_runs_and_all_zero_certainty_keeps_one() -> None:
    g = torch.Generator().manual_seed(123)
    warp = torch.rand(40, 80, 4, generator=g) * 2 - 1
    cert = torch.rand(40, 80, generator=g)
    a = balanced_sample(warp, cert, 50, seeded_generator(1))
    b = balanced_sample(warp, cert, 50, seeded_generator(2))
    assert not np.array_equal(a.stage1_index, b.stage1_index)
    # the original: with no certainty anywhere the first cell gets weight 1, so it is the only match left
    # after the output mask (confidence > 0)
    none = balanced_sample(warp, torch.zeros(40, 80), 50, seeded_generator(1))
    assert none.stage1_index is not None and 0 in none.stage1_index
    kept = none.matches[none.confidence > 0]
    assert len(kept) <= 1
    np.testing.assert_array_equal(kept, warp.reshape(-1, 4)[: len(kept)].numpy())


def test_webui_stage_and_pixel_conversion_to_original() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (960, 1280, 3), dtype=np.uint8)  # 1280x960 -> 832x624 -> 640x480
    p = prepare_image(img, 56, 64, webui_resize=True)
    assert p.model_size_wh == (640, 480) and p.original_size_wh == (1280, 960)
    assert p.coarse.shape == (3, 56, 56) and p.fine.shape == (3, 64, 64)
    # web UI rescale: (k + 0.5) * s - 0.5, s = 2 per axis here
    np.testing.assert_allclose(model_to_original(np.array([[0.0, 0.0], [639.0, 479.0]]), p),
                               [[0.5, 0.5], [1278.5, 958.5]])
    direct = prepare_image(img, 56, 64, webui_resize=False)
    assert direct.model_size_wh == (1280, 960)
    np.testing.assert_array_equal(model_to_original(np.array([[3.25, 7.5]], np.float32), direct), [[3.25, 7.5]])


def test_bad_inputs_and_settings_raise_specific_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pipe = RomaPipeline({"coarse_res": 56, "upsample_res": 64})
    with pytest.raises(InputImageError, match="uint8"):
        pipe.preprocess(np.zeros((50, 50, 3), np.float32), np.zeros((50, 50, 3), np.uint8))
    with pytest.raises(InputImageError, match="HxWx3"):
        pipe.preprocess(np.zeros((50, 50), np.uint8), np.zeros((50, 50, 3), np.uint8))
    with pytest.raises(ConfigError, match="multiple of 14"):
        RomaConfig(coarse_res=64)
    with pytest.raises(ConfigError, match="multiple of 8"):
        RomaConfig(upsample_res=100)
    with pytest.raises(CheckpointError, match="dinov2_path"):
        RomaPipeline({}).build_net({"model.x": torch.zeros(1)})  # no DINOv2 weights given anywhere
    with pytest.raises(CheckpointError, match="not found"):
        RomaPipeline({}).load_weights({"checkpoint_path": str(tmp_path / "none.ckpt")})


@pytest.mark.parity
def test_weight_files_load_strictly_and_refuse_wrong_or_partial_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ckpt, dino = ru.weight_files()
    pipe = RomaPipeline({"dinov2_path": str(dino)})
    # the files swapped: the DINOv2 file is not a RoMa checkpoint
    with pytest.raises(CheckpointError, match="not a MatchAnything checkpoint"):
        pipe.load_weights({"checkpoint_path": str(dino), "dinov2_path": str(dino)})
    with pytest.raises(CheckpointError, match="not Meta's"):
        pipe.load_weights({"checkpoint_path": str(ckpt), "dinov2_path": str(ckpt)})
    # a partial DINOv2 file: the missing key is named
    partial = {k: v for k, v in torch.load(dino, weights_only=True).items() if k != "norm.bias"}
    torch.save(partial, tmp_path / "partial.pth")
    state = pipe.load_weights({"checkpoint_path": str(ckpt), "dinov2_path": str(tmp_path / "partial.pth")})
    with pytest.raises(CheckpointError, match="norm.bias"):
        pipe.build_net(state)


def test_frozen_dinov2_position_table_survives_a_device_move() -> None:
    """The backend moves the graphs with `.to(device)`: the frozen table must be rebuilt there, not dropped
    (else every frame interpolates the 37x37 table again), and equal what a forward would compute."""
    from matchanything_ros.core.roma.dinov2 import DinoV2ViTL14

    torch.manual_seed(0)
    vit = DinoV2ViTL14(dim=32, depth=1, heads=2).eval()
    vit.freeze_pos_embed(40, 40)
    vit.to("cpu", torch.float32)
    frozen = vit._frozen_pos[(40, 40)]
    vit._frozen_pos.clear()
    with torch.no_grad():
        assert torch.equal(frozen, vit.interpolated_pos_embed(40, 40))
