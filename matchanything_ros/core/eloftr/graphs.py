"""ELoFTR's two export graphs around the network (model.EloftrNet), as ONNX Runtime, TensorRT and the torch host
path run them:

* `EloftrCoarse` ("coarse" graph): backbone -> coarse transformer -> dual-softmax confidence ->
  per image0 cell the top-K cells of image1 (or the full confidence matrix when `exact_full_conf`),
  plus the full-resolution fine feature maps.
* `EloftrFine` ("fine" graph): fine windows of the selected cell pairs -> sub-pixel keypoints in
  canvas pixels (with the original's -3.5 px convention and its off-by-one 3x3 regression window).

Selection (threshold, border removal, ordering) between them is host numpy code in `postprocess.py`, shared by
every backend; the product graph (product.py) runs the same rules on the device, pinned to these by tests.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from ..compiled import CompiledOrEager
from .config import EloftrConfig
from .model import EloftrNet, _flat_cells

def dual_softmax_confidence(
    t0: torch.Tensor, t1: torch.Tensor, mask0: torch.Tensor, mask1: torch.Tensor, temperature: float,
    d_model: int | None = None,
) -> torch.Tensor:
    """[1,C,H0,W0], [1,C,H1,W1] transformer maps -> conf [1, L0, L1] (always float32)."""
    with torch.autocast(t0.device.type, enabled=False):  # fp16 runs keep the similarity/softmax in fp32
        f0 = _flat_cells(t0).float()
        f1 = _flat_cells(t1).float()
        scale = (d_model if d_model is not None else f0.shape[-1]) ** 0.5
        f0, f1 = f0 / scale, f1 / scale
        sim = torch.einsum("nlc,nsc->nls", f0, f1) / temperature
        valid = mask0.flatten(1)[:, :, None] & mask1.flatten(1)[:, None, :]
        sim = sim.masked_fill_(~valid, -1e9)
        if sim.is_cuda:
            # CUDA's softmax over a non-last dim is a slow strided kernel (half of the whole forward at
            # 832² on an H100); the column softmax over the transpose's last dim is far faster. Not
            # bit-identical, but CUDA never is to the CPU reference; the CPU path below is the original's.
            row = torch.softmax(sim, 2)
            sim_t = sim.transpose(1, 2).contiguous()
            del sim
            col_t = torch.softmax(sim_t, 2)
            del sim_t
            return row.mul_(col_t.transpose(1, 2))
        conf = torch.softmax(sim, 1)
        return conf.mul_(torch.softmax(sim, 2))  # in place: the [L0, L1] matrices dominate memory


def border_valid_cells(mask: torch.Tensor, border: int) -> torch.Tensor:
    """[1,H,W] bool mask -> [1, H*W] bool: inside the valid region minus `border` cells on each side.

    Tensor ops only (shapes fixed), so the same rule runs inside an exported graph.
    """
    m = mask[0]
    h_valid = m.sum(0).max()  # valid rows (as the original's mask_border_with_padding)
    w_valid = m.sum(1).max()
    rows = torch.arange(m.shape[0], device=m.device)[:, None]
    cols = torch.arange(m.shape[1], device=m.device)[None, :]
    keep = (rows >= border) & (cols >= border) & (rows < h_valid - border) & (cols < w_valid - border)
    return keep.flatten()[None]


class EloftrCoarse(nn.Module):
    """Graph "coarse": images + masks -> coarse candidates + fine feature maps (fixed shapes).

    Outputs `cand_j` [1,L0,K] int64 and `cand_conf` [1,L0,K] float32 (top-K image1 cells per image0
    cell; cells outside the bordered valid region carry confidence 0), or with `exact_full_conf`
    the whole `conf` [1,L0,L1] instead; plus `feat_f0`, `feat_f1` [1,C_f,S,S].
    """

    input_names = ("image0", "image1", "mask0", "mask1")

    def __init__(self, net: EloftrNet, exact_full_conf: bool = False) -> None:
        super().__init__()
        self.net = net
        self.cfg = net.cfg
        self.exact_full_conf = exact_full_conf

    @property
    def output_names(self) -> tuple[str, ...]:
        if self.exact_full_conf:
            return ("conf", "feat_f0", "feat_f1")
        return ("cand_j", "cand_conf", "feat_f0", "feat_f1")

    def forward(
        self, image0: torch.Tensor, image1: torch.Tensor, mask0: torch.Tensor, mask1: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        feats = self.net.features(image0, image1, mask0, mask1)
        return self.head(feats, mask0, mask1)

    # --- CUDA-graph support (used by the torch backend on CUDA): the graph's shapes are fixed for a
    # given canvas and valid region, so one capture serves every frame of a camera.
    def capture_key(self, inputs: dict[str, Any]) -> tuple[Any, ...]:
        """What a captured graph depends on besides the image values: shapes and the two masks."""
        m0, m1 = np.asarray(inputs["mask0"]), np.asarray(inputs["mask1"])
        return (np.shape(inputs["image0"]), np.shape(inputs["image1"]), m0.shape, m1.shape, m0.tobytes(), m1.tobytes())

    @contextlib.contextmanager
    def static_crop(self, inputs: dict[str, Any]) -> Iterator[None]:
        """Fix the transformer's crop sizes from the host masks while a graph is captured."""
        transformer = self.net.loftr_coarse

        def size(mask: Any, multiple: int) -> tuple[int, int]:  # host masks: no device sync
            return transformer.valid_size(torch.as_tensor(np.asarray(mask)), multiple)

        transformer.fixed_valid = (size(inputs["mask0"], transformer.agg_size0),
                                   size(inputs["mask1"], transformer.agg_size1))
        try:
            yield
        finally:
            transformer.fixed_valid = None

    def head(
        self, feats: dict[str, torch.Tensor], mask0: torch.Tensor, mask1: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Coarse matching on `EloftrNet.features` output -> this graph's outputs."""
        conf = dual_softmax_confidence(feats["transformer0"], feats["transformer1"], mask0, mask1,
                                       self.cfg.dsmax_temperature, self.cfg.d_model)
        if self.exact_full_conf:
            return conf, feats["feat_f0"], feats["feat_f1"]
        return (*topk_candidates(conf, mask1, self.cfg.border_rm, self.cfg.candidates_per_cell),
                feats["feat_f0"], feats["feat_f1"])


def topk_candidates(conf: torch.Tensor, mask1: torch.Tensor, border: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """conf [1,L0,L1] -> (cand_j, cand_conf) [1,L0,K]: the K best image1 cells per image0 cell.

    image1 cells outside the bordered valid region are zeroed first, so they never take a slot.
    """
    keep1 = border_valid_cells(mask1, border)
    k = min(k, conf.shape[2])
    cand_conf, cand_j = torch.topk(conf * keep1[:, None, :].to(conf.dtype), k, dim=2)
    return cand_j, cand_conf


def _clamp_index(index: torch.Tensor, high: int) -> torch.Tensor:
    """An integer index limited to [0, high], as Max and Min: TensorRT's Clip takes floating types only."""
    low = torch.zeros((), dtype=index.dtype, device=index.device)
    return torch.minimum(torch.maximum(index, low), torch.full((), high, dtype=index.dtype, device=index.device))


def gather_windows(feat: torch.Tensor, cell_ids: torch.Tensor, window: int, ring: int, stride: int) -> torch.Tensor:
    """Windows of `window + 2*ring` pixels around coarse cells -> [M, ww, C] (pixels row-major).

    Equals F.unfold(kernel=window+2*ring, stride=stride, padding=ring) gathered at `cell_ids`,
    without unfolding the whole map. Outside the map is zero (the unfold padding).
    """
    c, h, w = feat.shape[1], feat.shape[2], feat.shape[3]
    wc = w // stride
    size = window + 2 * ring
    # pixels as rows of C contiguous channels, each gathered pixel one contiguous read: a view of a
    # channels-last map (the product graph's), a copy of a channel-major one
    pixels = feat[0].permute(1, 2, 0).reshape(-1, c)  # [h*w, C]
    offs = torch.arange(size, device=feat.device) - ring
    rows = (torch.div(cell_ids, wc, rounding_mode="floor") * stride)[:, None, None] + offs[None, :, None]
    cols = ((cell_ids % wc) * stride)[:, None, None] + offs[None, None, :]
    flat = (_clamp_index(rows, h - 1) * w + _clamp_index(cols, w - 1)).reshape(-1)  # [M*size*size], in the map
    windows = pixels.index_select(0, flat).reshape(-1, size * size, c)
    if ring:  # the ring may leave the map: zeros there (the clamped reads are discarded)
        inside = ((rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)).reshape(-1, size * size, 1)
        windows = torch.where(inside, windows, torch.zeros((), dtype=windows.dtype, device=windows.device))
    return windows


class EloftrFine(nn.Module):
    """Graph "fine": feat_f0, feat_f1, i_ids [M], j_ids [M] -> mkpts0_c, mkpts1_c [M,2] canvas pixels.

    `fast` (the CUDA speed form): the same keypoints by `fine_keypoints_fast` — argmax in log space and only
    the one regression row each match uses; equal up to float rounding (near-ties may flip, as any CUDA run
    against the CPU reference). `compiled`: that function under torch.compile (one fused kernel chain).
    """

    input_names = ("feat_f0", "feat_f1", "i_ids", "j_ids")
    output_names = ("mkpts0_c", "mkpts1_c")

    def __init__(self, cfg: EloftrConfig, fast: bool = False, compiled: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self._keypoints: Any = fine_keypoints_fast if fast or compiled else fine_keypoints
        if compiled:
            # dynamic: one compilation serves every row bucket (a fixed-shape one would recompile per bucket)
            self._keypoints = CompiledOrEager(fine_keypoints_fast, dynamic=True)

    def forward(
        self, feat_f0: torch.Tensor, feat_f1: torch.Tensor, i_ids: torch.Tensor, j_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        w_win, stride = cfg.fine_window_size, cfg.coarse_stride
        with torch.autocast(feat_f0.device.type, enabled=False):  # fine matching stays fp32
            f0 = gather_windows(feat_f0, i_ids, w_win, 0, stride).float()  # [M, W*W, C]
            f1 = gather_windows(feat_f1, j_ids, w_win, 1, stride).float()  # [M, (W+2)^2, C]
            return self._keypoints(f0, f1, i_ids, j_ids, feat_f0.shape[-1] // stride, feat_f1.shape[-1] // stride,
                                   cfg)


def fine_similarities(f0: torch.Tensor, f1: torch.Tensor, cfg: EloftrConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (P inner [M, W*W, W*W] dual softmax, sim_ff [M, W*W, (W+2)^2] regression similarity)."""
    c = cfg.fine_d_model
    split = c - cfg.fine_regress_dim
    m, w = f0.shape[0], cfg.fine_window_size
    sim_ff = torch.einsum("mlc,mrc->mlr", f0[..., split:], f1[..., split:] / cfg.fine_regress_dim**0.5)
    scale = c**0.5  # the original normalises by the FULL width, not the 56-channel part
    sim_f = torch.einsum("mlc,mrc->mlr", f0[..., :split] / scale, f1[..., :split] / scale)
    p = torch.softmax(sim_f, 1) * torch.softmax(sim_f, 2)
    p = p.reshape(m, w * w, w + 2, w + 2)[..., 1:-1, 1:-1].reshape(m, w * w, w * w)
    return p, sim_ff


def fine_keypoints(
    f0: torch.Tensor, f1: torch.Tensor, i_ids: torch.Tensor, j_ids: torch.Tensor, wc0: int, wc1: int,
    cfg: EloftrConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The original's fine level: windows [M, W*W, C], [M, (W+2)^2, C] -> keypoints (canvas pixels)."""
    w = cfg.fine_window_size
    m = f0.shape[0]
    p, sim_ff = fine_similarities(f0, f1, cfg)
    idx = p.reshape(m, -1).argmax(-1)
    l_idx = torch.div(idx, w * w, rounding_mode="floor")
    rows_ff = sim_ff.gather(1, l_idx[:, None, None].expand(m, 1, sim_ff.shape[2]))[:, 0]  # [M, ww*ww]
    return _refined_keypoints(l_idx, idx % (w * w), rows_ff, i_ids, j_ids, wc0, wc1, cfg)


def fine_keypoints_fast(
    f0: torch.Tensor, f1: torch.Tensor, i_ids: torch.Tensor, j_ids: torch.Tensor, wc0: int, wc1: int,
    cfg: EloftrConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`fine_keypoints` for the GPU: the dual-softmax argmax in log space, one regression row per match.

    p = softmax over l * softmax over r, so argmax p = argmax (2*sim - lse_l - lse_r): two reductions instead
    of a softmax over the non-last dim (a slow strided kernel on CUDA) and a product; and of the [M, W*W,
    (W+2)^2] regression similarity only the row of the chosen l is ever read, so only it is computed.
    """
    c, w = cfg.fine_d_model, cfg.fine_window_size
    split = c - cfg.fine_regress_dim
    m, ww = f0.shape[0], w + 2
    scale = c**0.5  # the original normalises by the FULL width, not the 56-channel part
    sim = torch.bmm(f0[..., :split] / scale, (f1[..., :split] / scale).transpose(1, 2))  # [M, W*W, ww*ww]
    log_p = 2.0 * sim - torch.logsumexp(sim, 1, keepdim=True) - torch.logsumexp(sim, 2, keepdim=True)
    inner = log_p.reshape(m, w * w, ww, ww)[..., 1:-1, 1:-1].reshape(m, w * w * w * w)
    idx = inner.argmax(-1)
    l_idx = torch.div(idx, w * w, rounding_mode="floor")
    f0_row = f0[..., split:].gather(1, l_idx[:, None, None].expand(m, 1, cfg.fine_regress_dim))  # [M, 1, 8]
    rows_ff = torch.bmm(f0_row, (f1[..., split:] / cfg.fine_regress_dim**0.5).transpose(1, 2))[:, 0]
    return _refined_keypoints(l_idx, idx % (w * w), rows_ff, i_ids, j_ids, wc0, wc1, cfg)


def _refined_keypoints(
    l_idx: torch.Tensor, r_idx: torch.Tensor, rows_ff: torch.Tensor, i_ids: torch.Tensor, j_ids: torch.Tensor,
    wc0: int, wc1: int, cfg: EloftrConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Window argmax (l, r) + the chosen regression row [M, (W+2)^2] -> keypoints with sub-pixel offset."""
    w, stride = cfg.fine_window_size, cfg.coarse_stride
    m = l_idx.shape[0]
    half = (w - 1) / 2.0  # 3.5: the original's pixel-offset convention, kept as is

    def offset(k: torch.Tensor) -> torch.Tensor:
        return torch.stack([(k % w).float() - half, torch.div(k, w, rounding_mode="floor").float() - half], -1)

    def cell_xy(ids: torch.Tensor, wc: int) -> torch.Tensor:
        return torch.stack([(ids % wc).float(), torch.div(ids, wc, rounding_mode="floor").float()], -1) * stride

    mkpts0 = cell_xy(i_ids, wc0) + offset(l_idx)
    mkpts1 = cell_xy(j_ids, wc1) + offset(r_idx)
    # sub-pixel regression: 3x3 block of the row around inner index r, taken in the 10x10 outer grid
    # WITHOUT the +1 inner->outer shift (as the original; index -1 wraps to the end)
    ww = w + 2
    d = torch.arange(-1, 2, device=l_idx.device)
    ry = (torch.div(r_idx, w, rounding_mode="floor")[:, None] + d[None]) % ww  # [M, 3]
    rx = (r_idx % w)[:, None] + d[None]
    rx = rx % ww
    flat = (ry[:, :, None] * ww + rx[:, None, :]).reshape(m, 9)
    block = rows_ff.gather(1, flat)
    heat = torch.softmax(block / cfg.fine_regress_temperature, -1).reshape(m, 3, 3)
    grid = d.float()
    ox = (heat.sum(1) * grid[None]).sum(-1)
    oy = (heat.sum(2) * grid[None]).sum(-1)
    mkpts1 = mkpts1 + torch.stack([ox, oy], -1)
    return mkpts0, mkpts1
