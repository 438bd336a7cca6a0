"""Ground truth from the known warp and the coarse + fine losses of the ELoFTR training forward.

Conventions are those of the inference graphs (`core/eloftr/model.py`), so what is trained is what
runs: coarse cell i of an S x S canvas covers pixels [8x, 8x+8) x [8y, 8y+8); the fine window of
image0 is that cell, the one of image1 the cell plus a 1-px ring (10 x 10); the fine dual softmax
keeps the inner 8 x 8 of the 10 x 10; the sub-pixel regression reads a 3 x 3 block of the
regression similarity centred one pixel up-left of the chosen pixel (the original's indexing).
Keypoints come out as `pixel - 3.5` in both images, so regression targets are `warp(p) - pixel(r)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.eloftr.config import EloftrConfig
from .synthesis import PairBatch, warp_points


@dataclass
class CoarseTargets:
    gt_j: torch.Tensor  # [B, L0] int64 image1 cell of each image0 cell, -1 = no match
    mutual: torch.Tensor  # [B, L0] bool: the match maps back to the same cell (one-to-one)
    row_neg: torch.Tensor  # [B, L0] bool: image0 cell has no counterpart (outside view 1 / photo)
    col_neg: torch.Tensor  # [B, L1] bool: image1 cell has no counterpart


@dataclass
class FineTargets:
    b_ids: torch.Tensor  # [M] sample of each selected coarse match
    i_ids: torch.Tensor  # [M] image0 cell
    j_ids: torch.Tensor  # [M] image1 cell (ground truth)
    r_gt: torch.Tensor  # [M, W*W] inner-window index in image1 of each image0 window pixel
    offset_gt: torch.Tensor  # [M, W*W, 2] sub-pixel target (x, y) relative to pixel r_gt
    valid: torch.Tensor  # [M, W*W] bool


def _cell_centres(hc: int, wc: int, stride: int, device: torch.device) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(hc, device=device), torch.arange(wc, device=device), indexing="ij")
    return torch.stack([xs, ys], -1).reshape(-1, 2).double() * stride + (stride - 1) / 2.0


def _textured(image: torch.Tensor, stride: int, min_std: float) -> torch.Tensor:
    """[B,1,S,S] -> [B, L] bool: the 8x8 cell is not flat (flat cells cannot be localised)."""
    mean = F.avg_pool2d(image, stride)
    sq = F.avg_pool2d(image * image, stride)
    return ((sq - mean * mean).clamp(min=0).sqrt() > min_std).flatten(1)


def _lookup(mask: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """mask [B,H,W] bool at rounded points [B,N,2] (outside = False)."""
    b, h, w = mask.shape
    x = pts[..., 0].round().long()
    y = pts[..., 1].round().long()
    inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    flat = (y.clamp(0, h - 1) * w + x.clamp(0, w - 1))
    return inside & mask.flatten(1).gather(1, flat)


def coarse_targets(batch: PairBatch, stride: int, min_std: float = 2.0 / 255) -> CoarseTargets:
    b, _, h, w = batch.image0.shape
    hc, wc = h // stride, w // stride
    dev = batch.image0.device
    centres = _cell_centres(hc, wc, stride, dev)[None].expand(b, -1, -1)
    H = batch.H_0to1
    Hinv = torch.linalg.inv(H)
    # forward: image0 cell centre -> image1 cell
    q = warp_points(H, centres)
    ok0 = _lookup(batch.valid0, centres) & _lookup(batch.valid1, q)
    j = ((q[..., 1] / stride).floor().clamp(0, hc - 1).long() * wc
         + (q[..., 0] / stride).floor().clamp(0, wc - 1).long())
    # backward: image1 cell centre -> image0 cell
    p = warp_points(Hinv, centres)
    ok1 = _lookup(batch.valid1, centres) & _lookup(batch.valid0, p)
    i_back = ((p[..., 1] / stride).floor().clamp(0, hc - 1).long() * wc
              + (p[..., 0] / stride).floor().clamp(0, wc - 1).long())
    tex0 = _textured(batch.image0, stride, min_std)
    tex1 = _textured(batch.image1, stride, min_std)
    tex_j = tex1.gather(1, j)
    pos = ok0 & tex0 & tex_j
    gt_j = torch.where(pos, j, torch.full_like(j, -1))
    rows = torch.arange(hc * wc, device=dev)[None]
    mutual = pos & ok1.gather(1, j) & (i_back.gather(1, j) == rows)
    return CoarseTargets(gt_j=gt_j, mutual=mutual, row_neg=~ok0 & tex0, col_neg=~ok1 & tex1)


def coarse_loss(t0: torch.Tensor, t1: torch.Tensor, tg: CoarseTargets, temperature: float,
                neg_weight: float = 0.5) -> tuple[torch.Tensor, dict[str, float]]:
    """Dual-softmax NLL on ground-truth cell pairs + a focal penalty on confidence of unmatched cells.

    t0, t1: transformer outputs [B,C,Hc,Wc]. The similarity is exactly the inference one
    (features / sqrt(C), dot product / temperature), in float32.
    """
    f0 = t0.flatten(2).transpose(1, 2).float()
    f1 = t1.flatten(2).transpose(1, 2).float()
    scale = f0.shape[-1] ** 0.5
    sim = torch.einsum("nlc,nsc->nls", f0 / scale, f1 / scale) / temperature
    log_row = torch.log_softmax(sim, 2)
    log_col = torch.log_softmax(sim, 1)
    pos = tg.gt_j >= 0
    j = tg.gt_j.clamp(min=0)[..., None]
    lr = log_row.gather(2, j)[..., 0]
    lc = log_col.gather(2, j)[..., 0]
    n_pos = pos.sum().clamp(min=1)
    loss_row = -(lr * pos).sum() / n_pos
    loss_col = -(lc * tg.mutual).sum() / tg.mutual.sum().clamp(min=1)
    # unmatched cells: any confidence they carry is a false match (focal weight conf^2)
    conf = torch.exp(log_row + log_col)
    neg_terms = -(conf**2) * torch.log1p(-conf.clamp(max=1 - 1e-6))
    neg_rows = (neg_terms.sum(2) * tg.row_neg).sum()
    neg_cols = (neg_terms.sum(1) * tg.col_neg).sum()
    n_neg = (tg.row_neg.sum() + tg.col_neg.sum()).clamp(min=1)
    loss_neg = (neg_rows + neg_cols) / n_neg
    loss = loss_row + loss_col + neg_weight * loss_neg
    with torch.no_grad():
        hit = (log_row.argmax(2) == tg.gt_j) & pos
        stats = {"coarse_row": float(loss_row), "coarse_col": float(loss_col), "coarse_neg": float(loss_neg),
                 "coarse_acc": float(hit.sum() / n_pos), "n_pos": float(pos.sum())}
    return loss, stats


def fine_targets(batch: PairBatch, ctg: CoarseTargets, cfg: EloftrConfig, per_sample: int,
                 gen: torch.Generator) -> FineTargets:
    """Sample up to `per_sample` ground-truth coarse matches per pair; pixel-level targets for each."""
    w, stride = cfg.fine_window_size, cfg.coarse_stride
    dev = ctg.gt_j.device
    size = batch.image0.shape[-1]
    wc = size // stride
    b_list, i_list = [], []
    for b in range(ctg.gt_j.shape[0]):
        cand = torch.nonzero(ctg.gt_j[b] >= 0)[:, 0]
        if cand.numel() > per_sample:
            cand = cand[torch.randperm(cand.numel(), generator=gen, device=dev)[:per_sample]]
        b_list.append(torch.full_like(cand, b))
        i_list.append(cand)
    b_ids, i_ids = torch.cat(b_list), torch.cat(i_list)
    j_ids = ctg.gt_j[b_ids, i_ids]
    m = b_ids.numel()
    k = torch.arange(w * w, device=dev)
    kx, ky = (k % w).double(), torch.div(k, w, rounding_mode="floor").double()
    px = (i_ids % wc).double()[:, None] * stride + kx[None]
    py = torch.div(i_ids, wc, rounding_mode="floor").double()[:, None] * stride + ky[None]
    p = torch.stack([px, py], -1)  # [M, W*W, 2] image0 pixels of the window
    q = warp_points(batch.H_0to1[b_ids], p)
    jx0 = (j_ids % wc).double()[:, None] * stride  # top-left pixel of image1's cell
    jy0 = torch.div(j_ids, wc, rounding_mode="floor").double()[:, None] * stride
    ix = torch.round(q[..., 0] - jx0).long()  # inner-window column (outer = inner + 1)
    iy = torch.round(q[..., 1] - jy0).long()
    inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < w)
    valid0 = batch.valid0[b_ids[:, None], py.long(), px.long()]
    in_canvas = (q[..., 0] >= 0) & (q[..., 0] <= size - 1) & (q[..., 1] >= 0) & (q[..., 1] <= size - 1)
    valid = inside & valid0 & in_canvas
    r_gt = (iy.clamp(0, w - 1) * w + ix.clamp(0, w - 1))
    offset = torch.stack([q[..., 0] - (jx0 + ix.clamp(0, w - 1)), q[..., 1] - (jy0 + iy.clamp(0, w - 1))], -1)
    if m == 0:
        valid = valid[:0]
    return FineTargets(b_ids=b_ids, i_ids=i_ids, j_ids=j_ids, r_gt=r_gt, offset_gt=offset.float(), valid=valid)


def gather_windows_batched(feat: torch.Tensor, b_ids: torch.Tensor, cell_ids: torch.Tensor, window: int,
                           ring: int, stride: int) -> torch.Tensor:
    """Batched version of the inference `gather_windows`: [B,C,S,S] -> [M, (window+2 ring)^2, C]."""
    b, c, h, w = feat.shape
    wc = w // stride
    size = window + 2 * ring
    padded = F.pad(feat, (ring, ring, ring, ring)).permute(0, 2, 3, 1).reshape(-1, c)  # [B*(h+2r)*(w+2r), C]
    hp, wp = h + 2 * ring, w + 2 * ring
    top = torch.div(cell_ids, wc, rounding_mode="floor") * stride
    left = (cell_ids % wc) * stride
    offs = torch.arange(size, device=feat.device)
    rows = top[:, None, None] + offs[None, :, None]
    cols = left[:, None, None] + offs[None, None, :]
    flat = (b_ids[:, None, None] * hp * wp + rows * wp + cols).reshape(-1)
    return padded.index_select(0, flat).reshape(-1, size * size, c)


def fine_log_probs(f0: torch.Tensor, f1: torch.Tensor, cfg: EloftrConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Log of the inference fine dual softmax (inner 8x8) [M,64,64] and the regression similarity [M,64,100]."""
    c = f0.shape[-1]
    split = c - cfg.fine_regress_dim
    m, w = f0.shape[0], cfg.fine_window_size
    sim_ff = torch.einsum("mlc,mrc->mlr", f0[..., split:], f1[..., split:] / cfg.fine_regress_dim**0.5)
    scale = c**0.5
    sim_f = torch.einsum("mlc,mrc->mlr", f0[..., :split] / scale, f1[..., :split] / scale)
    logp = torch.log_softmax(sim_f, 1) + torch.log_softmax(sim_f, 2)
    logp = logp.reshape(m, w * w, w + 2, w + 2)[..., 1:-1, 1:-1].reshape(m, w * w, w * w)
    return logp, sim_ff


