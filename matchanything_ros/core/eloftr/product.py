"""ELoFTR's product graph: the whole frame in one fixed-shape module (torch on CUDA; its export runs on
ONNX Runtime and TensorRT), beside the network of model.py that it runs.

uint8 camera images in, padded matches out: stage 1 on the device (preprocess.py's plan, bit for bit), luma,
padding and masks, backbone, transformer, a matching head (`PRODUCT_HEADS`), the device form of the host
selection (`select_on_device`, pinned to `postprocess.select_coarse_matches` by the tests), the cap's
most-confident rule (`confidence_floor`, pinned to `postprocess.keep_most_confident`) and the fine level in
row buckets. The threshold is a buffer the compiled and captured code read: `set_threshold` changes it in place.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .model import Edge, EloftrNet, _flat_cells
from .graphs import EloftrFine, border_valid_cells, dual_softmax_confidence, topk_candidates
from ..compiled import FIXED_SHAPE_COMPILES, CompiledOrEager
from ..kernels import resample_kernel
from .options import PRODUCT_HEADS

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# The product graph: uint8 images in, padded matches out, one fixed-shape module per canvas
# ----------------------------------------------------------------------------------------------


def _tf32_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 x -> (hi, lo), x = hi + lo exactly, hi with TF32's 10 mantissa bits (the low 13 cleared)."""
    hi = (x.view(torch.int32) & -8192).view(torch.float32)
    return hi, x - hi


