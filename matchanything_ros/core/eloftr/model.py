"""ELoFTR network of MatchAnything in PyTorch, split into the two export graphs.

Module and parameter names follow the released checkpoint (`backbone.*`, `loftr_coarse.layers.*`,
`fine_preprocess.*`), so `EloftrNet.load_state_dict(..., strict=True)` accepts it after the
`matcher.` prefix is stripped. The numerics follow the official code path (docs/eloftr.md, "What the original does"):

* `EloftrCoarse` ("coarse" graph): backbone -> coarse transformer -> dual-softmax confidence ->
  per image0 cell the top-K cells of image1 (or the full confidence matrix when `exact_full_conf`),
  plus the full-resolution fine feature maps.
* `EloftrFine` ("fine" graph): fine windows of the selected cell pairs -> sub-pixel keypoints in
  canvas pixels (with the original's -3.5 px convention and its off-by-one 3x3 regression window).

Selection (threshold, border removal, ordering) is host numpy code in `postprocess.py`, shared by
every backend.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import EloftrConfig

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# RepVGG backbone
# ----------------------------------------------------------------------------------------------


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, padding: int, eps: float) -> nn.Sequential:
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, kernel, stride, padding, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(cout, eps=eps))
    return seq


def _fold_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    assert bn.running_var is not None and bn.running_mean is not None
    std = (bn.running_var + bn.eps).sqrt()
    t = (bn.weight / std).reshape(-1, 1, 1, 1)
    return kernel * t, bn.bias - bn.running_mean * bn.weight / std


def _conv_bn_parts(seq: nn.Sequential) -> tuple[torch.Tensor, nn.BatchNorm2d]:
    conv, bn = seq.conv, seq.bn
    assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
    return conv.weight, bn


class RepVGGBlock(nn.Module):
    """relu(BN(conv3x3 x) + BN(conv1x1 x) [+ BN(x)]): the multi-branch form the checkpoint holds.

    `fuse()` re-parameterises it into one 3x3 conv with bias (equal up to float rounding).
    """

    def __init__(self, cin: int, cout: int, stride: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.cin, self.cout, self.stride = cin, cout, stride
        self.rbr_dense = _conv_bn(cin, cout, 3, stride, 1, eps)
        self.rbr_1x1 = _conv_bn(cin, cout, 1, stride, 0, eps)
        self.rbr_identity = nn.BatchNorm2d(cin, eps=eps) if cin == cout and stride == 1 else None
        self.rbr_reparam: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rbr_reparam is not None:
            return F.relu(self.rbr_reparam(x))
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return F.relu(out)

    @torch.no_grad()
    def fuse(self) -> None:
        if self.rbr_reparam is not None:
            return
        k3, b3 = _fold_bn(*_conv_bn_parts(self.rbr_dense))
        k1, b1 = _fold_bn(*_conv_bn_parts(self.rbr_1x1))
        kernel = k3 + F.pad(k1, (1, 1, 1, 1))
        bias = b3 + b1
        if self.rbr_identity is not None:
            ident = torch.zeros_like(k3)
            idx = torch.arange(self.cin)
            ident[idx, idx, 1, 1] = 1.0
            ki, bi = _fold_bn(ident, self.rbr_identity)
            kernel, bias = kernel + ki, bias + bi
        conv = nn.Conv2d(self.cin, self.cout, 3, self.stride, 1, bias=True).to(kernel.device)
        conv.weight.copy_(kernel)
        assert conv.bias is not None
        conv.bias.copy_(bias)
        self.rbr_reparam = conv
        del self.rbr_dense, self.rbr_1x1
        self.rbr_identity = None


class RepVGGBackbone(nn.Module):
    """RepVGG_8_1_align: layer0 (stride 2), layer1 (stride 1), layer2 (stride 2), layer3 (stride 2).

    Returns (feats_c 1/8, feats_x2 1/4, feats_x1 1/2).
    """

    def __init__(self, cfg: EloftrConfig) -> None:
        super().__init__()
        d0, d1, d2 = cfg.block_dims
        n1, n2, n3 = cfg.layer_depths
        eps = cfg.bn_eps
        self.layer0 = RepVGGBlock(1, d0, 2, eps)
        self.layer1 = nn.Sequential(*[RepVGGBlock(d0, d0, 1, eps) for _ in range(n1)])
        self.layer2 = nn.Sequential(RepVGGBlock(d0, d1, 2, eps), *[RepVGGBlock(d1, d1, 1, eps) for _ in range(n2 - 1)])
        self.layer3 = nn.Sequential(RepVGGBlock(d1, d2, 2, eps), *[RepVGGBlock(d2, d2, 1, eps) for _ in range(n3 - 1)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x1 = self.layer1(self.layer0(x))
        x2 = self.layer2(x1)
        x3 = self.layer3(x2)
        return x3, x2, x1


def fuse_repvgg(module: nn.Module) -> nn.Module:
    """Re-parameterise every RepVGG block of `module` in place (speed form); returns `module`."""
    for m in module.modules():
        if isinstance(m, RepVGGBlock):
            m.fuse()
    return module


# ----------------------------------------------------------------------------------------------
# Coarse transformer
# ----------------------------------------------------------------------------------------------


class RotaryEncoding2d(nn.Module):
    """2-D RoPE on the pooled grid: 1-based row/col positions, interleaved per frequency.

    Tables are computed exactly like the original (float32 over the full max grid, then rounded
    to float16 when `fp16_tables`), kept at half size (before the pairwise duplication).
    """

    sin_half: torch.Tensor
    cos_half: torch.Tensor

    def __init__(self, d_model: int, max_grid: int, npe: tuple[int, int, int, int], fp16_tables: bool) -> None:
        super().__init__()
        shape = (max_grid, max_grid)
        i_pos = torch.ones(shape).cumsum(0).float().unsqueeze(-1)
        j_pos = torch.ones(shape).cumsum(1).float().unsqueeze(-1)
        train_h, train_w, test_h, test_w = npe
        i_pos, j_pos = i_pos * train_h / test_h, j_pos * train_w / test_w
        div_term = torch.exp(torch.arange(0, d_model // 4, 1).float() * (-math.log(10000.0) / (d_model // 4)))
        div_term = div_term[None, None, :]
        dtype = torch.float16 if fp16_tables else torch.float32
        sin = torch.zeros(*shape, d_model // 2, dtype=dtype)
        cos = torch.zeros(*shape, d_model // 2, dtype=dtype)
        sin[:, :, 0::2] = torch.sin(i_pos * div_term).to(dtype)
        sin[:, :, 1::2] = torch.sin(j_pos * div_term).to(dtype)
        cos[:, :, 0::2] = torch.cos(i_pos * div_term).to(dtype)
        cos[:, :, 1::2] = torch.cos(j_pos * div_term).to(dtype)
        self.register_buffer("sin_half", sin, persistent=False)
        self.register_buffer("cos_half", cos, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, h, w, C] -> x*cos + rotate_half(x)*sin."""
        # explicit sizes instead of repeat_interleave/unflatten(-1)/flatten(-2): the ONNX (TorchScript)
        # exporter turns those into reshapes with wrong constant sizes once h, w are dynamic
        n, h, w, c = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        cos = self.cos_half[:h, :w].unsqueeze(-1).expand(-1, -1, -1, 2).reshape(h, w, c).to(x.dtype)
        sin = self.sin_half[:h, :w].unsqueeze(-1).expand(-1, -1, -1, 2).reshape(h, w, c).to(x.dtype)
        pairs = x.reshape(n, h, w, c // 2, 2)
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).reshape(n, h, w, c)
        return x * cos + rotated * sin


