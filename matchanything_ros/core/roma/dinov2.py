"""DINOv2 ViT-L/14 (Meta's `dinov2_vitl14_pretrain.pth` layout), the coarse encoder of RoMa.

Only `forward_features`' normalised patch tokens are used. Parameter names equal Meta's file
so it loads strictly. The position embedding (37x37 grid) is resized with bicubic a = -0.75 and
scale factor (n + 0.1) / 37 exactly as DINOv2 does (not size=n: the sampling positions differ);
for a fixed input size it can be frozen into a constant (`freeze_pos_embed`) for export.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import DINOV2_DIM, DINOV2_PATCH


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention; softmax(q k^T / sqrt(d)) v through SDPA (same maths as the original)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x += ls1(attn(norm1(x))); x += ls2(mlp(norm2(x)))."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool, eps: float, layer_scale: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, 4 * dim)
        self.ls1: nn.Module = LayerScale(dim) if layer_scale else nn.Identity()
        self.ls2: nn.Module = LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV2ViTL14(nn.Module):
    def __init__(self, dim: int = DINOV2_DIM, depth: int = 24, heads: int = 16, patch: int = DINOV2_PATCH,
                 pretrain_grid: int = 37) -> None:
        super().__init__()
        self.patch = patch
        self.dim = dim
        self.patch_embed = PatchEmbed(dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pretrain_grid**2, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # in Meta's file; unused at inference
        self.blocks = nn.ModuleList([Block(dim, heads, qkv_bias=True, eps=1e-6, layer_scale=True)
                                     for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self._frozen_pos: dict[tuple[int, int], torch.Tensor] = {}

    def interpolated_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """pos_embed for a grid_h x grid_w token grid, [1, 1 + h*w, dim], computed in fp32."""
        # int(): under ONNX tracing the grid sizes arrive as 0-d tensors, which would miss the cache
        frozen = self._frozen_pos.get((int(grid_h), int(grid_w)))
        if frozen is not None:
            return frozen
        pos = self.pos_embed.float()
        n = pos.shape[1] - 1
        side = int(math.sqrt(n))
        if grid_h == side and grid_w == side:
            return pos
        patch_pos = pos[:, 1:].reshape(1, side, side, self.dim).permute(0, 3, 1, 2)
        # DINOv2 adds 0.1 "to avoid floating point error" and passes a scale factor; its (w, h)
        # order is irrelevant for the square grid it was written for, kept literal here.
        sf = ((grid_w + 0.1) / side, (grid_h + 0.1) / side)
        patch_pos = F.interpolate(patch_pos, scale_factor=sf, mode="bicubic", align_corners=False)
        if patch_pos.shape[-2:] != (grid_h, grid_w):
            raise ValueError(f"pos-embed interpolation gave {tuple(patch_pos.shape[-2:])}, expected {(grid_h, grid_w)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, self.dim)
        return torch.cat((pos[:, :1], patch_pos), dim=1)

    def freeze_pos_embed(self, grid_h: int, grid_w: int) -> None:
        """Precompute the interpolated pos_embed for a fixed input size (a constant in exported graphs)."""
        with torch.no_grad():
            self._frozen_pos.pop((grid_h, grid_w), None)
            self._frozen_pos[(grid_h, grid_w)] = self.interpolated_pos_embed(grid_h, grid_w).detach()

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # A device/dtype move invalidates the cached tables: recompute them from the moved weights,
        # or every forward after `.to(device)` would interpolate the table again.
        frozen_sizes = list(self._frozen_pos)
        self._frozen_pos = {}
        out = super()._apply(fn, recurse)
        for grid_h, grid_w in frozen_sizes:
            self.freeze_pos_embed(grid_h, grid_w)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] (H, W multiples of 14) -> normalised patch tokens as a map [B, dim, H/14, W/14]."""
        b, _, h, w = x.shape
        gh, gw = h // self.patch, w // self.patch
        tokens = self.patch_embed(x)
        tokens = torch.cat((self.cls_token.expand(b, -1, -1).to(tokens.dtype), tokens), dim=1)
        tokens = tokens + self.interpolated_pos_embed(gh, gw).to(tokens.dtype)
        for blk in self.blocks:
            tokens = blk(tokens)
        tokens = self.norm(tokens)
        return tokens[:, 1:].permute(0, 2, 1).reshape(b, self.dim, gh, gw)
