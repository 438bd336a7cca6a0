"""The MatchAnything-RoMa network in PyTorch: dense warp + certainty from two preprocessed images.

Structure and parameter names follow the released checkpoint (`matcher.model.` + these names):
`encoder.cnn.layers.*` (VGG19-BN features[:40]) and `decoder.*` (projections, GP, embedding
decoder, ConvRefiners). DINOv2 is a separate module (`dinov2`, Meta's file). Behaviour follows
`shared/reference/roma/SPEC.md` section 1.4-1.5: symmetric batch [A, B] vs [B, A], pass 1 at the
coarse size (scales 16..1), pass 2 at the upsample size (scales 8..1, VGG only), certainty
attenuation, sigmoid, out-of-range zeroing, clamp.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import refiner_kernel
from .dinov2 import Block, DinoV2ViTL14
from .gp import GaussianProcessMatch, GpSolver
from .refiner_kernel import bias_relu_nhwc_, fused_depthwise_bias_relu, kernel_runs_here, resolve_mode


CLS_RES = 64  # classification grid of the embedding decoder (64 x 64 cells)
REFINE_INIT = 4.0
DISP_EMB_SCALE = 40 / 32
# scale -> (input channels of its ConvRefiner, displacement-embedding channels, local-corr radius)
REFINER_DIMS: dict[str, tuple[int, int, int]] = {
    "16": (2 * 512 + 128 + (2 * 7 + 1) ** 2, 128, 7),
    "8": (2 * 512 + 64 + (2 * 3 + 1) ** 2, 64, 3),
    "4": (2 * 256 + 32 + (2 * 2 + 1) ** 2, 32, 2),
    "2": (2 * 64 + 16, 16, 0),
    "1": (2 * 9 + 6, 6, 0),
}
# scale -> (input channels, output channels) of its 1x1 conv + BN projection
PROJ_DIMS: dict[str, tuple[int, int]] = {"16": (1024, 512), "8": (512, 512), "4": (256, 256), "2": (128, 64),
                                         "1": (64, 9)}
PASS1_SCALES = ("16", "8", "4", "2", "1")
PASS2_SCALES = ("8", "4", "2", "1")
VGG_MAXPOOL_INDICES = (6, 13, 26, 39)


def fp32_region(x: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    """Disable autocast (AMP) for a block the original computes in fp32."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def pixel_centre_grid(h: int, w: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised pixel-centre coordinates [2, h, w] (channel 0 = x, 1 = y), align_corners=False convention."""
    ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=device, dtype=dtype)
    xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=device, dtype=dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy))


