"""The demo-model training: targets from known warps, losses that match the inference graphs, and
a few CPU steps that reduce the loss."""
from __future__ import annotations

import numpy as np
import torch

from matchanything_ros.core.eloftr.config import EloftrConfig
from matchanything_ros.core.eloftr.model import EloftrNet
from matchanything_ros.core.eloftr.graphs import fine_keypoints, fine_similarities
from matchanything_ros.training.images import HELDOUT_IMAGES, TRAIN_IMAGES, load_skimage_rgb
from matchanything_ros.training.losses import (coarse_targets, fine_log_probs, fine_targets, regression_offsets)
from matchanything_ros.training.synthesis import PairBatch, PairSynthesizer, warp_points
from matchanything_ros.training.train import DEMO_MODEL_CONFIG, training_forward, training_step

SMALL = EloftrConfig.from_dict({**DEMO_MODEL_CONFIG, "layer_depths": (1, 1, 2)})


def test_heldout_images_never_trained_on() -> None:
    train = {i.name for i in TRAIN_IMAGES}
    assert not train & {i.name for i in HELDOUT_IMAGES}
    assert "stereo_motorcycle" not in train
    assert all(i.licence for i in TRAIN_IMAGES)


def _translation_batch(dx: int, dy: int, size: int = 64) -> PairBatch:
    img = torch.rand(1, 1, size, size)
    H = torch.tensor([[[1.0, 0, dx], [0, 1.0, dy], [0, 0, 1.0]]], dtype=torch.float64)
    valid = torch.ones(1, size, size, dtype=torch.bool)
    return PairBatch(image0=img, image1=img.clone(), valid0=valid, valid1=valid.clone(), H_0to1=H)


def test_coarse_and_fine_targets_of_a_translation() -> None:
    b = _translation_batch(16, 8)  # two cells right, one cell down
    tg = coarse_targets(b, stride=8)
    wc = 8
    i = 1 * wc + 2  # cell (x=2, y=1) -> (x=4, y=2)
    assert tg.gt_j[0, i] == 2 * wc + 4
    assert bool(tg.mutual[0, i])
    # cell (x=7, y=0) moves outside image1: no match, counted as a negative
    assert tg.gt_j[0, 7] == -1 and bool(tg.row_neg[0, 7])
    ftg = fine_targets(b, tg, SMALL, per_sample=1000, gen=torch.Generator().manual_seed(0))
    sel = (ftg.i_ids == i).nonzero()[0, 0]
    # an integer translation by whole cells: pixel l of the window lands on inner pixel l, zero offset
    assert torch.equal(ftg.r_gt[sel], torch.arange(64))
    assert bool(ftg.valid[sel].all())
    assert float(ftg.offset_gt[sel].abs().max()) < 1e-6


def test_fine_loss_terms_equal_the_inference_fine_matching() -> None:
    torch.manual_seed(0)
    m, c = 5, SMALL.fine_d_model
    f0, f1 = torch.randn(m, 64, c), torch.randn(m, 100, c)
    logp, sim_ff = fine_log_probs(f0, f1, SMALL)
    p_ref, sim_ff_ref = fine_similarities(f0, f1, SMALL)
    torch.testing.assert_close(logp.exp(), p_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sim_ff, sim_ff_ref)
    # the regression rule used in training gives the inference keypoints at the argmax pixel pair
    i_ids, j_ids = torch.tensor([9, 10, 17, 18, 27]), torch.tensor([11, 12, 19, 20, 29])
    k0, k1 = fine_keypoints(f0, f1, i_ids, j_ids, 8, 8, SMALL)
    idx = p_ref.reshape(m, -1).argmax(-1)
    l_idx, r_idx = idx // 64, idx % 64
    off = regression_offsets(sim_ff, r_idx[:, None].expand(m, 64), SMALL)[torch.arange(m), l_idx]
    base1 = torch.stack([(j_ids % 8) * 8 + r_idx % 8, (j_ids // 8) * 8 + r_idx // 8], -1).float() - 3.5
    torch.testing.assert_close(k1, base1 + off)
    base0 = torch.stack([(i_ids % 8) * 8 + l_idx % 8, (i_ids // 8) * 8 + l_idx // 8], -1).float() - 3.5
    torch.testing.assert_close(k0, base0)


def test_synthesized_pairs_follow_their_homography() -> None:
    photo = load_skimage_rgb("brick")
    syn = PairSynthesizer([photo], "cpu", seed=3)
    syn.augment.cross_modality = 0.0
    syn.augment.blur = 0.0
    syn.augment.noise = 0.0
    b = syn.sample(2, 96)
    assert b.image0.shape == (2, 1, 96, 96) and b.image0.min() >= 0 and b.image0.max() <= 1
    # contrast/gamma differ per view, so compare rank-correlated structure: normalised cross-correlation
    # of image0 with image1 sampled back through H_0to1 must be high where both are valid
    ys, xs = torch.meshgrid(torch.arange(96.0), torch.arange(96.0), indexing="ij")
    pts = torch.stack([xs, ys], -1).reshape(1, -1, 2).expand(2, -1, -1)
    q = warp_points(b.H_0to1, pts.double()).float()
    grid = (q / 95 * 2 - 1).reshape(2, 96, 96, 2)
    back = torch.nn.functional.grid_sample(b.image1, grid, align_corners=True)[:, 0]
    inside = ((q >= 0) & (q <= 95)).all(-1).reshape(2, 96, 96) & b.valid0
    for k in range(2):
        a, c = b.image0[k, 0][inside[k]], back[k][inside[k]]
        ncc = float(((a - a.mean()) * (c - c.mean())).mean() / (a.std() * c.std() + 1e-6))
        assert ncc > 0.7, ncc


def test_a_few_cpu_steps_reduce_the_loss() -> None:
    torch.manual_seed(0)
    net = EloftrNet(SMALL).train()
    photos = [load_skimage_rgb(n) for n in ("brick", "coins")]
    syn = PairSynthesizer(photos, "cpu", seed=1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    fixed = syn.sample(3, 64)
    syn.sample = lambda batch, size: fixed  # type: ignore[method-assign]  # one batch: the loss must fall
    losses = []
    for _ in range(8):
        loss, stats = training_step(net, syn, SMALL, 3, 64, 8, amp=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(stats["loss"])
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_training_forward_matches_inference_features() -> None:
    """Training sees exactly the features inference computes (eval mode, one unpadded pair)."""
    torch.manual_seed(0)
    net = EloftrNet(SMALL).eval()
    img0, img1 = torch.rand(1, 1, 64, 64), torch.rand(1, 1, 64, 64)
    mask = torch.ones(1, 8, 8, dtype=torch.bool)
    with torch.no_grad():
        t0, t1, ff0, ff1 = training_forward(net, img0, img1)
        ref = net.features(img0, img1, mask, mask)
    torch.testing.assert_close(t0, ref["transformer0"])
    torch.testing.assert_close(ff1, ref["feat_f1"])