class AggregatedAttentionLayer(nn.Module):
    """One ELoFTR encoder layer: aggregated (pooled) attention + MLP on the full-resolution map."""

    def __init__(self, cfg: EloftrConfig) -> None:
        super().__init__()
        c = cfg.d_model
        self.nhead, self.head_dim = cfg.nhead, c // cfg.nhead
        self.agg_size0, self.agg_size1 = cfg.agg_size0, cfg.agg_size1
        self.aggregate = nn.Conv2d(c, c, cfg.agg_size0, stride=cfg.agg_size0, bias=False, groups=c)
        self.q_proj = nn.Linear(c, c, bias=False)
        self.k_proj = nn.Linear(c, c, bias=False)
        self.v_proj = nn.Linear(c, c, bias=False)
        self.merge = nn.Linear(c, c, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(2 * c, 2 * c, bias=False), nn.LeakyReLU(cfg.mlp_leaky_slope), nn.Linear(2 * c, c, bias=False)
        )
        self.norm1 = nn.LayerNorm(c)
        self.norm2 = nn.LayerNorm(c)
        self.use_sdpa = False  # speed option; the default is the original's explicit softmax attention

    def forward(self, x: torch.Tensor, source: torch.Tensor, rope: RotaryEncoding2d | None) -> torch.Tensor:
        n, c, h, w = x.shape
        query = self.norm1(self.aggregate(x).permute(0, 2, 3, 1))
        kv = self.norm1(F.max_pool2d(source, self.agg_size1, self.agg_size1).permute(0, 2, 3, 1))
        q, k, v = self.q_proj(query), self.k_proj(kv), self.v_proj(kv)
        if rope is not None:
            q, k = rope(q), rope(k)
        hq, wq = q.shape[1], q.shape[2]
        q = q.reshape(n, -1, self.nhead, self.head_dim)  # [N, Lq, H, D]
        k = k.reshape(n, -1, self.nhead, self.head_dim)
        v = v.reshape(n, -1, self.nhead, self.head_dim)
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            out = out.transpose(1, 2)
        else:  # the original's einsum form (same reduction order on CPU: bit-identical results)
            scores = torch.einsum("nlhd,nshd->nlsh", q, k)
            attn = torch.softmax((1.0 / self.head_dim**0.5) * scores, dim=2)
            out = torch.einsum("nlsh,nshd->nlhd", attn, v)
        msg = self.merge(out.reshape(n, -1, c))
        msg = msg.reshape(n, hq, wq, c).permute(0, 3, 1, 2)
        # size= (not scale_factor=) exports cleanly; the source-coordinate ratio is the same exact 1/agg
        msg = F.interpolate(msg, size=(h, w), mode="bilinear", align_corners=False)
        msg = self.mlp(torch.cat([x, msg], dim=1).permute(0, 2, 3, 1))
        return x + self.norm2(msg).permute(0, 3, 1, 2)


