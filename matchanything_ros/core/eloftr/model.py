"""ELoFTR network of MatchAnything in PyTorch: RepVGG backbone, coarse transformer, fine FPN, in the exact form and
the fp16 / speed forms (the coarse/fine export graphs around it are graphs.py; the one-graph CUDA path product.py).

Module and parameter names follow the released checkpoint (`backbone.*`, `loftr_coarse.layers.*`,
`fine_preprocess.*`), so `EloftrNet.load_state_dict(..., strict=True)` accepts it after the
`matcher.` prefix is stripped. The numerics follow the official code path (docs/eloftr.md, "What the original does")."""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from .options import FP32_ISLANDS
from .config import EloftrConfig

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# RepVGG backbone
# ----------------------------------------------------------------------------------------------


# A cropped map's far-field term for one block, added to its pre-activation as values * where: values [1, C, 1, W]
# with where [1, 1, H, 1] one-hot at the crop's last row, or values [1, C, H, 1] with where [1, 1, 1, W] one-hot
# at its last column
Edge = tuple[torch.Tensor, torch.Tensor]
# how far the fine FPN's error at a crop's edge reaches back (canvas px): two 3x3 convolutions at 1/4 (8), the
# x2 upsampling from 1/4 (4), two at 1/2 (4), the upsampling from 1/2 (2), entering one 1/4 cell (4) before the
# edge, and the fine windows' 1-px ring past the valid region; rounded up
FPN_EDGE_REACH = 24


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

    def forward(self, x: torch.Tensor, edge: Edge | None = None) -> torch.Tensor:
        """`edge`: a cropped map's far-field term (`EloftrNet.far_field_edges`), added where the 3x3 taps read
        past the crop's last row or column, which the convolution's zero padding left out."""
        if self.rbr_reparam is not None:
            pre = self.rbr_reparam(x)
            return F.relu(pre if edge is None else torch.addcmul(pre, *edge))
        conv, bn = self.rbr_dense  # (the edge comes before the BatchNorm: it is a term of the convolution)
        dense = conv(x)
        if edge is not None:
            dense = torch.addcmul(dense, *edge)
        out = bn(dense) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return F.relu(out)

    def edge_kernel(self) -> torch.Tensor:
        """The 3x3 kernel whose taps reach a neighbouring row or column: the fused one, else the dense branch's
        (the 1x1 and identity branches read no neighbour)."""
        conv = self.rbr_reparam if self.rbr_reparam is not None else self.rbr_dense.conv
        assert isinstance(conv, nn.Conv2d)
        return conv.weight

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

    def forward(self, x: torch.Tensor, edges: dict[str, Edge] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x1 = self.run_layer("layer1", self.run_layer("layer0", x, edges), edges)
        x2 = self.run_layer("layer2", x1, edges)
        x3 = self.run_layer("layer3", x2, edges)
        return x3, x2, x1

    def run_layer(self, name: str, x: torch.Tensor, edges: dict[str, Edge] | None = None) -> torch.Tensor:
        """One of layer0..layer3; `edges` by block name ("layer1.0", ...), see RepVGGBlock.forward."""
        layer = getattr(self, name)
        if not edges:  # called as a module: the exported graph's node names stay /layer1/layer1.0/...
            return layer(x)
        named = [(name, layer)] if isinstance(layer, RepVGGBlock) else [(f"{name}.{i}", b) for i, b in enumerate(layer)]
        for block_name, block in named:
            x = block(x, edges.get(block_name))
        return x

    def edge_reach(self) -> int:
        """Canvas pixels past the valid region that a crop of the network must keep when its stride-1 blocks
        get far-field edges (`EloftrNet.far_field_edges`). A block's edge is exact when its input row past the
        crop lies beyond the reach of every valid pixel (`fwd`: the receptive field so far, each 3x3 tap one
        input sample); where it is not, its error stays within the reach of the blocks after it (`back`) plus
        its own output spacing of the crop's edge, which must stay clear of the valid region. The fine FPN
        runs on the crop with zero padding and clamped upsampling at its edge: that error reaches
        FPN_EDGE_REACH. Released model: 63 px (instead of the 127 px of its whole receptive field)."""
        n1, n2, n3 = (len(self.layer1), len(self.layer2), len(self.layer3))
        # (input spacing, output spacing) of each block in order; a stride-1 block gets an edge
        blocks = ([(1, 2)] + [(2, 2)] * n1 + [(2, 4)] + [(4, 4)] * (n2 - 1) + [(4, 8)] + [(8, 8)] * (n3 - 1))
        reach = [s_in for s_in, _ in blocks]
        need = FPN_EDGE_REACH
        for k, (s_in, s_out) in enumerate(blocks):
            if s_in == s_out:
                need = max(need, min(sum(reach[:k]), sum(reach[k + 1:]) + s_out))
        return need


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

    def _backbone(self, x: torch.Tensor, edges: dict[str, Edge] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = self.backbone
        if self.explicit_casts:  # each layer's input cast to its weights' dtype: one Cast per island border
            x0 = b.run_layer("layer0", self._as_for("backbone.layer0", x), edges)
            x1 = b.run_layer("layer1", self._as_for("backbone.layer1", x0), edges)
            x2 = b.run_layer("layer2", self._as_for("backbone.layer2", x1), edges)
            return b.run_layer("layer3", self._as_for("backbone.layer3", x2), edges), x2, x1
        if not self._in_fp32("backbone.layer0", x):
            return b(x, edges)
        with torch.autocast("cuda", enabled=False):
            x1 = b.run_layer("layer1", b.run_layer("layer0", x.float(), edges), edges)
            x2 = b.run_layer("layer2", x1, edges)
        if self._in_fp32("backbone.layer3", x):
            with torch.autocast("cuda", enabled=False):
                return b.run_layer("layer3", x2, edges), x2, x1
        return b.run_layer("layer3", x2, edges), x2, x1

    @torch.no_grad()
    def far_field_edges(self, side: int, rows: int, cols: int, device: torch.device) -> dict[str, Edge]:
        """The edges (RepVGGBlock.forward) of a run on the top-left rows x cols of a side x side canvas whose
        pixels past the valid region are zero, one of rows, cols < side (`RepVGGBackbone.edge_reach`).

        Past the reach of every valid pixel, a block's input is the same as with an all-zero canvas: the far
        field, which depends on the canvas alone. Its row (or column) just past the crop, through the kernel's
        taps that reach it, is what the zero padding at the crop's edge left out of the crop's last row. Made
        from a run of the backbone on a zero canvas in the caller's precision context (autocast, fp32
        islands), each block's term in the dtype its convolution runs in."""
        if not (rows < side) ^ (cols < side):
            raise ValueError(f"far-field edges need one side of the crop cropped: {rows}x{cols} of {side}")
        # block -> (its input's row or column just past the crop, the crop's rows or columns at its resolution)
        past: dict[str, tuple[torch.Tensor, int]] = {}

        def keep_past(name: str, x: torch.Tensor) -> None:
            spacing = side // x.shape[-1]
            r, c = rows // spacing, cols // spacing
            # a copy: a view would keep the whole map alive through the run
            past[name] = (x[:, :, r:r + 1, :c].clone(), r) if rows < side else (x[:, :, :r, c:c + 1].clone(), c)

        hooks = [block.register_forward_pre_hook(lambda _m, args, name=name: keep_past(name, args[0]))
                 for name, block in self.backbone.named_modules()
                 if isinstance(block, RepVGGBlock) and block.stride == 1]
        zero = torch.zeros(1, 1, side, side, device=device)
        if self.channels_last:
            zero = zero.contiguous(memory_format=torch.channels_last)
        try:
            self._backbone(zero)
        finally:
            for hook in hooks:
                hook.remove()
        edges: dict[str, Edge] = {}
        for name, (far, length) in past.items():
            block = self.backbone.get_submodule(name)
            assert isinstance(block, RepVGGBlock)
            kernel = block.edge_kernel()
            with torch.autocast(device.type, enabled=False):  # the block's own dtype, set explicitly
                if rows < side:  # the row past the crop through the kernel's bottom taps
                    values = F.conv2d(far.to(kernel.dtype), kernel[:, :, 2:, :], padding=(0, 1))
                    where = torch.zeros(1, 1, length, 1, dtype=kernel.dtype, device=device)
                    where[:, :, -1] = 1
                else:  # the column past the crop through the kernel's right taps
                    values = F.conv2d(far.to(kernel.dtype), kernel[:, :, :, 2:], padding=(1, 0))
                    where = torch.zeros(1, 1, 1, length, dtype=kernel.dtype, device=device)
                    where[..., -1] = 1
            edges[name] = (values, where)
        return edges

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
        valid: tuple[tuple[int, int], tuple[int, int]] | None = None, edges: dict[str, Edge] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Backbone + transformer + fine FPN; every intermediate the parity tests look at.

        `valid`: the transformer's crop sizes when the caller knows them on the host (see CoarseTransformer).
        `edges`: the images are a crop of their canvas; the backbone's far-field edges (`far_field_edges`).
        """
        if self.channels_last:
            image0 = image0.contiguous(memory_format=torch.channels_last)
            image1 = image1.contiguous(memory_format=torch.channels_last)
        if image0.shape == image1.shape:  # the original batches the pair when sizes agree
            c, x2, x1 = self._backbone(torch.cat([image0, image1], 0), edges)
            c0, c1 = c[:1], c[1:]
            x2_0, x2_1, x1_0, x1_1 = x2[:1], x2[1:], x1[:1], x1[1:]
        else:
            c0, x2_0, x1_0 = self._backbone(image0, edges)
            c1, x2_1, x1_1 = self._backbone(image1, edges)
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