def _similarity_lse(
    t0: torch.Tensor, t1: torch.Tensor, mask0: torch.Tensor, mask1: torch.Tensor, temperature: float, d_model: int,
    split_tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (sim [1,L0,L1] float32, invalid pairs at -1e9; its row and column log-sum-exps), for the log-space heads.

    The scales are applied after the product (the original scales each side by 1/sqrt(d) first).
    `split_tf32` (CUDA fp16 runs, under `tf32_head`): the fp32 product on TF32 tensor cores as
    a_hi.b_hi + a_hi.b_lo + a_lo.b_hi, one GEMM over the concatenated splits — products of TF32 values are
    exact in fp32, so only the dropped a_lo.b_lo (~2^-22 relative) and the summation order differ from
    fp32; 3x faster than the fp32 (FFMA) GEMM (H200, 832²: 1.3 ms).
    """
    a, b = _flat_cells(t0).float(), _flat_cells(t1).float()
    if split_tf32:
        a_hi, a_lo = _tf32_split(a)
        b_hi, b_lo = _tf32_split(b)
        a, b = torch.cat([a_hi, a_hi, a_lo], -1), torch.cat([b_hi, b_lo, b_hi], -1)
    sim = torch.einsum("nlc,nsc->nls", a, b) / (d_model * temperature)
    valid = mask0.flatten(1)[:, :, None] & mask1.flatten(1)[:, None, :]
    sim = sim.masked_fill(~valid, -1e9)
    return sim, torch.logsumexp(sim, 2, keepdim=True), torch.logsumexp(sim, 1, keepdim=True)


def lse_topk_candidates(
    t0: torch.Tensor, t1: torch.Tensor, mask0: torch.Tensor, mask1: torch.Tensor, temperature: float,
    d_model: int, border: int, k: int, split_tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dual-softmax top-K in log-sum-exp form: no [L0, L1] confidence matrix is materialised.

    conf[i, j] = exp(sim - lse_row_i) * exp(sim - lse_col_j), so a row's top-K of conf is its top-K of
    2*sim - lse_col (lse_row is constant along the row), and conf = exp(top - lse_row). Equal to
    `dual_softmax_confidence` + `topk_candidates` up to float rounding; under torch.compile the row and
    column reductions fuse into a few passes over the similarity.
    """
    with torch.autocast(t0.device.type, enabled=False):
        sim, lse_row, lse_col = _similarity_lse(t0, t1, mask0, mask1, temperature, d_model, split_tf32)
        keep1 = border_valid_cells(mask1, border)[:, None, :]
        score = (2.0 * sim - lse_col).masked_fill(~keep1, float("-inf"))
        top, cand_j = torch.topk(score, min(k, score.shape[2]), dim=2)
        return cand_j, torch.exp(top - lse_row)


def lse_passing_mask(
    t0: torch.Tensor, t1: torch.Tensor, mask0: torch.Tensor, mask1: torch.Tensor, temperature: float,
    d_model: int, border: int, threshold: float | torch.Tensor, split_tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The matches of the dual softmax as a mask, in log space: conf > threshold <=> 2*sim - lse_row - lse_col
    > log(threshold), inside the bordered valid regions. -> (sim [1,L0,L1], lse_row [1,L0,1], lse_col
    [1,1,L1], passed [1,L0,L1] bool, the number passing). Under torch.compile the comparison and the count
    fuse into the reductions' passes: no confidence matrix and no top-K (a radix select with several passes
    over L0 x L1 on CUDA), and no separate pass to count. `threshold` may be a 0-dim tensor: then it is an
    input of the compiled code, not a constant of it (a new threshold neither recompiles nor re-captures).
    """
    with torch.autocast(t0.device.type, enabled=False):
        sim, lse_row, lse_col = _similarity_lse(t0, t1, mask0, mask1, temperature, d_model, split_tf32)
        keep = border_valid_cells(mask0, border)[:, :, None] & border_valid_cells(mask1, border)[:, None, :]
        log_thr = torch.log(threshold) if isinstance(threshold, torch.Tensor) else math.log(threshold)
        passed = (2.0 * sim - lse_row - lse_col > log_thr) & keep
        return sim, lse_row, lse_col, passed, passed.sum(2, dtype=torch.int32).sum()


def confidence_floor(values: torch.Tensor, passed: torch.Tensor, low: torch.Tensor | float, high: float,
                     max_matches: int, steps: int = 32) -> torch.Tensor:
    """The most-confident-first rule of a frame over the cap, with fixed shapes and no host sync: the lowest
    floor f in [low, high] at which at most `max_matches` of the passing `values` are > f, by bisection (each
    step one compare + sum; 32 steps bring the bracket below float32's spacing of confidences, so the floor
    is the (max_matches+1)-th largest value, as `postprocess.keep_most_confident` computes it on the host).
    Where no more than max_matches pass, f = low (nothing changes). -> 0-dim tensor."""
    lo = torch.as_tensor(low, dtype=values.dtype, device=values.device).reshape(())
    hi = torch.full_like(lo, high)

    def fits(floor: torch.Tensor) -> torch.Tensor:
        return ((values > floor) & passed).sum() <= max_matches

    for _ in range(steps):  # invariant: fits(hi), and not fits(lo) unless everything fits
        mid = (lo + hi) * 0.5
        ok = fits(mid)
        hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid)
    return torch.where(fits(torch.as_tensor(low, dtype=values.dtype, device=values.device).reshape(())), lo, hi)


def select_passing(
    sim: torch.Tensor, lse_row: torch.Tensor, lse_col: torch.Tensor, passed: torch.Tensor, count: torch.Tensor,
    max_matches: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`lse_passing_mask`'s matches -> `select_on_device`'s outputs: (i, j) in row-major order by a fixed-size
    nonzero (no host sync), padded with (0, 0, 0); no row is ever truncated (there is no per-row K). A frame
    with more than max_matches passing gets the first max_matches here: `keep_most_confident_lse` then selects
    the most confident (the torch backend runs it only for such frames, after reading the count)."""
    ij = torch.nonzero_static(passed[0], size=max_matches, fill_value=0)
    i_ids, j_ids = ij[:, 0], ij[:, 1]
    used = torch.arange(max_matches, device=sim.device) < count
    mconf = torch.exp(2.0 * sim[0, i_ids, j_ids] - lse_row[0, i_ids, 0] - lse_col[0, 0, j_ids])
    return i_ids, j_ids, torch.where(used, mconf, torch.zeros_like(mconf)), count, torch.zeros_like(count)


def valid_cell_block(t: torch.Tensor, mask: torch.Tensor, block: tuple[int, int]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coarse features [1,C,H,W] and their mask [1,H,W] -> the top-left `block` (rows, cols) of both, and the
    canvas cell of each block cell [rows*cols] (int64, row-major). The dual softmax of cells outside the valid
    region weighs nothing (their similarity is -1e9, exp of it 0), so the head on the valid block computes the
    same confidences as on the whole canvas, for a 16:9 camera on 29 % of the similarity matrix's entries.
    Block cells are row-major like canvas cells, so the row-major order of the matches is kept."""
    rows, cols = block
    width = t.shape[-1]
    r = torch.arange(rows, device=t.device)[:, None] * width
    cells = (r + torch.arange(cols, device=t.device)[None, :]).flatten()
    return t[:, :, :rows, :cols], mask[:, :rows, :cols], cells


def keep_most_confident_lse(sim: torch.Tensor, lse_row: torch.Tensor, lse_col: torch.Tensor, passed: torch.Tensor,
                            threshold: torch.Tensor, max_matches: int
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A frame over the cap (lse head): the passing matches above `confidence_floor`, row-major, padded.
    -> (i_ids, j_ids, mconf) [max_matches]. Eager and only for such frames: ~32 passes over L0 x L1."""
    score = 2.0 * sim - lse_row - lse_col  # log confidence
    floor = confidence_floor(score, passed, torch.log(threshold), 0.0, max_matches)
    keep = passed & (score > floor)
    i_ids, j_ids, mconf, _, _ = select_passing(sim, lse_row, lse_col, keep, keep.sum(), max_matches)
    return i_ids, j_ids, mconf


def select_on_device(
    cand_j: torch.Tensor, cand_conf: torch.Tensor, mask0: torch.Tensor, mask1: torch.Tensor,
    threshold: float | torch.Tensor, border: int, max_matches: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`postprocess.select_coarse_matches` on the device with fixed shapes.

    -> (i_ids, j_ids, mconf) [max_matches] in the original's row-major order, padded with (0, 0, 0),
    plus `count` (all passing candidates, may exceed max_matches) and `truncated_rows` (rows whose K
    candidates all passed). A frame with more than max_matches passing keeps the most confident
    (`confidence_floor`: a few compares and sums over the L0 x K candidates, in the graph).

    Compaction by prefix sum and scatter, no sort (a TopK over all L0*K candidates is beyond TensorRT's
    K limit): a passing candidate's output row is the number of passing candidates in the rows before
    its own plus its rank by j among its row's passing ones (a row's candidates come in confidence
    order; passing j are unique in a row, so the rank is exact). K is small: the rank is K*K compares.
    """
    l0, k = cand_conf.shape[1], cand_conf.shape[2]
    l1 = mask1.shape[1] * mask1.shape[2]
    keep0 = border_valid_cells(mask0, border)[0]
    keep1 = border_valid_cells(mask1, border)[0]
    cj, cc = cand_j[0], cand_conf[0]
    passed = (cc > threshold) & keep0[:, None] & keep1[cj]  # exact zeros never pass (conf >= 0, thr >= 0)
    truncated_rows = (passed.all(1) & (k < l1)).sum()
    count = passed.sum()
    if l0 * k > max_matches:  # else no frame can be over the cap
        passed = passed & (cc > confidence_floor(cc, passed, threshold, 1.0, max_matches))
    j_key = torch.where(passed, cj, torch.full_like(cj, l1))  # failing candidates rank after every passing one
    rank = (j_key[:, None, :] < j_key[:, :, None]).sum(2)
    # rows before each row: an exclusive prefix sum, in float32 (TensorRT's CumSum takes floating types
    # only; exact, the sums stay below 2**24)
    per_row = passed.sum(1).to(torch.float32)
    first = (torch.cumsum(per_row, 0) - per_row).to(cj.dtype)
    slot = first[:, None] + rank
    # every candidate gets its own scatter target (duplicate targets are undefined in ONNX/TensorRT):
    # the kept ones their output row, the others a spare slot past the cap, cut off below
    spare = max_matches + torch.arange(l0 * k, device=cj.device, dtype=cj.dtype).view(l0, k)
    target = torch.where(passed & (slot < max_matches), slot, spare).flatten()
    size = max_matches + l0 * k
    rows = torch.arange(l0, device=cj.device, dtype=cj.dtype)[:, None].expand(l0, k)
    i_ids = torch.zeros(size, dtype=cj.dtype, device=cj.device).scatter(0, target, rows.flatten())[:max_matches]
    j_ids = torch.zeros(size, dtype=cj.dtype, device=cj.device).scatter(0, target, cj.flatten())[:max_matches]
    mconf = torch.zeros(size, dtype=cc.dtype, device=cc.device).scatter(0, target, cc.flatten())[:max_matches]
    return i_ids, j_ids, mconf, count, truncated_rows


FINE_CHUNK = 4096  # fine-level rows per step of the product graph (bounds its memory)
PRODUCT_COLUMNS = ("i", "j", "x0", "y0", "x1", "y1", "conf")  # columns of EloftrProduct's `matches` rows


class EloftrProduct(nn.Module):
    """Graph "product": rgb0, rgb1 uint8 [H,W,3] -> `matches` float32 [1 + max_matches, 7].

    The whole per-frame work in one fixed-shape module (one CUDA-graph replay per camera size):
    Pillow's integer luma, /255 by table (bit-exact with numpy), zero padding to the square canvas and
    the 1/8 masks, backbone, transformer, matching head, threshold/border/valid selection compacted to
    `max_matches` rows in row-major order, fine refinement. Row 0 is a header: (count of passing
    coarse matches — more than max_matches means the frame was capped —, truncated rows, max_matches);
    rows 1.. are PRODUCT_COLUMNS, the first min(count, cap) of them used, cap = min(max_matches, image0
    cells). Indices and counts
    are exact in float32 (below 2**24). The inputs are the stage-2 RGB images (after the truncating
    cast; for images that need no resize, the input images themselves), sides multiples of 32.
    """

    input_names = ("rgb0", "rgb1")
    output_names = ("matches",)
    u8_to_unit: torch.Tensor
    threshold_t: torch.Tensor

    def __init__(self, net: EloftrNet, threshold: float, max_matches: int, head: str = "dsmax",
                 fine: str = "exact", compiled: str = "none", stage1: Any = None, reach_crop: bool = False,
                 head_on_valid_cells: bool = False, stage1_kernel: bool = False) -> None:
        super().__init__()
        if head not in PRODUCT_HEADS:
            raise ValueError(f"head must be one of {PRODUCT_HEADS}, got {head!r}")
        if head == "lse_nonzero" and not threshold > 0:
            raise ValueError("the lse_nonzero head compares log-confidences with log(threshold): threshold must be > 0")
        if fine not in ("exact", "fast", "fast_compiled"):
            raise ValueError(f"fine must be exact, fast or fast_compiled, got {fine!r}")
        if compiled not in ("none", "features"):
            raise ValueError(f"compiled must be none or features, got {compiled!r}")
        self.net = net
        self.cfg = net.cfg
        self.max_matches = int(max_matches)
        # stage 1 on the device (preprocess.PreprocessSettings; None: the inputs are stage-2 images already,
        # as in the export): inputs are then the camera's images, resampled here as the host would
        self.stage1 = stage1
        # whether the host's kernel for the antialiased step accumulates with fused multiply-adds (asked of it)
        self.stage1_fma = host_aa_uses_fma() if stage1 is not None else False
        self._taps: dict[tuple[Any, ...], torch.Tensor] = {}  # stage-1 tables on the device, made before capture
        # on CUDA with Triton: stage 1 as one kernel per axis (core/resample_kernel.py), else the torch ops' replay
        self.stage1_kernel = bool(stage1_kernel)
        self._edges: dict[tuple[Any, ...], dict[str, Edge]] = {}  # far-field edges of the crops (`edges_for`)
        # the threshold is a buffer, read by the compiled and captured code as an input: a new threshold is
        # written in place (`set_threshold`) without recompiling or re-capturing anything
        self.register_buffer("threshold_t", torch.tensor(float(threshold), dtype=torch.float32), persistent=False)
        self.head_kind = head
        # the log-space head on the valid cells' block only (`valid_cell_block`), not the whole canvas
        self.head_on_valid_cells = bool(head_on_valid_cells)
        # the network sees the valid region plus its reach, not the whole square canvas (`network_extent`)
        self.reach_crop = bool(reach_crop)
        self.fine = EloftrFine(net.cfg, fast=fine != "exact", compiled=fine == "fast_compiled")
        # torch.compile of the convolution stack (CUDA speed form): fuses the bias/activation/cast kernels
        # between the cuDNN convolutions
        self._features: Any = self._features_channels_last
        if compiled == "features":
            self._features = CompiledOrEager(self._features_channels_last, dynamic=False,
                                             recompile_limit=FIXED_SHAPE_COMPILES)
        # u8 / 255 as numpy computes it (a table: a device division by a scalar may round differently)
        self.register_buffer("u8_to_unit", torch.from_numpy(np.arange(256, dtype=np.float32) / np.float32(255.0)),
                             persistent=False)
        self._lse: Any = lse_topk_candidates
        if head == "lse_compiled":
            self._lse = CompiledOrEager(lse_topk_candidates, dynamic=False,
                                        recompile_limit=FIXED_SHAPE_COMPILES)
        self._passing = (CompiledOrEager(lse_passing_mask, dynamic=False, recompile_limit=FIXED_SHAPE_COMPILES)
                         if head == "lse_nonzero" else None)

    @property
    def threshold(self) -> float:
        return float(self.threshold_t)

    def set_threshold(self, threshold: float) -> None:
        """A new threshold for the next frames: written into the buffer the graphs read (in place, so a
        captured CUDA graph replays with it)."""
        if not threshold > 0:
            raise ValueError("threshold must be > 0")
        self.threshold_t.fill_(float(threshold))

    def _features_channels_last(self, image0: torch.Tensor, image1: torch.Tensor, mask0: torch.Tensor,
                                mask1: torch.Tensor, valid: tuple[tuple[int, int], tuple[int, int]],
                                extent: tuple[int, int] | None = None,
                                edges: dict[str, Edge] | None = None) -> dict[str, torch.Tensor]:
        """net.features with the fine maps channels-last: the fine level gathers pixel rows of them
        (gather_windows), a view then instead of a relayout of both full maps every frame (H200, 832²: 1.1 ms).
        Free where the FPN's last convolution already writes channels-last (the CUDA speed form).

        `extent` (rows, cols): run the network on that top-left part of the canvas only (`network_extent`),
        with the far-field `edges` of that crop (`EloftrNet.far_field_edges`). The transformer's maps are
        zero-padded back to the canvas; the fine maps too when columns were cropped (the fine level's cell
        ids count canvas columns), else they keep the crop's rows, past every row the fine windows read."""
        side = image0.shape[-1]
        if extent is not None and extent != (side, side):
            rows, cols = extent
            stride = self.cfg.coarse_stride
            feats = self.net.features(image0[..., :rows, :cols], image1[..., :rows, :cols],
                                      mask0[:, :rows // stride, :cols // stride],
                                      mask1[:, :rows // stride, :cols // stride], valid=valid, edges=edges)
            padded = [("transformer0", side // stride), ("transformer1", side // stride)]
            if cols < side:
                padded += [("feat_f0", side), ("feat_f1", side)]
            for k, full in padded:
                x = feats[k]
                feats[k] = F.pad(x, (0, full - x.shape[-1], 0, full - x.shape[-2]))
        else:
            feats = self.net.features(image0, image1, mask0, mask1, valid=valid)
        for k in ("feat_f0", "feat_f1"):
            feats[k] = feats[k].contiguous(memory_format=torch.channels_last)
        return feats

    def network_extent(self, shape0: tuple[int, ...], shape1: tuple[int, ...]) -> tuple[int, int] | None:
        """(rows, cols) of the canvas the network runs on when `reach_crop`: the larger valid region of the two
        images plus the backbone's edge reach (`RepVGGBackbone.edge_reach`), in multiples of the canvas
        granule (None: the canvas, also when the two canvases differ, or when both sides would be cropped). A
        1280x720 camera (832x448 in a 832² canvas) runs 832x512 with the released model."""
        s0, s1 = max(shape0[0], shape0[1]), max(shape1[0], shape1[1])
        if not self.reach_crop or s0 != s1:
            return None
        granule, reach = self.cfg.canvas_multiple, self.net.backbone.edge_reach()

        def side(valid: int) -> int:
            return min(s0, -(-(valid + reach) // granule) * granule)

        rows, cols = side(max(shape0[0], shape1[0])), side(max(shape0[1], shape1[1]))
        return (rows, cols) if (rows < s0) != (cols < s0) else None

    def edges_for(self, side: int, extent: tuple[int, int] | None, device: torch.device
                  ) -> dict[str, Edge] | None:
        """The far-field edges of a run on `extent` of the canvas, made once per (canvas, crop, precision
        context) — by a capture's warm-up, so a capture only reads them."""
        if extent is None:
            return None
        key = (side, extent, device, torch.is_autocast_enabled(device.type))
        if key not in self._edges:
            self._edges[key] = self.net.far_field_edges(side, extent[0], extent[1], device)
        return self._edges[key]

    def head_block(self, shape: tuple[int, ...], side: int) -> tuple[int, int]:
        """(rows, cols) of coarse cells the log-space head runs on for a stage-2 image of `shape` whose canvas
        has `side` cells a side: its valid cells with `head_on_valid_cells`, else the whole canvas."""
        if not self.head_on_valid_cells:
            return side, side
        _, rows, cols = self.canvas_geometry(shape[0], shape[1])
        return rows, cols

    def canvas_geometry(self, h: int, w: int) -> tuple[int, int, int]:
        """-> (canvas side, valid coarse rows, valid coarse cols) of an h x w stage-2 image."""
        stride = self.cfg.coarse_stride
        return max(h, w), -(-h // stride), -(-w // stride)

    def crop_sizes(self, shape0: tuple[int, ...], shape1: tuple[int, ...]) -> tuple[tuple[int, int], tuple[int, int]]:
        """The transformer's crops (CoarseTransformer.valid_size's rule) from the image shapes, on the host."""
        a0, a1 = self.cfg.agg_size0, self.cfg.agg_size1
        _, r0, c0 = self.canvas_geometry(shape0[0], shape0[1])
        _, r1, c1 = self.canvas_geometry(shape1[0], shape1[1])
        return (r0 // a0 * a0, c0 // a0 * a0), (r1 // a1 * a1, c1 // a1 * a1)

    def stage1_rgb(self, rgb: torch.Tensor) -> torch.Tensor:
        """uint8 [..., H,W,3] camera images -> the stage-2 RGB images (`preprocess.stage2_rgb`), on rgb's
        device, bit for bit: OpenCV's INTER_AREA and torch's antialiased bilinear replayed tap by tap
        (preprocess.py). A stack of images runs each step once for all (half the kernels for a pair)."""
        from .preprocess import plan_stage1

        if self.stage1 is None:
            return rgb
        h, w = int(rgb.shape[-3]), int(rgb.shape[-2])
        plan = plan_stage1(w, h, self.stage1)
        if not plan.steps:
            return rgb
        if not plan.device:
            raise ValueError(f"stage 1 of a {w}x{h} image runs on the host (stage2_rgb)")
        if self.stage1_kernel and rgb.is_cuda and resample_kernel() is not None:
            return self._stage1_fused(rgb.contiguous(), plan.steps)
        x = rgb.to(torch.float32)
        scaled = False
        for taps_h, taps_w, kind in plan.steps:
            if kind == "aa" and not scaled:
                x, scaled = x / 255.0, True  # numpy's float32 division: IEEE on every device
            fma = kind == "aa" and self.stage1_fma
            x = self._resample(x, taps_w, -2, fma)  # width first, as both host kernels do
            x = self._resample(x, taps_h, -3, fma)
        if not scaled:
            x = x / 255.0
        return (x * 255.0).to(torch.uint8)  # truncation, as the host's astype(uint8)

    def _resample(self, x: torch.Tensor, taps: Any, dim: int, fma: bool) -> torch.Tensor:
        return replay_taps(x, taps, dim, fma, self._taps)

    def _stage1_fused(self, rgb: torch.Tensor, steps: Any) -> torch.Tensor:
        """stage1_rgb's arithmetic as one Triton kernel per resampled axis, in stage1_rgb's order: the /255 on
        the first antialiased pass's inputs (else after the last pass), the uint8 cast in the last."""
        resample = resample_kernel().resample
        passes = [(taps, dim, kind) for taps_h, taps_w, kind in steps
                  for taps, dim in ((taps_w, -2), (taps_h, -3)) if taps is not None]
        first_aa = next((n for n, (_, _, kind) in enumerate(passes) if kind == "aa"), None)
        x = rgb
        for n, (taps, dim, kind) in enumerate(passes):
            index, weight, _ = tap_tables(taps, x.device, self._taps, int32=True)
            last = n == len(passes) - 1
            x = resample(x, index, weight, dim, kind == "aa" and self.stage1_fma, divide_first=n == first_aa,
                         to_u8=last, divide_last=last and first_aa is None)
        return x

    def model_input(self, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [H,W,3] -> (image [1,1,S,S] float32 in [0,1], mask [1,S/8,S/8] bool), as preprocess.py."""
        h, w = rgb.shape[0], rgb.shape[1]
        s, rows, cols = self.canvas_geometry(h, w)
        c = rgb.to(torch.int32)
        # Pillow "L" (a floor division, not >>: ONNX shifts only unsigned integers; equal for these values)
        weighted = 19595 * c[..., 0] + 38470 * c[..., 1] + 7471 * c[..., 2] + 0x8000
        luma = torch.div(weighted, 65536, rounding_mode="floor")
        image = F.pad(self.u8_to_unit[luma.long()], (0, s - w, 0, s - h))[None, None]
        n = s // self.cfg.coarse_stride
        grid = torch.arange(n, device=rgb.device)
        mask = (grid[:, None] < rows) & (grid[None, :] < cols)
        return image, mask[None]

    # CUDA-graph support: the shapes fix everything (the valid region is the image itself)
    def capture_key(self, inputs: dict[str, Any]) -> tuple[Any, ...]:
        return (tuple(np.shape(inputs["rgb0"])), tuple(np.shape(inputs["rgb1"])))

    @contextlib.contextmanager
    def static_crop(self, inputs: dict[str, Any]) -> Iterator[None]:
        yield  # forward() already takes its crop sizes from the shapes

    def forward(self, rgb0: torch.Tensor, rgb1: torch.Tensor) -> torch.Tensor:
        state = self.front(rgb0, rgb1)
        cap = self.cap_of(self.stage2_shape(rgb0))
        if self._passing is not None and int(state[-1][0, 0]) > cap:  # eager only (the export has no lse head)
            state = self.keep_most_confident(state, cap)
        return self.back(state, cap)

    def over_cap(self, header: np.ndarray, cap: int) -> bool:
        """Whether a frame (front's header on the host) needs `keep_most_confident` before `back`."""
        return self._passing is not None and int(header[0, 0]) > cap

    def keep_most_confident(self, state: tuple[torch.Tensor, ...], cap: int) -> tuple[torch.Tensor, ...]:
        """front()'s state of a frame over the cap (lse head) -> the same state selecting the most confident
        matches. Writes into front's own buffers (a captured front's static outputs, which back reads)."""
        sim, lse_row, lse_col, passed, cells0, cells1 = state[5:11]
        i_ids, j_ids, mconf = keep_most_confident_lse(sim, lse_row, lse_col, passed, self.threshold_t, cap)
        for buf, new in zip(state[2:5], (cells0[i_ids], cells1[j_ids], mconf)):
            buf.copy_(new)
        return state

    def stage2_shape(self, rgb: Any) -> tuple[int, ...]:
        """The shape front() works at for an input of rgb's shape (after stage 1 on the device, if any)."""
        from .preprocess import plan_stage1

        shape = tuple(rgb.shape)
        if self.stage1 is None:
            return shape
        w2, h2 = plan_stage1(int(shape[1]), int(shape[0]), self.stage1).out_wh
        return (h2, w2, *shape[2:])

    def cap_of(self, shape0: tuple[int, ...]) -> int:
        """The most matches a frame keeps (a frame with more says so in its header): max_matches for the
        log-space mask head, which passes any number per image0 cell at low thresholds; for the top-K heads
        (the CPU's, the export's) also at most one row per image0 cell, the export's fixed output size, whose
        fine level runs on every row of it."""
        if self._passing is not None:
            return self.max_matches
        s = max(shape0[0], shape0[1]) // self.cfg.coarse_stride
        return min(self.max_matches, s * s)

    # The two halves of forward(). A CUDA-graph runner (torch backend) captures `front` once per image size
    # and `back` once per row bucket (`rows_for`), reading the matches count in between: the fine level
    # costs per row, padded or not (H200, 832²: ~6 ms for all 10,816 rows), so a frame pays for its matches
    # only. The exported graph (one fixed shape for ONNX/TensorRT) is forward(): every row up to the cap.
    def front(self, rgb0: torch.Tensor, rgb1: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """-> (feat_f0, feat_f1, i_ids, j_ids, mconf [cap], header [1, 7]): everything before the fine level.
        The lse head inserts its (sim, lse_row, lse_col, passed, cells0, cells1) before the header (at 5..10), for
        `keep_most_confident`: they exist anyway, so a captured front keeps them at no cost."""
        cfg = self.cfg
        if rgb0.shape == rgb1.shape and self.stage2_shape(rgb0) != tuple(rgb0.shape):  # a pair to resample: once
            rgb0, rgb1 = self.stage1_rgb(torch.stack([rgb0, rgb1])).unbind(0)
        else:
            rgb0, rgb1 = self.stage1_rgb(rgb0), self.stage1_rgb(rgb1)
        image0, mask0 = self.model_input(rgb0)
        image1, mask1 = self.model_input(rgb1)
        extent = self.network_extent(tuple(rgb0.shape), tuple(rgb1.shape))
        feats = self._features(image0, image1, mask0, mask1,
                               valid=self.crop_sizes(tuple(rgb0.shape), tuple(rgb1.shape)), extent=extent,
                               edges=self.edges_for(image0.shape[-1], extent, image0.device))
        t0, t1 = feats["transformer0"], feats["transformer1"]
        cap = self.cap_of(tuple(rgb0.shape))  # rgb0 is stage 2 here
        if self._passing is not None:
            b0, m0, cells0 = valid_cell_block(t0, mask0, self.head_block(tuple(rgb0.shape), t0.shape[-1]))
            b1, m1, cells1 = valid_cell_block(t1, mask1, self.head_block(tuple(rgb1.shape), t1.shape[-1]))
            with tf32_head(t0) as split:
                sim, lse_row, lse_col, passed, count = self._passing(
                    b0, b1, m0, m1, cfg.dsmax_temperature, cfg.d_model, cfg.border_rm, self.threshold_t, split)
            i_ids, j_ids, mconf, count, truncated = select_passing(sim, lse_row, lse_col, passed, count, cap)
            i_ids, j_ids = cells0[i_ids], cells1[j_ids]  # block cells -> canvas cells (padding rows stay 0)
            selection: tuple[torch.Tensor, ...] = (sim, lse_row, lse_col, passed, cells0, cells1)
        else:
            if self.head_kind == "dsmax":  # the original's head (bit-exact on the CPU)
                conf = dual_softmax_confidence(t0, t1, mask0, mask1, cfg.dsmax_temperature, cfg.d_model)
                cand_j, cand_conf = topk_candidates(conf, mask1, cfg.border_rm, cfg.candidates_per_cell)
                del conf
            else:
                with tf32_head(t0) as split:
                    cand_j, cand_conf = self._lse(t0, t1, mask0, mask1, cfg.dsmax_temperature, cfg.d_model,
                                                  cfg.border_rm, cfg.candidates_per_cell, split)
            i_ids, j_ids, mconf, count, truncated = select_on_device(cand_j, cand_conf, mask0, mask1,
                                                                     self.threshold_t, cfg.border_rm, cap)
            selection = ()
        header = torch.stack([count.float(), truncated.float(), torch.full_like(count, cap, dtype=torch.float32)])
        header = F.pad(header, (0, len(PRODUCT_COLUMNS) - 3))[None]
        return (feats["feat_f0"], feats["feat_f1"], i_ids, j_ids, mconf, *selection, header)

    def back(self, state: tuple[torch.Tensor, ...], rows: int) -> torch.Tensor:
        """front()'s state -> `matches` [1 + rows, 7]: the fine level on the first `rows` selected rows."""
        feat_f0, feat_f1, i_ids, j_ids, mconf, header = *state[:5], state[-1]
        i_ids, j_ids, mconf = i_ids[:rows], j_ids[:rows], mconf[:rows]
        # the fine level in fixed chunks: its memory stays bounded whatever the cap
        parts = [self.fine(feat_f0, feat_f1, i_ids[a:a + FINE_CHUNK], j_ids[a:a + FINE_CHUNK])
                 for a in range(0, rows, FINE_CHUNK)]
        mk0 = torch.cat([p[0] for p in parts], 0)
        mk1 = torch.cat([p[1] for p in parts], 0)
        body = torch.cat([i_ids[:, None].float(), j_ids[:, None].float(), mk0.float(), mk1.float(),
                          mconf[:, None].float()], 1)
        return torch.cat([header, body], 0)

    @staticmethod
    def row_buckets(cap: int) -> list[int]:
        """Row counts `back` is captured for, below the cap, and the cap: powers of two from 64 to 1024, then
        four steps an octave, so a frame's padded rows stay under a quarter of its matches (whole octaves cost
        up to 2x: 8,905 matches ran 16,384 rows, +1.5 ms on an H100 at 832²)."""
        rows, r = [], 64
        while r < cap:
            rows.append(r)
            r = r * 2 if r < 1024 else r + (1 << (r.bit_length() - 1)) // 4
        return rows + [cap]

    def rows_for(self, header: np.ndarray, cap: int) -> int:
        """The smallest row bucket that holds a frame's matches (header: front()'s count row)."""
        needed = min(int(header[0, 0]), cap)
        return next(r for r in self.row_buckets(cap) if r >= needed)


def _taps_key(taps: Any, device: torch.device) -> tuple[Any, ...]:
    return (device, taps.index.shape, hash(taps.index.tobytes()), hash(taps.weight.tobytes()))


def tap_tables(taps: Any, device: torch.device, cache: dict[tuple[Any, ...], torch.Tensor], int32: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(index int64, or int32 with `int32`; weight float32; weight float64) of preprocess.Taps on `device`, from
    `cache` (made on first use: a capture's warm-up makes them, so nothing is copied from the host while
    capturing). The tables' bytes are hashed once a call."""
    key = _taps_key(taps, device)
    if key not in cache:
        cache[key] = torch.from_numpy(taps.index).to(device)
        cache[key + ("w",)] = torch.from_numpy(taps.weight).to(device)
        cache[key + ("w64",)] = cache[key + ("w",)].double()
        cache[key + ("i32",)] = cache[key].int()
    return cache[key + ("i32",) if int32 else key], cache[key + ("w",)], cache[key + ("w64",)]


def replay_taps(x: torch.Tensor, taps: Any, dim: int, fma: bool, cache: dict[tuple[Any, ...], torch.Tensor]
                ) -> torch.Tensor:
    """One axis of a separable resize (preprocess.Taps) on x's device: out = sum over t of x[index[:, t]] *
    weight[:, t], accumulated in t order in float32, each step rounded once (`fma`) or twice (product, then
    sum) as the host kernel does. `cache` holds the tables on the device (made before a capture)."""
    if taps is None:
        return x
    index, weight, weight64 = tap_tables(taps, x.device, cache)
    shape = [1] * x.dim()
    shape[dim] = -1
    out = x.index_select(dim, index[:, 0]) * weight[:, 0].view(shape)
    for t in range(1, index.shape[1]):
        term = x.index_select(dim, index[:, t])
        if fma:  # one rounding of a*w + acc: the product is exact in float64, the sum rounded there, then float32
            out = torch.addcmul(out.double(), term.double(), weight64[:, t].view(shape)).float()
        else:  # two roundings: separate kernels (a fused multiply-add would round once)
            out = out + term * weight[:, t].view(shape)
    return out


@functools.lru_cache(maxsize=1)
def host_aa_uses_fma() -> bool:
    """Whether this host's torch accumulates its antialiased resize with fused multiply-adds (its AVX2/AVX-512
    kernels do, the generic ones do not; a torch build may differ): asked of the kernel itself, on a small
    input whose two roundings differ, once per process."""
    from .preprocess import _aa_bilinear_taps

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 97, 64, generator=g)
    host = F.interpolate(x[None], size=(64, 64), mode="bilinear", align_corners=False, antialias=True)[0]
    taps = _aa_bilinear_taps(97, 64)
    cache: dict[tuple[Any, ...], torch.Tensor] = {}
    if torch.equal(replay_taps(x, taps, 1, True, cache), host):
        return True
    if not torch.equal(replay_taps(x, taps, 1, False, cache), host):
        log.warning("stage 1 on the device: neither accumulation reproduces this torch's antialiased resize; "
                    "the device's stage-2 images may differ from the host's by one grey level at a few pixels")
    return False


@contextlib.contextmanager
def tf32_head(features: torch.Tensor) -> Iterator[bool]:
    """CUDA fp16 runs (autocast on): TF32 matmuls while the matching head runs, which then multiplies in the
    split form (`_similarity_lse`, near-fp32 accuracy); yields whether. fp32 runs and the CPU: False, unchanged."""
    if not (features.is_cuda and torch.is_autocast_enabled("cuda")):
        yield False
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