class CoarseTransformer(nn.Module):
    """Self/cross layers on the valid (unpadded) region of both coarse maps.

    As the original (batch 1 with masks): both maps are cropped to the valid rows/cols counted in
    the masks, floored to multiples of the aggregation size, all layers run on the crops, and the
    result is zero-padded back (padded positions are exactly 0). The crop sizes depend only on the
    masks' sums; in eager mode they become Python ints (see docs/eloftr.md on export).
    """

    def __init__(self, cfg: EloftrConfig) -> None:
        super().__init__()
        self.layer_names = cfg.layer_names
        self.agg_size0, self.agg_size1 = cfg.agg_size0, cfg.agg_size1
        self.layers = nn.ModuleList([AggregatedAttentionLayer(cfg) for _ in cfg.layer_names])
        self.rope = (RotaryEncoding2d(cfg.d_model, cfg.rope_max_grid, cfg.npe, cfg.rope_fp16_tables)
                     if cfg.rope else None)
        # ((h0, w0), (h1, w1)) crop sizes computed on the host, set while a CUDA graph is captured:
        # reading them from the device masks would synchronise, which a capture forbids
        self.fixed_valid: tuple[tuple[int, int], tuple[int, int]] | None = None

    @staticmethod
    def valid_size(mask: torch.Tensor, multiple: int) -> tuple[int, int]:
        if torch.jit.is_tracing():  # ONNX export: keep the crop data-dependent (0-dim tensors, not constants)
            r = torch.div(mask[0].sum(-2)[0], multiple, rounding_mode="floor") * multiple
            c = torch.div(mask[0].sum(-1)[0], multiple, rounding_mode="floor") * multiple
            return r, c  # type: ignore[return-value]
        rows = int(mask[0].sum(-2)[0])  # valid rows, counted in column 0 (as the original)
        cols = int(mask[0].sum(-1)[0])  # valid cols, counted in row 0
        return rows // multiple * multiple, cols // multiple * multiple

    def forward(
        self, feat0: torch.Tensor, feat1: torch.Tensor, mask0: torch.Tensor, mask1: torch.Tensor,
        valid: tuple[tuple[int, int], tuple[int, int]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        H0, W0 = feat0.shape[-2:]
        H1, W1 = feat1.shape[-2:]
        if valid is None:
            valid = self.fixed_valid
        if valid is not None:  # crop sizes known on the host (no device read of the masks)
            (h0, w0), (h1, w1) = valid
        else:
            h0, w0 = self.valid_size(mask0, self.agg_size0)
            h1, w1 = self.valid_size(mask1, self.agg_size1)
        f0, f1 = feat0[:, :, :h0, :w0], feat1[:, :, :h1, :w1]
        for layer, name in zip(self.layers, self.layer_names):
            if name == "self":
                f0 = layer(f0, f0, self.rope)
                f1 = layer(f1, f1, self.rope)
            else:  # cross: image1 attends to the already-updated image0 (sequential, as the original)
                f0 = layer(f0, f1, None)
                f1 = layer(f1, f0, None)
        f0 = F.pad(f0, (0, W0 - w0, 0, H0 - h0))
        f1 = F.pad(f1, (0, W1 - w1, 0, H1 - h1))
        return f0, f1


# ----------------------------------------------------------------------------------------------
# Fine feature pyramid
# ----------------------------------------------------------------------------------------------


class FinePreprocess(nn.Module):
    """FPN from the (normalised) coarse features and the backbone's 1/4, 1/2 maps to full resolution."""

    def __init__(self, cfg: EloftrConfig) -> None:
        super().__init__()
        d0, d1, d2 = cfg.block_dims
        slope = cfg.fpn_leaky_slope
        self.layer3_outconv = nn.Conv2d(d2, d2, 1, bias=False)
        self.layer2_outconv = nn.Conv2d(d1, d2, 1, bias=False)
        self.layer2_outconv2 = nn.Sequential(
            nn.Conv2d(d2, d2, 3, padding=1, bias=False), nn.BatchNorm2d(d2, eps=cfg.bn_eps), nn.LeakyReLU(slope),
            nn.Conv2d(d2, d1, 3, padding=1, bias=False),
        )
        self.layer1_outconv = nn.Conv2d(d0, d1, 1, bias=False)
        self.layer1_outconv2 = nn.Sequential(
            nn.Conv2d(d1, d1, 3, padding=1, bias=False), nn.BatchNorm2d(d1, eps=cfg.bn_eps), nn.LeakyReLU(slope),
            nn.Conv2d(d1, d0, 3, padding=1, bias=False),
        )

    def forward(self, feat_c: torch.Tensor, x2: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        up = _up2(self.layer3_outconv(feat_c))
        x2 = _up2(self.layer2_outconv2(self.layer2_outconv(x2) + up))
        x1 = self.layer1_outconv2(self.layer1_outconv(x1) + x2)
        # coarse stride 8 = backbone 1/2 map upsampled once more to full resolution
        return _up2(x1)


def _up2(x: torch.Tensor) -> torch.Tensor:
    """Bilinear x2 (align_corners=False), by size: same ratio as scale_factor=2, and exports cleanly."""
    return F.interpolate(x, size=(2 * x.shape[-2], 2 * x.shape[-1]), mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------------------------
# The whole network (checkpoint layout) and the two export graphs
# ----------------------------------------------------------------------------------------------


# fp16 precision islands: name -> the modules kept in fp32. "fpn": the fine FPN; "fpn_backbone12": also the
# backbone's layers 0-2 (the 1/2 and 1/4 maps the FPN reads); "fpn_backbone": the whole backbone too.
FP32_ISLANDS: dict[str, tuple[str, ...]] = {
    "none": (),
    "fpn": ("fine_preprocess",),
    "fpn_backbone12": ("fine_preprocess", "backbone.layer0", "backbone.layer1", "backbone.layer2"),
    "fpn_backbone": ("fine_preprocess", "backbone.layer0", "backbone.layer1", "backbone.layer2", "backbone.layer3"),
}


class EloftrNet(nn.Module):
    """Holds the parameters under the checkpoint's names. Use the graph modules to run it."""

    def __init__(self, cfg: EloftrConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = RepVGGBackbone(cfg)
        self.loftr_coarse = CoarseTransformer(cfg)
        self.fine_preprocess = FinePreprocess(cfg)

    channels_last = False  # speed form: convolution maps in channels-last memory layout
    # CUDA fp16: the parts kept in fp32 (weights and arithmetic) for the fine level's sake, see FP32_ISLANDS
    fp32_island = "none"

    def store_half_weights(self, fp32_island: str = "fpn", explicit_casts: bool = False) -> "EloftrNet":
        """fp16 runs: convolution/linear weights stored in fp16 once, so autocast casts nothing per run.

        Normalisation parameters stay fp32 (autocast runs layer norm in fp32). The modules of
        `fp32_island` keep fp32 weights and run in fp32 under autocast: the fine-level argmax compares
        near-equal similarities of the maps they produce.

        `explicit_casts`: for a run without autocast (an fp16 ONNX export, traced on the CPU), the graph
        itself casts into and out of the fp32 islands (`_backbone`, `features`, `_fine_maps`), and each
        layer norm casts its input to fp32 and its output back to fp16, as autocast runs it.
        """
        if fp32_island not in FP32_ISLANDS:
            raise ValueError(f"fp32_island must be one of {tuple(FP32_ISLANDS)}, got {fp32_island!r}")
        self.fp32_island = fp32_island
        self.explicit_casts = explicit_casts
        if explicit_casts:  # the exporter folds an unfused BatchNorm into its conv with an fp32 bias, which an
            fuse_repvgg(self.backbone)  # fp16 conv cannot take: fuse in fp32 first, then store in fp16
        keep = FP32_ISLANDS[fp32_island]
        for name, module in self.named_modules():
            if any(name == k or name.startswith(k + ".") for k in keep):
                continue
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.half()
            elif explicit_casts and isinstance(module, nn.LayerNorm):
                module.register_forward_pre_hook(lambda _m, args: (args[0].float(),))
                module.register_forward_hook(lambda _m, _args, out: out.half())
        return self

    # no autocast (fp16 export): the casts at the fp32 islands' borders are in the graph (store_half_weights)
    explicit_casts = False

    def _in_fp32(self, part: str, x: torch.Tensor) -> bool:
        return (x.is_cuda or self.explicit_casts) and part in FP32_ISLANDS[self.fp32_island]

    def _as_for(self, part: str, x: torch.Tensor) -> torch.Tensor:
        """Without autocast: `x` in the dtype of `part`'s weights (fp32 in an island, else fp16)."""
        if not self.explicit_casts:
            return x
        return x.float() if part in FP32_ISLANDS[self.fp32_island] else x.half()

    def _backbone(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = self.backbone
        if self.explicit_casts:  # each layer's input cast to its weights' dtype: one Cast per island border
            x1 = b.layer1(self._as_for("backbone.layer1", b.layer0(self._as_for("backbone.layer0", x))))
            x2 = b.layer2(self._as_for("backbone.layer2", x1))
            return b.layer3(self._as_for("backbone.layer3", x2)), x2, x1
        if not self._in_fp32("backbone.layer0", x):
            return self.backbone(x)
        with torch.autocast("cuda", enabled=False):
            x1 = b.layer1(b.layer0(x.float()))
            x2 = b.layer2(x1)
        if self._in_fp32("backbone.layer3", x):
            with torch.autocast("cuda", enabled=False):
                return b.layer3(x2), x2, x1
        return b.layer3(x2), x2, x1

    def to_speed_form(self) -> "EloftrNet":
        """Fused RepVGG, SDPA attention, channels-last convolutions (in place; not bit-exact)."""
        fuse_repvgg(self.backbone)
        self.set_sdpa(True)
        self.channels_last = True
        self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # supported, not in the stubs
        return self

    def set_sdpa(self, enabled: bool) -> None:
        for layer in self.loftr_coarse.layers:
            assert isinstance(layer, AggregatedAttentionLayer)
            layer.use_sdpa = enabled

    def features(
        self, image0: torch.Tensor, image1: torch.Tensor, mask0: torch.Tensor, mask1: torch.Tensor,
        valid: tuple[tuple[int, int], tuple[int, int]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Backbone + transformer + fine FPN; every intermediate the parity tests look at.

        `valid`: the transformer's crop sizes when the caller knows them on the host (see CoarseTransformer).
        """
        if self.channels_last:
            image0 = image0.contiguous(memory_format=torch.channels_last)
            image1 = image1.contiguous(memory_format=torch.channels_last)
        if image0.shape == image1.shape:  # the original batches the pair when sizes agree
            c, x2, x1 = self._backbone(torch.cat([image0, image1], 0))
            c0, c1 = c[:1], c[1:]
            x2_0, x2_1, x1_0, x1_1 = x2[:1], x2[1:], x1[:1], x1[1:]
        else:
            c0, x2_0, x1_0 = self._backbone(image0)
            c1, x2_1, x1_1 = self._backbone(image1)
        if self.explicit_casts:  # the transformer is never an fp32 island: fp16 in, fp16 out
            c0, c1 = c0.half(), c1.half()
        t0, t1 = self.loftr_coarse(c0, c1, mask0, mask1, valid)
        norm = self.cfg.d_model**0.5  # the original's norm_fpnfeat (a Python constant: exports cleanly)
        if self._in_fp32("fine_preprocess", t0):
            # fp32 island: the fine-level argmax compares near-equal similarities of these maps
            with torch.autocast("cuda", enabled=False):
                ff0, ff1 = self._fine_maps(t0.float(), t1.float(), x2_0.float(), x2_1.float(), x1_0.float(),
                                           x1_1.float(), norm)
        else:
            ff0, ff1 = self._fine_maps(t0, t1, x2_0, x2_1, x1_0, x1_1, norm)
        return {"feats_c0": c0, "feats_c1": c1, "feats_x2_0": x2_0, "feats_x2_1": x2_1, "feats_x1_0": x1_0,
                "feats_x1_1": x1_1, "transformer0": t0, "transformer1": t1, "feat_f0": ff0, "feat_f1": ff1}

    def _fine_maps(self, t0: torch.Tensor, t1: torch.Tensor, x2_0: torch.Tensor, x2_1: torch.Tensor,
                   x1_0: torch.Tensor, x1_1: torch.Tensor, norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        if self.explicit_casts:  # the FPN's inputs in its weights' dtype (fp32 when it is an island)
            t0, t1, x2_0, x2_1, x1_0, x1_1 = (self._as_for("fine_preprocess", x)
                                              for x in (t0, t1, x2_0, x2_1, x1_0, x1_1))
        if t0.shape == t1.shape:
            f = self.fine_preprocess(_fpn_input(t0, t1, scale=norm), torch.cat([x2_0, x2_1], 0),
                                     torch.cat([x1_0, x1_1], 0))
            ff0, ff1 = f[:1], f[1:]
        else:
            ff0 = self.fine_preprocess(_fpn_input(t0, scale=norm), x2_0, x1_0)
            ff1 = self.fine_preprocess(_fpn_input(t1, scale=norm), x2_1, x1_1)
        return ff0, ff1


def _flat_cells(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, H*W, C] (explicit reshape: the ONNX exporter loses flatten's rank after a pad)."""
    return x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)


def _fpn_input(*maps: torch.Tensor, scale: float) -> torch.Tensor:
    """Coarse maps / sqrt(C) laid out as the original hands them to the FPN.

    The original flattens to [N, L, C], normalises, concatenates and views back to NCHW, so the
    FPN's first conv sees channels-last strides; convolution kernels round differently per memory
    layout, and this layout keeps the fine features bit-identical with the original on CPU.
    """
    n, c, h, w = maps[0].shape
    flat = torch.cat([_flat_cells(m) / scale for m in maps], 0)  # [N, L, C] contiguous
    return flat.reshape(len(maps) * n, h, w, c).permute(0, 3, 1, 2)


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


class CompiledOrEager:
    """`torch.compile(fn)`, falling back to `fn` for good if compiling fails (e.g. a torch without Triton,
    as some Jetson wheels are), said once in the log. The first call is a warm-up run outside any CUDA
    graph capture, so the choice is made before a capture."""

    def __init__(self, fn: Any, dynamic: bool) -> None:
        self.fn = fn
        self.compiled: Any = torch.compile(fn, dynamic=dynamic)
        self.fallback = ""  # why this runs uncompiled ("" while compiled): Matcher.info shows it

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                # a recompile limit hit raises here instead of silently running eager from then on
                with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                    return self.compiled(*args, **kwargs)
            except torch.OutOfMemoryError:
                raise  # not a compiler failure: the eager function would need the memory too
            except Exception as exc:  # noqa: BLE001  (any compiler failure: the eager function is the same maths)
                name = getattr(self.fn, "__name__", str(self.fn))
                self.fallback = f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                log.warning("torch.compile of %s failed (%s); running it uncompiled", name, self.fallback)
                self.compiled = None
        return self.fn(*args, **kwargs)


def compile_fallbacks(module: Any) -> list[str]:
    """The `CompiledOrEager` parts of a graph (attributes of it and of its submodules) that fell back to eager."""
    if not isinstance(module, nn.Module):
        return []
    return [v.fallback for m in module.modules() for v in vars(m).values()
            if isinstance(v, CompiledOrEager) and v.fallback]


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
# matching heads of the product graph: the original's dual softmax + top-K (exact on the CPU; the export's);
# its log-sum-exp form + top-K, eager or compiled; the log-sum-exp form as a mask + fixed-size nonzero
PRODUCT_HEADS = ("dsmax", "lse", "lse_compiled", "lse_nonzero")
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
                 fine: str = "exact", compiled: str = "none", stage1: Any = None) -> None:
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
        # the host's kernel for the antialiased step: fused multiply-adds where torch runs its AVX2/AVX-512 build
        self.stage1_fma = torch.backends.cpu.get_cpu_capability() != "DEFAULT"
        self._taps: dict[tuple[Any, ...], torch.Tensor] = {}  # stage-1 tables on the device, made before capture
        # the threshold is a buffer, read by the compiled and captured code as an input: a new threshold is
        # written in place (`set_threshold`) without recompiling or re-capturing anything
        self.register_buffer("threshold_t", torch.tensor(float(threshold), dtype=torch.float32), persistent=False)
        self.head_kind = head
        self.fine = EloftrFine(net.cfg, fast=fine != "exact", compiled=fine == "fast_compiled")
        # torch.compile of the convolution stack (CUDA speed form): fuses the bias/activation/cast kernels
        # between the cuDNN convolutions
        self._features: Any = self._features_channels_last
        if compiled == "features":
            self._features = CompiledOrEager(self._features_channels_last, dynamic=False)
        # u8 / 255 as numpy computes it (a table: a device division by a scalar may round differently)
        self.register_buffer("u8_to_unit", torch.from_numpy(np.arange(256, dtype=np.float32) / np.float32(255.0)),
                             persistent=False)
        self._lse: Any = lse_topk_candidates
        if head == "lse_compiled":
            self._lse = CompiledOrEager(lse_topk_candidates, dynamic=False)
        self._passing = CompiledOrEager(lse_passing_mask, dynamic=False) if head == "lse_nonzero" else None

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
                                mask1: torch.Tensor, valid: tuple[tuple[int, int], tuple[int, int]]
                                ) -> dict[str, torch.Tensor]:
        """net.features with the fine maps channels-last: the fine level gathers pixel rows of them
        (gather_windows), a view then instead of a relayout of both full maps every frame (H200, 832²: 1.1 ms).
        Free where the FPN's last convolution already writes channels-last (the CUDA speed form)."""
        feats = self.net.features(image0, image1, mask0, mask1, valid=valid)
        for k in ("feat_f0", "feat_f1"):
            feats[k] = feats[k].contiguous(memory_format=torch.channels_last)
        return feats

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
        """uint8 [H,W,3] camera image -> the stage-2 RGB image (`preprocess.stage2_rgb`), on rgb's device,
        bit for bit: OpenCV's INTER_AREA and torch's antialiased bilinear replayed tap by tap (preprocess.py)."""
        from .preprocess import plan_stage1

        if self.stage1 is None:
            return rgb
        plan = plan_stage1(int(rgb.shape[1]), int(rgb.shape[0]), self.stage1)
        if not plan.steps:
            return rgb
        if not plan.device:
            raise ValueError(f"stage 1 of a {rgb.shape[1]}x{rgb.shape[0]} image runs on the host (stage2_rgb)")
        x = rgb.to(torch.float32)
        scaled = False
        for taps_h, taps_w, kind in plan.steps:
            if kind == "aa" and not scaled:
                x, scaled = x / 255.0, True  # numpy's float32 division: IEEE on every device
            fma = kind == "aa" and self.stage1_fma
            x = self._resample(x, taps_w, 1, fma)  # width first, as both host kernels do
            x = self._resample(x, taps_h, 0, fma)
        if not scaled:
            x = x / 255.0
        return (x * 255.0).to(torch.uint8)  # truncation, as the host's astype(uint8)

    def _resample(self, x: torch.Tensor, taps: Any, dim: int, fma: bool) -> torch.Tensor:
        if taps is None:
            return x
        key = (x.device, taps.index.shape, hash(taps.index.tobytes()), hash(taps.weight.tobytes()))
        if key not in self._taps:  # (a capture's warm-up makes them: no copy from the host while capturing)
            self._taps[key] = torch.from_numpy(taps.index).to(x.device)
            self._taps[key + ("w",)] = torch.from_numpy(taps.weight).to(x.device)
        index, weight = self._taps[key], self._taps[key + ("w",)]
        shape = [1] * x.dim()
        shape[dim] = -1
        out = x.index_select(dim, index[:, 0]) * weight[:, 0].view(shape)
        for t in range(1, index.shape[1]):
            term = x.index_select(dim, index[:, t])
            w = weight[:, t].view(shape)
            if fma:  # one rounding of a*w + acc: exact product and sum in float64, then float32
                out = (term.double() * w.double() + out.double()).float()
            else:
                out = out + term * w
        return out

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
        sim, lse_row, lse_col, passed = state[5:9]
        i_ids, j_ids, mconf = keep_most_confident_lse(sim, lse_row, lse_col, passed, self.threshold_t, cap)
        for buf, new in zip(state[2:5], (i_ids, j_ids, mconf)):
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
        """At most one row per image0 cell (and max_matches): a frame with more says so in its header."""
        s = max(shape0[0], shape0[1]) // self.cfg.coarse_stride
        return min(self.max_matches, s * s)

    # The two halves of forward(). A CUDA-graph runner (torch backend) captures `front` once per image size
    # and `back` once per row bucket (`rows_for`), reading the matches count in between: the fine level
    # costs per row, padded or not (H200, 832²: ~6 ms for all 10,816 rows), so a frame pays for its matches
    # only. The exported graph (one fixed shape for ONNX/TensorRT) is forward(): every row up to the cap.
    def front(self, rgb0: torch.Tensor, rgb1: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """-> (feat_f0, feat_f1, i_ids, j_ids, mconf [cap], header [1, 7]): everything before the fine level.
        The lse head inserts its (sim, lse_row, lse_col, passed) before the header (at 5..8), for
        `keep_most_confident`: they exist anyway, so a captured front keeps them at no cost."""
        cfg = self.cfg
        rgb0, rgb1 = self.stage1_rgb(rgb0), self.stage1_rgb(rgb1)
        image0, mask0 = self.model_input(rgb0)
        image1, mask1 = self.model_input(rgb1)
        feats = self._features(image0, image1, mask0, mask1,
                               valid=self.crop_sizes(tuple(rgb0.shape), tuple(rgb1.shape)))
        t0, t1 = feats["transformer0"], feats["transformer1"]
        cap = self.cap_of(tuple(rgb0.shape))  # rgb0 is stage 2 here
        if self._passing is not None:
            with tf32_head(t0) as split:
                sim, lse_row, lse_col, passed, count = self._passing(
                    t0, t1, mask0, mask1, cfg.dsmax_temperature, cfg.d_model, cfg.border_rm, self.threshold_t, split)
            i_ids, j_ids, mconf, count, truncated = select_passing(sim, lse_row, lse_col, passed, count, cap)
            selection: tuple[torch.Tensor, ...] = (sim, lse_row, lse_col, passed)
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
        """Row counts `back` is captured for: powers of two from 64 below the cap, and the cap."""
        return [1 << k for k in range(6, cap.bit_length()) if 1 << k < cap] + [cap]

    def rows_for(self, header: np.ndarray, cap: int) -> int:
        """The smallest row bucket that holds a frame's matches (header: front()'s count row)."""
        needed = min(int(header[0, 0]), cap)
        return next(r for r in self.row_buckets(cap) if r >= needed)


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
