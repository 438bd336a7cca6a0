"""Photometric and cross-modality augmentation of a pair of RGB views -> the model's grey inputs.

Every view gets a random RGB->grey channel mix, brightness/contrast, gamma, optional blur and
noise. With probability `cross_modality`, ONE view of the pair is also turned into another
"modality": inverted intensities, an edge map, a random non-monotonic intensity curve, or a
channel mix with a negative weight. MatchAnything's point is matching across such changes.
All ops are batched torch on the views' device; parameters are drawn per sample.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LUMA = (0.299, 0.587, 0.114)
CROSS_MODALITIES = ("invert", "edges", "curve", "negative_mix")


@dataclass
class AugmentConfig:
    random_mix: float = 0.5  # probability of random positive channel weights instead of luma
    brightness: float = 0.15
    contrast: tuple[float, float] = (0.6, 1.4)
    gamma: float = 0.6  # gamma = exp(U(-g, g))
    blur: float = 0.3  # probability of a Gaussian blur, sigma U(0.3, 2.0)
    noise: float = 0.04  # max std of additive Gaussian noise
    cross_modality: float = 0.4  # probability that one view of a pair changes modality


def _rand(gen: torch.Generator, n: int, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device)


def _bc(v: torch.Tensor) -> torch.Tensor:
    return v[:, None, None, None]


def channel_mix(rgb: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] x [B,3] -> [B,1,H,W], rescaled so the mix of [0,1] inputs stays in [0,1]."""
    lo = weights.clamp(max=0).sum(1)
    hi = weights.clamp(min=0).sum(1)
    mixed = (rgb * weights[:, :, None, None]).sum(1, keepdim=True)
    return (mixed - _bc(lo)) / _bc((hi - lo).clamp(min=1e-6))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample separable Gaussian blur of [B,1,H,W] with sigmas [B]."""
    b = x.shape[0]
    radius = int(torch.ceil(3 * sigma.max()).item()) if b else 0
    if radius < 1:
        return x
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None].clamp(min=1e-3)) ** 2)
    k = k / k.sum(1, keepdim=True)
    xb = x.reshape(1, b, *x.shape[2:])
    xb = F.conv2d(F.pad(xb, (radius, radius, 0, 0), mode="replicate"), k[:, None, None, :], groups=b)
    xb = F.conv2d(F.pad(xb, (0, 0, radius, radius), mode="replicate"), k[:, None, :, None], groups=b)
    return xb.reshape_as(x)


def edge_map(x: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of [B,1,H,W], normalised per sample to [0,1]."""
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], device=x.device, dtype=x.dtype)[None, None]
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    mag = torch.sqrt(F.conv2d(xp, kx) ** 2 + F.conv2d(xp, kx.transpose(2, 3)) ** 2 + 1e-12)
    return mag / mag.amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)


def random_curve(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random smooth, generally non-monotonic intensity mapping (a few cosine terms), output in [0,1]."""
    b = x.shape[0]
    terms = 3
    amp = torch.rand(b, terms, generator=gen, device=x.device) * 2 - 1
    freq = 0.5 + torch.rand(b, terms, generator=gen, device=x.device) * 2.5
    phase = torch.rand(b, terms, generator=gen, device=x.device) * 6.2832
    y = (amp[:, :, None, None, None] * torch.cos(
        6.2832 * freq[:, :, None, None, None] * x[:, None] + phase[:, :, None, None, None])).sum(1)
    lo = y.amin(dim=(1, 2, 3), keepdim=True)
    hi = y.amax(dim=(1, 2, 3), keepdim=True)
    return (y - lo) / (hi - lo).clamp(min=1e-6)


def photometric(rgb: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """RGB views [B,3,H,W] in [0,1] -> grey [B,1,H,W] with random mix, contrast, gamma, blur, noise."""
    b, dev = rgb.shape[0], rgb.device
    luma = torch.tensor(LUMA, device=dev).expand(b, 3)
    rand_w = torch.rand(b, 3, generator=gen, device=dev) + 0.05
    use_rand = (_rand(gen, b, dev) < cfg.random_mix)[:, None]
    x = channel_mix(rgb, torch.where(use_rand, rand_w, luma))
    contrast = cfg.contrast[0] + _rand(gen, b, dev) * (cfg.contrast[1] - cfg.contrast[0])
    bright = (_rand(gen, b, dev) * 2 - 1) * cfg.brightness
    x = ((x - 0.5) * _bc(contrast) + 0.5 + _bc(bright)).clamp(0, 1)
    gamma = torch.exp((_rand(gen, b, dev) * 2 - 1) * cfg.gamma)
    x = x.clamp(min=1e-6) ** _bc(gamma)
    sigma = torch.where(_rand(gen, b, dev) < cfg.blur, 0.3 + 1.7 * _rand(gen, b, dev), torch.zeros(b, device=dev))
    x = gaussian_blur(x, sigma)
    noise_std = _rand(gen, b, dev) * cfg.noise
    x = x + torch.randn(x.shape, generator=gen, device=dev) * _bc(noise_std)
    return x.clamp(0, 1)


def cross_modality(rgb: torch.Tensor, grey: torch.Tensor, kind: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Apply the modality change `CROSS_MODALITIES[kind[b]]` to each sample (kind < 0: unchanged)."""
    out = grey
    b, dev = grey.shape[0], grey.device
    for k, name in enumerate(CROSS_MODALITIES):
        sel = kind == k
        if not bool(sel.any()):
            continue
        if name == "invert":
            changed = 1.0 - grey
        elif name == "edges":
            changed = edge_map(grey)
        elif name == "curve":
            changed = random_curve(grey, gen)
        else:  # a channel mix where one channel counts negatively (e.g. an "infrared-like" band ratio)
            w = torch.rand(b, 3, generator=gen, device=dev) + 0.1
            neg = torch.randint(0, 3, (b,), generator=gen, device=dev)
            w = torch.where(torch.nn.functional.one_hot(neg, 3).bool(), -w, w)
            changed = channel_mix(rgb, w)
        out = torch.where(_bc(sel), changed, out)
    return out


def augment_views(rgb0: torch.Tensor, rgb1: torch.Tensor, cfg: AugmentConfig,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two RGB view batches -> two grey batches [B,1,H,W] in [0,1], quantised to 8 bits like real input."""
    b, dev = rgb0.shape[0], rgb0.device
    grey0, grey1 = photometric(rgb0, cfg, gen), photometric(rgb1, cfg, gen)
    change = _rand(gen, b, dev) < cfg.cross_modality
    kind = torch.where(change, torch.randint(0, len(CROSS_MODALITIES), (b,), generator=gen, device=dev),
                       torch.full((b,), -1, device=dev, dtype=torch.long))
    second = _rand(gen, b, dev) < 0.5  # which view changes modality
    grey0 = cross_modality(rgb0, grey0, torch.where(second, -1, kind), gen)
    grey1 = cross_modality(rgb1, grey1, torch.where(second, kind, -1), gen)
    return torch.round(grey0 * 255) / 255, torch.round(grey1 * 255) / 255