def regression_offsets(sim_ff: torch.Tensor, r_idx: torch.Tensor, cfg: EloftrConfig) -> torch.Tensor:
    """Sub-pixel offsets [M,N,2] for every window pixel l (rows of sim_ff [M,N,(W+2)^2]) at inner indices r [M,N].

    The same 3x3 block rule as the inference `fine_keypoints` (off-by-one, wrapping at -1).
    """
    w = cfg.fine_window_size
    ww = w + 2
    d = torch.arange(-1, 2, device=sim_ff.device)
    ry = (torch.div(r_idx, w, rounding_mode="floor")[..., None] + d) % ww  # [M,N,3]
    rx = ((r_idx % w)[..., None] + d) % ww
    flat = (ry[..., :, None] * ww + rx[..., None, :]).flatten(-2)  # [M,N,9]
    block = sim_ff.gather(2, flat)
    heat = torch.softmax(block.float() / cfg.fine_regress_temperature, -1).reshape(*flat.shape[:2], 3, 3)
    grid = d.float()
    ox = (heat.sum(-2) * grid).sum(-1)
    oy = (heat.sum(-1) * grid).sum(-1)
    return torch.stack([ox, oy], -1)


def fine_loss(feat_f0: torch.Tensor, feat_f1: torch.Tensor, ftg: FineTargets, cfg: EloftrConfig,
              regress_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    w, stride = cfg.fine_window_size, cfg.coarse_stride
    if ftg.b_ids.numel() == 0 or not bool(ftg.valid.any()):
        zero = (feat_f0.sum() + feat_f1.sum()) * 0.0
        return zero, {"fine_cls": 0.0, "fine_reg": 0.0, "fine_acc": 0.0, "fine_err_px": 0.0}
    f0 = gather_windows_batched(feat_f0, ftg.b_ids, ftg.i_ids, w, 0, stride).float()
    f1 = gather_windows_batched(feat_f1, ftg.b_ids, ftg.j_ids, w, 1, stride).float()
    logp, sim_ff = fine_log_probs(f0, f1, cfg)
    n = ftg.valid.sum().clamp(min=1)
    lp = logp.gather(2, ftg.r_gt[..., None])[..., 0]
    loss_cls = -(lp * ftg.valid).sum() / n
    off = regression_offsets(sim_ff, ftg.r_gt, cfg)
    err2 = ((off - ftg.offset_gt) ** 2).sum(-1)
    loss_reg = (err2 * ftg.valid).sum() / n
    loss = loss_cls + regress_weight * loss_reg
    with torch.no_grad():
        acc = ((logp.argmax(2) == ftg.r_gt) & ftg.valid).sum() / n
        stats = {"fine_cls": float(loss_cls), "fine_reg": float(loss_reg), "fine_acc": float(acc),
                 "fine_err_px": float((err2.sqrt() * ftg.valid).sum() / n)}
    return loss, stats