class VGG19BNFeatures(nn.Module):
    """torchvision vgg19_bn().features[:40]; returns the maps just before each max-pool (scales 1, 2, 4, 8)."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for cout, convs in ((64, 2), (128, 2), (256, 4), (512, 4)):
            for _ in range(convs):
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
                cin = cout
            layers.append(nn.MaxPool2d(2, 2))
        assert tuple(i for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)) == VGG_MAXPOOL_INDICES
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        feats: dict[int, torch.Tensor] = {}
        scale = 1
        for i, layer in enumerate(self.layers):
            if isinstance(layer, nn.MaxPool2d):
                feats[scale] = x
                scale *= 2
                if i == VGG_MAXPOOL_INDICES[-1]:
                    break  # the last pool's output is unused by the model
            x = layer(x)
        return feats


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cnn = VGG19BNFeatures()


class EmbeddingDecoder(nn.Module):
    """5 transformer blocks over concat(GP posterior, features) tokens -> 64x64 class logits + certainty."""

    def __init__(self, dim: int = 1024, depth: int = 5, heads: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, heads, qkv_bias=False, eps=1e-5, layer_scale=False)
                                     for _ in range(depth)])
        self.to_out = nn.Linear(dim, CLS_RES**2 + 1)

    def forward(self, gp_posterior: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat((gp_posterior.to(features.dtype), features), dim=1)
        b, c, h, w = x.shape
        tokens = x.reshape(b, c, h * w).permute(0, 2, 1)
        for blk in self.blocks:
            tokens = blk(tokens)
        out = self.to_out(tokens).permute(0, 2, 1).reshape(b, -1, h, w)
        return out[:, :-1], out[:, -1:]


def cls_to_flow_refine(cls: torch.Tensor, classes_last: bool | None = None) -> torch.Tensor:
    """Class logits [B, 4096, H, W] -> flow [B, 2, H, W]: probability-weighted mean of the argmax cell and its
    4 neighbours, indices clamped to [0, 4095] WITHOUT row-wrap handling (as the original).

    classes_last (default: on CUDA): softmax, argmax and gather over the last dimension of the transposed
    logits — the same maths; CUDA's softmax over dim 1 of this shape took 3.8 ms (H200, fp16), over the last
    dimension it is one fast pass. The CPU keeps the original's order of operations (parity)."""
    b, c, h, w = cls.shape
    res = CLS_RES
    g = pixel_centre_grid(res, res, cls.device, torch.float32).permute(1, 2, 0).reshape(c, 2).to(cls.dtype)
    if classes_last is None:
        classes_last = cls.is_cuda
    if classes_last:
        p = cls.permute(0, 2, 3, 1).softmax(dim=-1)  # [B, H, W, 4096]
        mode = p.max(dim=-1).indices
        index = torch.stack((mode - 1, mode, mode + 1, mode - res, mode + res), dim=-1).clamp(0, c - 1)
        neighbours = torch.gather(p, dim=-1, index=index).permute(0, 3, 1, 2)[..., None]  # [B, 5, H, W, 1]
        index = index.permute(0, 3, 1, 2)
    else:
        p = cls.softmax(dim=1)
        mode = p.max(dim=1).indices
        index = torch.stack((mode - 1, mode, mode + 1, mode - res, mode + res), dim=1).clamp(0, c - 1)
        neighbours = torch.gather(p, dim=1, index=index)[..., None]  # [B, 5, H, W, 1]
    coords = g[index]  # [B, 5, H, W, 2]
    flow = neighbours[:, 0] * coords[:, 0]
    for k in range(1, 5):
        flow = flow + neighbours[:, k] * coords[:, k]
    flow = flow / neighbours.sum(dim=1)
    return flow.permute(0, 3, 1, 2)


def local_correlation(f1: torch.Tensor, f2: torch.Tensor, flow: torch.Tensor, radius: int,
                      max_chunk_elems: int = 1 << 25) -> torch.Tensor:
    """[B, (2r+1)^2, h, w]: sum_c f1[c] * f2[c](flow + offset_k) / sqrt(C), offsets one feature pixel apart,
    window order y-major / x-minor, bilinear with zero padding (align_corners=False).

    Rows are processed in chunks so the sampled window (C x h x w x K) never exceeds max_chunk_elems."""
    b, c, h, w = f1.shape
    k = (2 * radius + 1) ** 2
    oy, ox = torch.meshgrid(
        torch.linspace(-2 * radius / h, 2 * radius / h, 2 * radius + 1, device=f1.device),
        torch.linspace(-2 * radius / w, 2 * radius / w, 2 * radius + 1, device=f1.device), indexing="ij")
    window = torch.stack((ox, oy), dim=-1).reshape(1, 1, 1, k, 2)
    coords = flow.permute(0, 2, 3, 1)[:, :, :, None, :].float() + window  # [B, h, w, K, 2]
    f1s = f1 / (c**0.5)
    rows = max(1, min(h, max_chunk_elems // max(1, c * w * k)))
    out = []
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        grid = coords[:, r0:r1].reshape(b, r1 - r0, w * k, 2).to(f2.dtype)
        win = F.grid_sample(f2, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        win = win.reshape(b, c, r1 - r0, w, k)
        out.append((f1s[:, :, r0:r1, :, None] * win).sum(dim=1))  # [B, rows, w, K]
    return torch.cat(out, dim=1).permute(0, 3, 1, 2)


def local_correlation_gathered(f1: torch.Tensor, f2: torch.Tensor, flow: torch.Tensor, radius: int,
                               max_chunk_elems: int = 1 << 24, fused: bool | None = None) -> torch.Tensor:
    """`local_correlation` computed the GPU-friendly way (speed form; same maths, other rounding).

    The window's offsets are whole feature pixels, so every sample of a pixel's window shares the
    bilinear fractions of its flow: correlate f1 with the (2r+2)^2 integer-position f2 vectors around
    floor(flow) (channels-last rows: contiguous, coalesced reads, zero outside the map as grid_sample's
    zero padding), then blend neighbouring products with the bilinear weights. It never materialises the
    C x h x w x (2r+1)^2 sampled window that grid_sample produces and re-reads. fused (None: on CUDA where Triton
    and the kernel run; RomaOptions.fused_window_dots): the products by one kernel (`window_dots`, fp32
    accumulation) instead of gathered windows times f1 in chunks of `max_chunk_elems`."""
    b, c, h, w = f1.shape
    n = 2 * radius + 2
    flow = flow.float()
    ix = ((flow[:, 0] + 1) * w - 1) / 2  # align_corners=False pixel coordinates in f2 (same size as f1)
    iy = ((flow[:, 1] + 1) * h - 1) / 2
    x0, y0 = ix.floor(), iy.floor()
    ax, ay = (ix - x0).reshape(b, h * w, 1, 1), (iy - y0).reshape(b, h * w, 1, 1)
    offs = torch.arange(-radius, radius + 2, device=f1.device, dtype=torch.float32)
    px = x0.reshape(b, h * w, 1, 1) + offs.reshape(1, 1, 1, n)
    py = y0.reshape(b, h * w, 1, 1) + offs.reshape(1, 1, n, 1)
    inside = (px >= 0) & (px < w) & (py >= 0) & (py < h)
    index = torch.where(inside, py * w + px, torch.full_like(px, h * w)).long().reshape(b, h * w * n * n)
    index = index + (h * w + 1) * torch.arange(b, device=f1.device)[:, None]  # rows of the flattened batch
    f2t = torch.cat((f2.permute(0, 2, 3, 1).reshape(b, h * w, c), f2.new_zeros(b, 1, c)), dim=1)  # + a zero row
    f2t = f2t.reshape(b * (h * w + 1), c)
    f1s = (f1 / (c**0.5)).permute(0, 2, 3, 1)
    if fused is None:
        fused = (f1.is_cuda and refiner_kernel.triton_available()
                 and refiner_kernel.kernel_runs_here("window_dots", f1.device))
    if fused:
        g = refiner_kernel.window_dots(f1s.reshape(b * h * w, c), f2t, index.reshape(b * h * w, n * n))
        g = g.reshape(b, h * w, n, n)
    else:
        f1t = f1s.reshape(b, h * w, c, 1)
        pixels = max(1, min(h * w, max_chunk_elems // max(1, b * n * n * c)))
        products = []
        for p0 in range(0, h * w, pixels):
            p1 = min(h * w, p0 + pixels)
            rows = index[:, p0 * n * n:p1 * n * n].reshape(-1)
            window = f2t.index_select(0, rows).reshape(b, p1 - p0, n * n, c)
            products.append((window @ f1t[:, p0:p1]).reshape(b, p1 - p0, n, n).float())
        g = torch.cat(products, dim=1)  # [b, h*w, n, n]: <f1(p), f2(floor(flow(p)) + (my, mx))> / sqrt(C)
    corr = ((1 - ay) * ((1 - ax) * g[:, :, :-1, :-1] + ax * g[:, :, :-1, 1:])
            + ay * ((1 - ax) * g[:, :, 1:, :-1] + ax * g[:, :, 1:, 1:]))  # [b, h*w, 2r+1, 2r+1], y-major
    return corr.reshape(b, h, w, (n - 1) ** 2).permute(0, 3, 1, 2)


def _refiner_block(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(dim, dim, 5, 1, 2, groups=dim), nn.BatchNorm2d(dim, momentum=0.01),
                         nn.ReLU(inplace=True), nn.Conv2d(dim, dim, 1, 1, 0))


class ConvRefiner(nn.Module):
    """Depth-wise conv refiner: concat(f1, warped f2, displacement embedding, local corr) -> (dflow, dcert)."""

    def __init__(self, in_dim: int, emb_dim: int, radius: int, hidden_blocks: int = 8) -> None:
        super().__init__()
        self.radius = radius
        self.channels_last = False  # speed-form option: NHWC convolutions
        self.gathered_correlation = False  # speed form: local_correlation_gathered ...
        self.window_dots = True  # ... with its products by the `window_dots` kernel where it runs
        # speed form on CUDA: "triton" / "inductor" = each block's depthwise conv + bias + ReLU (+ the previous
        # 1x1 conv's bias) as one fused kernel (refiner_kernel.py); None = cuDNN. Needs folded BatchNorms.
        self.fused_depthwise: str | None = None
        self.channel_pad = 0  # speed form: zero channels appended to the blocks' input (pad_channels)
        self.block1 = _refiner_block(in_dim)
        self.hidden_blocks = nn.Sequential(*[_refiner_block(in_dim) for _ in range(hidden_blocks)])
        self.out_conv = nn.Conv2d(in_dim, 3, 1, 1, 0)
        self.disp_emb = nn.Conv2d(2, emb_dim, 1, 1, 0)

    def forward(self, f1: torch.Tensor, f2: torch.Tensor, flow: torch.Tensor,
                scale_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self.refine([self.blocks_input(f1, f2, flow, scale_factor)])

    def blocks_input(self, f1: torch.Tensor, f2: torch.Tensor, flow: torch.Tensor,
                     scale_factor: float) -> torch.Tensor:
        """concat(f1, f2 warped by the flow, displacement embedding, local correlation) [B, C, h, w]."""
        b, _, h, w = f1.shape
        x_hat = F.grid_sample(f2, flow.permute(0, 2, 3, 1).to(f2.dtype), mode="bilinear", padding_mode="zeros",
                              align_corners=False)
        grid_a = pixel_centre_grid(h, w, f1.device)[None].expand(b, 2, h, w)
        emb = self.disp_emb((DISP_EMB_SCALE * scale_factor * (flow - grid_a)).to(f1.dtype))
        parts = [f1, x_hat, emb]
        if self.radius:
            if self.gathered_correlation:
                corr = local_correlation_gathered(f1, f2, flow, self.radius, fused=None if self.window_dots else False)
            else:
                corr = local_correlation(f1, f2, flow, self.radius)
            parts.append(corr.to(f1.dtype))
        if self.channel_pad:
            parts.append(f1.new_zeros(b, self.channel_pad, h, w))
        x = torch.cat(parts, dim=1)
        del parts, x_hat, emb  # before the channels-last copy: the memory peak of the scale
        if self.channels_last or (self.fused_depthwise == "cudnn_nhwc" and x.is_cuda):
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def refine(self, held: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks and the output conv on [blocks_input] -> (dflow, dcertainty). The list is emptied: the
        input (the largest map of the scale) is freed as soon as the first block has read it (memory peak)."""
        if self.fused_depthwise is not None and held[0].is_cuda:
            d = self._fused_blocks(held, self.fused_depthwise)
        else:
            d = self.hidden_blocks(self.block1(held.pop()))
        with fp32_region(d):  # the original runs out_conv outside autocast, in fp32
            d = self.out_conv(d.float())
        # NCHW (3 channels, small): the flow and certainty updates after it mix it with NCHW maps, which from
        # channels-last memory runs torch's slow generic kernels
        d = d.contiguous()
        return d[:, :-1], d[:, -1:]

    def blocks(self) -> list[nn.Sequential]:
        return [self.block1, *self.hidden_blocks]  # type: ignore[list-item]

    def pad_channels(self, multiple: int) -> int:
        """Speed form (folded BatchNorms): round the blocks' channel count up to `multiple` with zero channels,
        so the 1x1 convs get aligned GEMMs (1377/1137/569 channels give cuDNN/cuBLAS unaligned, slower kernels).
        The extra channels stay exactly 0 (zero weights and biases; ReLU(0) = 0) and add exact zeros to the
        real ones. Returns the number of channels added."""
        blocks = self.blocks()
        first = blocks[0][0]
        assert isinstance(first, nn.Conv2d)
        c = int(first.in_channels)
        pad = (-c) % multiple
        if pad == 0:
            return 0
        if not all(isinstance(blk[1], nn.Identity) for blk in blocks):
            raise ValueError("pad_channels needs the BatchNorms folded (fold_batchnorms)")

        def grown(t: torch.Tensor, dims: tuple[int, ...]) -> nn.Parameter:
            sizes = list(t.shape)
            for d in dims:
                sizes[d] += pad
            out = t.new_zeros(sizes)
            out[tuple(slice(0, n) for n in t.shape)] = t.detach()
            return nn.Parameter(out, requires_grad=False)

        with torch.no_grad():
            for blk in blocks:
                dw, pw = blk[0], blk[3]
                assert isinstance(dw, nn.Conv2d) and isinstance(pw, nn.Conv2d)
                assert dw.bias is not None and pw.bias is not None
                dw.weight, dw.bias = grown(dw.weight, (0,)), grown(dw.bias, (0,))
                dw.in_channels = dw.out_channels = dw.groups = c + pad
                pw.weight, pw.bias = grown(pw.weight, (0, 1)), grown(pw.bias, (0,))
                pw.in_channels = pw.out_channels = c + pad
            self.out_conv.weight = grown(self.out_conv.weight, (1,))
            self.out_conv.in_channels = c + pad
        self.channel_pad += pad
        return pad

    def _fused_blocks(self, x: torch.Tensor | list[torch.Tensor], mode: str) -> torch.Tensor:
        """The blocks in a fused form. "cudnn_nhwc": channels-last, cuDNN's depthwise conv without bias, then
        bias + BatchNorm (unfolded, as the fp32 form keeps it) + ReLU in one in-place pass, then the 1x1 conv
        as a GEMM whose bias cuBLAS adds in its epilogue. Otherwise each block's depthwise conv + bias + ReLU
        is one kernel, and each 1x1 conv's bias is added by the next block's kernel (the last one keeps its
        own): a broadcast pass over the tensor saved per block. x: the input, or [input] to hand it over (it is
        freed once read). Each block's input is released before its 1x1 conv: two maps alive, not four."""
        if isinstance(x, list):
            x = x.pop()
        blocks = self.blocks()
        if mode == "cudnn_nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
            for dw, bn, _, pw in blocks:
                assert isinstance(dw, nn.Conv2d) and isinstance(pw, nn.Conv2d) and dw.bias is not None
                scale, shift = self._bn_affine(bn)
                # (cuDNN's fused conv + bias + ReLU, torch.cudnn_convolution_relu, measured 4x slower end to end)
                y = F.conv2d(x, dw.weight, None, 1, dw.padding, 1, dw.groups)
                del x
                bias_relu_nhwc_(y, dw.bias, scale, shift)
                x = F.linear(y.permute(0, 2, 3, 1), pw.weight.flatten(1), pw.bias).permute(0, 3, 1, 2)
                del y
            return x
        pending: torch.Tensor | None = None
        for i, (dw, _, _, pw) in enumerate(blocks):
            assert isinstance(dw, nn.Conv2d) and isinstance(pw, nn.Conv2d) and dw.bias is not None
            x = fused_depthwise_bias_relu(mode, x, dw.weight, dw.bias, pending)
            last = i == len(blocks) - 1
            x = F.conv2d(x, pw.weight, pw.bias if last else None)
            pending = None if last else pw.bias
        return x

    def _bn_affine(self, bn: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """An unfolded eval BatchNorm as fp32 (scale, shift), made once (on the eager warm-up before a capture);
        (None, None) for a folded one."""
        if not isinstance(bn, nn.BatchNorm2d):
            return None, None
        cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = self.__dict__.setdefault("_bn_affine_cache", {})
        found = cache.get(id(bn))
        if found is None or found[0].device != bn.weight.device:
            assert bn.running_var is not None and bn.running_mean is not None
            scale = (bn.weight.float() / torch.sqrt(bn.running_var.float() + bn.eps)).contiguous()
            found = cache[id(bn)] = (scale, (bn.bias.float() - bn.running_mean.float() * scale).contiguous())
        return found


class Decoder(nn.Module):
    def __init__(self, gp_solver: GpSolver = "inverse") -> None:
        super().__init__()
        self.embedding_decoder = EmbeddingDecoder()
        self.gps = nn.ModuleDict({"16": GaussianProcessMatch(512, gp_solver)})
        self.proj = nn.ModuleDict({s: nn.Sequential(nn.Conv2d(i, o, 1, 1), nn.BatchNorm2d(o))
                                   for s, (i, o) in PROJ_DIMS.items()})
        self.conv_refiner = nn.ModuleDict({s: ConvRefiner(i, e, r) for s, (i, e, r) in REFINER_DIMS.items()})


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold an eval-mode BatchNorm that follows `conv` into the conv's weight and bias (in place)."""
    assert bn.weight is not None and bn.bias is not None
    assert bn.running_mean is not None and bn.running_var is not None
    with torch.no_grad():
        scale = bn.weight.float() / torch.sqrt(bn.running_var.float() + bn.eps)
        bias = conv.bias.float() if conv.bias is not None else torch.zeros_like(scale)
        conv.weight.copy_((conv.weight.float() * scale.reshape(-1, 1, 1, 1)).to(conv.weight.dtype))
        new_bias = (bias - bn.running_mean.float()) * scale + bn.bias.float()
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype))
        else:
            conv.bias.copy_(new_bias.to(conv.bias.dtype))


def _fold_pairs(seq: nn.Sequential | nn.ModuleList) -> int:
    """Fold every Conv2d -> BatchNorm2d pair of `seq` (BN replaced by Identity); returns the number folded."""
    n = 0
    for i in range(len(seq) - 1):
        conv, bn = seq[i], seq[i + 1]
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            fold_batchnorm(conv, bn)
            seq[i + 1] = nn.Identity()
            n += 1
    return n


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    """Symmetric batch: the support side of [A, B] is [B, A]."""
    a, b = x.chunk(2)
    return torch.cat((b, a), dim=0)


class RomaNet(nn.Module):
    """Encoder + decoder (checkpoint part) + DINOv2 (separate file). `forward` is the fixed-shape "dense" graph."""

    def __init__(self, gp_solver: GpSolver = "inverse") -> None:
        super().__init__()
        self.encoder = Encoder()
        self.decoder = Decoder(gp_solver)
        self.dinov2 = DinoV2ViTL14()
        self.channels_last = False

    def set_gp_solver(self, solver: GpSolver) -> None:
        gp = self.decoder.gps["16"]
        assert isinstance(gp, GaussianProcessMatch)
        gp.solver = solver

    def half_weights(self, dtype: torch.dtype = torch.float16) -> "RomaNet":
        """Weights in fp16/bf16 for speed and memory, except what the original keeps in fp32 under AMP
        (GP incl. its Fourier embedding, refiner output convs). Not the exact (default) form."""
        self.to(dtype)
        self.decoder.gps.float()
        for refiner in self.decoder.conv_refiner.values():
            assert isinstance(refiner, ConvRefiner)
            refiner.out_conv.float()
        return self

    def fold_batchnorms(self) -> int:
        """Speed form: every BatchNorm folded into the conv before it (VGG, projections, refiner blocks).
        Not the exact form (one rounding more per weight); the state dict no longer matches the checkpoint."""
        n = _fold_pairs(self.encoder.cnn.layers)
        for proj in self.decoder.proj.values():
            assert isinstance(proj, nn.Sequential)
            n += _fold_pairs(proj)
        for refiner in self.decoder.conv_refiner.values():
            assert isinstance(refiner, ConvRefiner)
            n += _fold_pairs(refiner.block1)
            for block in refiner.hidden_blocks:
                assert isinstance(block, nn.Sequential)
                n += _fold_pairs(block)
        return n

    def use_gathered_correlation(self, window_dots: bool = True) -> "RomaNet":
        """Speed form: the refiners' local correlation by `local_correlation_gathered`; `window_dots`: its products
        by the Triton kernel where it runs (False: gathered windows and a batched GEMM)."""
        for refiner in self.decoder.conv_refiner.values():
            assert isinstance(refiner, ConvRefiner)
            refiner.gathered_correlation = True
            refiner.window_dots = window_dots
        return self

    def pad_refiner_channels(self, multiple: int = 8) -> int:
        """Speed form: every refiner's channels rounded up to `multiple` (ConvRefiner.pad_channels); after
        `fold_batchnorms`. Returns the channels added in all."""
        total = 0
        for refiner in self.decoder.conv_refiner.values():
            assert isinstance(refiner, ConvRefiner)
            total += refiner.pad_channels(multiple)
        return total

    def use_fused_depthwise(self, mode: str | None = "triton") -> str | None:
        """CUDA speed form: the refiner blocks in a fused form (`mode`, refiner_kernel.MODES: "cudnn_nhwc"
        channels-last with one bias + BatchNorm + ReLU pass, any BatchNorms; "triton" / "inductor" one fused
        depthwise kernel, folded BatchNorms only; None = cuDNN's modules). Call after `.to(device)` (and
        `fold_batchnorms` where needed). Falls back to cuDNN's modules (said once in the log) where Triton is
        missing or the kernel does not run on this device (`kernel_runs_here`); returns the mode in use."""
        device = next(self.decoder.parameters()).device
        mode = resolve_mode(mode, device)
        if mode is not None and not kernel_runs_here(mode, device):
            mode = None
        for refiner in self.decoder.conv_refiner.values():
            assert isinstance(refiner, ConvRefiner)
            if mode not in (None, "cudnn_nhwc") and not all(isinstance(blk[1], nn.Identity)
                                                             for blk in refiner.blocks()):
                raise ValueError("the fused depthwise kernel needs the BatchNorms folded (fold_batchnorms)")
            refiner.fused_depthwise = mode
            if mode == "cudnn_nhwc":  # cuDNN's NHWC depthwise kernels want their weights channels-last too
                for blk in refiner.blocks():
                    dw = blk[0]
                    assert isinstance(dw, nn.Conv2d)
                    dw.weight.data = dw.weight.data.contiguous(memory_format=torch.channels_last)
        return mode

    def use_channels_last(self) -> "RomaNet":
        """GPU speed form: NHWC convolutions (4-D weights and the conv inputs in channels_last)."""
        self.channels_last = True
        for p in self.parameters():
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
        for refiner in self.decoder.conv_refiner.values():
            assert isinstance(refiner, ConvRefiner)
            refiner.channels_last = True
        return self

    def checkpoint_modules(self) -> nn.Module:
        """The part whose state_dict is the released checkpoint (keys without `matcher.model.`)."""
        part = nn.Module()
        part.encoder = self.encoder
        part.decoder = self.decoder
        return part

    # --- decoder passes ------------------------------------------------------------------------
    def _decode(self, feats: dict[int, torch.Tensor], scales: tuple[str, ...], flow: torch.Tensor | None,
                certainty: torch.Tensor | None, scale_factor: float, record: dict[str, Any] | None,
                tag: str) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        dec = self.decoder
        h1, w1 = feats[1].shape[-2:]
        sizes = {s: feats[int(s)].shape[-2:] for s in scales}
        dino16 = feats.get(16)
        # every scale projected up front, each feature map dropped once projected: the scale-1 and -2 maps
        # shrink 7x and 2x, which lowers the memory peak at the fine refiners (same values)
        projected = {s: dec.proj[s](feats.pop(int(s))) for s in scales}
        out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, s in enumerate(scales):
            ins = int(s)
            f1 = projected.pop(s)
            f2 = _swap_halves(f1)
            if s == "16":
                with fp32_region(f1):  # GP in fp32 even under AMP, as the original
                    gp_post = dec.gps[s](f1.float(), f2.float())
                cls, certainty = dec.embedding_decoder(gp_post, f1)
                flow = cls_to_flow_refine(cls).float()
                certainty = certainty.float()
                if record is not None:
                    record.update(dino_feat16=dino16, proj16_f1=f1, gp_posterior16=gp_post,
                                  pass1_s16_gm_certainty=certainty, pass1_s16_gm_cls=cls)
            assert flow is not None and certainty is not None
            refiner = dec.conv_refiner[s]
            assert isinstance(refiner, ConvRefiner)
            held = [refiner.blocks_input(f1, f2, flow, scale_factor)]
            del f1, f2  # the blocks' input holds what they need: one map alive through the blocks
            d_flow, d_cert = refiner.refine(held)
            flow = flow + ins * torch.stack((d_flow[:, 0] / (REFINE_INIT * w1), d_flow[:, 1] / (REFINE_INIT * h1)),
                                            dim=1)
            certainty = certainty + d_cert
            out[ins] = (flow, certainty)
            if record is not None:
                record[f"{tag}_s{s}_flow"] = flow
                record[f"{tag}_s{s}_certainty"] = certainty
            if i + 1 < len(scales):
                size = sizes[scales[i + 1]]
                flow = F.interpolate(flow, size=size, mode="bilinear", align_corners=False)
                certainty = F.interpolate(certainty, size=size, mode="bilinear", align_corners=False)
        return out

    def forward_dense(self, coarse: torch.Tensor, fine: torch.Tensor,
                      record: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """coarse [2, 3, c, c] = [A, B], fine [2, 3, u, u] -> (warp [u, 2u, 4], certainty [u, 2u])."""
        c_h, c_w = coarse.shape[-2:]
        u_h, u_w = fine.shape[-2:]
        # pass 1: coarse size, DINOv2 + VGG
        cnn_dtype = next(self.encoder.parameters()).dtype
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        feats = self.encoder.cnn(coarse.to(cnn_dtype, memory_format=layout))
        feats[16] = self.dinov2(coarse.to(self.dinov2.pos_embed.dtype))
        p1 = self._decode(feats, PASS1_SCALES, None, None, 1.0, record, "pass1")
        del feats
        # pass 2: upsample size, VGG only, initialised from pass 1's finest flow/certainty
        scale_factor = math.sqrt(u_h * u_w / (c_h * c_w))
        feats = self.encoder.cnn(fine.to(cnn_dtype, memory_format=layout))
        size8 = feats[8].shape[-2:]
        flow0 = F.interpolate(p1[1][0], size=size8, mode="bilinear", align_corners=False)
        cert0 = F.interpolate(p1[1][1], size=size8, mode="bilinear", align_corners=False)
        p2 = self._decode(feats, PASS2_SCALES, flow0, cert0, scale_factor, record, "pass2")
        del feats
        # attenuation: where the coarse logit is negative, the final logit is raised by half its magnitude
        low = F.interpolate(p1[16][1], size=(u_h, u_w), mode="bilinear", align_corners=False)
        low = 0.5 * low * (low < 0)
        flow, logit = p2[1]
        certainty = (logit - low).sigmoid()[:, 0]  # [2, u, u]
        flow = flow.permute(0, 2, 3, 1)  # [2, u, u, 2]
        wrong = (flow.abs() > 1).any(dim=-1)
        certainty = torch.where(wrong, torch.zeros_like(certainty), certainty)
        flow = flow.clamp(-1, 1)
        grid = pixel_centre_grid(u_h, u_w, flow.device).permute(1, 2, 0)  # [u, u, 2]
        warp = torch.cat((torch.cat((grid, flow[0]), dim=-1), torch.cat((flow[1], grid), dim=-1)), dim=1)
        return warp, torch.cat((certainty[0], certainty[1]), dim=1)

    def forward(self, image0_coarse: torch.Tensor, image1_coarse: torch.Tensor, image0_fine: torch.Tensor,
                image1_fine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The "dense" graph: four [1, 3, S, S] images -> warp [1, u, 2u, 4], certainty [1, u, 2u]."""
        warp, certainty = self.forward_dense(torch.cat((image0_coarse, image1_coarse)),
                                             torch.cat((image0_fine, image1_fine)))
        return warp[None], certainty[None]


class RomaDenseGraph(nn.Module):
    """The "dense" graph with named inputs/outputs (torch backend, ONNX export)."""

    input_names = ("image0_coarse", "image1_coarse", "image0_fine", "image1_fine")
    output_names = ("warp", "certainty")

    def __init__(self, net: RomaNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, image0_coarse: torch.Tensor, image1_coarse: torch.Tensor, image0_fine: torch.Tensor,
                image1_fine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(image0_coarse, image1_coarse, image0_fine, image1_fine)
