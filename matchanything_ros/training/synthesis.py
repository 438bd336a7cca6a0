"""Self-supervised training pairs: two random homographic views of one photo, plus their exact warp.

Each view is a homography from view pixels to source-photo pixels (pixel-index coordinates, pixel
centres at integers). View 1 relative to view 0 is `H_0to1 = inv(H_v1) @ H_v0`. Everything runs in
torch on the training device (one grid_sample per sample), so a GPU never waits on a data loader.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .augment import AugmentConfig, augment_views


@dataclass
class PairBatch:
    image0: torch.Tensor  # [B,1,S,S] float32 in [0,1]
    image1: torch.Tensor
    valid0: torch.Tensor  # [B,S,S] bool: pixel shows the photo (not the black outside)
    valid1: torch.Tensor
    H_0to1: torch.Tensor  # [B,3,3] float64, view-0 pixels -> view-1 pixels


@dataclass
class HomographyConfig:
    base_scale: tuple[float, float] = (0.5, 1.6)  # source pixels per view pixel (log-uniform)
    rel_scale: float = 0.45  # view 1 scale = view 0 scale * 2**U(-rel_scale, rel_scale)
    rotation_deg: float = 25.0  # view 1 rotation relative to view 0, U(-r, r)
    view0_rotation_deg: float = 8.0
    corner_jitter: float = 0.12  # perspective: each corner moves up to this fraction of the side
    shift: float = 0.2  # view 1 centre offset, fraction of the side


def perspective_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3x3 homography mapping 4 points `src` [4,2] onto `dst` [4,2] (direct linear solve)."""
    a = np.zeros((8, 8))
    b = np.zeros(8)
    for k, ((x, y), (u, v)) in enumerate(zip(src, dst)):
        a[2 * k] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
        a[2 * k + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
        b[2 * k], b[2 * k + 1] = u, v
    h = np.linalg.solve(a, b)
    return np.append(h, 1.0).reshape(3, 3)


def _view_corners(rng: np.random.Generator, centre: np.ndarray, half: float, angle: float, jitter: float) -> np.ndarray:
    unit = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    pts = unit * half + rng.uniform(-jitter, jitter, size=(4, 2)) * half
    return centre + pts @ rot.T


def sample_view_homographies(rng: np.random.Generator, size: int, src_hw: tuple[int, int],
                             cfg: HomographyConfig) -> tuple[np.ndarray, np.ndarray]:
    """(H_v0, H_v1): view pixels -> source pixels for a pair of overlapping views."""
    sh, sw = src_hw
    scale0 = math.exp(rng.uniform(math.log(cfg.base_scale[0]), math.log(cfg.base_scale[1])))
    # Keep the view mostly inside small photos: shrink the scale if the view is much larger than the photo.
    scale0 = min(scale0, 1.1 * min(sh, sw) / size)
    half0 = 0.5 * size * scale0
    margin_x, margin_y = min(half0, sw / 2), min(half0, sh / 2)
    centre0 = np.array([rng.uniform(margin_x, sw - margin_x), rng.uniform(margin_y, sh - margin_y)])
    angle0 = math.radians(rng.uniform(-cfg.view0_rotation_deg, cfg.view0_rotation_deg))
    scale1 = scale0 * 2.0 ** rng.uniform(-cfg.rel_scale, cfg.rel_scale)
    angle1 = angle0 + math.radians(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg))
    centre1 = centre0 + rng.uniform(-cfg.shift, cfg.shift, size=2) * size * scale0
    view_sq = np.array([[0, 0], [size - 1, 0], [size - 1, size - 1], [0, size - 1]], dtype=np.float64)
    c0 = _view_corners(rng, centre0, half0, angle0, cfg.corner_jitter * 0.5)
    c1 = _view_corners(rng, centre1, 0.5 * size * scale1, angle1, cfg.corner_jitter)
    return perspective_from_points(view_sq, c0), perspective_from_points(view_sq, c1)


def warp_points(H: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Apply [B,3,3] homographies to [B,N,2] points (float64 math, returns pts' dtype)."""
    h = H.to(torch.float64)
    p = pts.to(torch.float64)
    x = p[..., 0] * h[:, None, 0, 0] + p[..., 1] * h[:, None, 0, 1] + h[:, None, 0, 2]
    y = p[..., 0] * h[:, None, 1, 0] + p[..., 1] * h[:, None, 1, 1] + h[:, None, 1, 2]
    w = p[..., 0] * h[:, None, 2, 0] + p[..., 1] * h[:, None, 2, 1] + h[:, None, 2, 2]
    w = torch.where(w.abs() < 1e-9, torch.full_like(w, 1e-9), w)
    return torch.stack([x / w, y / w], dim=-1).to(pts.dtype)


def _pixel_grid(size: int, device: torch.device) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(size, device=device), torch.arange(size, device=device), indexing="ij")
    return torch.stack([xs, ys], dim=-1).reshape(1, -1, 2).to(torch.float32)


class PairSynthesizer:
    """Makes `PairBatch`es from a list of RGB uint8 photos on `device`."""

    def __init__(self, photos: list[np.ndarray], device: torch.device | str = "cpu", seed: int = 0,
                 homography: HomographyConfig | None = None, augment: AugmentConfig | None = None) -> None:
        if not photos:
            raise ValueError("PairSynthesizer needs at least one photo")
        self.device = torch.device(device)
        # float RGB [1,3,H,W] plus a ones channel that marks the photo's extent after warping
        self.sources = [
            torch.cat([torch.from_numpy(p).to(self.device).permute(2, 0, 1).float() / 255.0,
                       torch.ones(1, *p.shape[:2], device=self.device)], dim=0)[None]
            for p in photos
        ]
        # Uniform over photos: the largest ones (retina, hubble) are mostly dark and textureless.
        self.weights = np.full(len(photos), 1.0 / len(photos))
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self.homography = homography or HomographyConfig()
        self.augment = augment or AugmentConfig()

    def _render(self, src: torch.Tensor, H_view: np.ndarray, size: int) -> torch.Tensor:
        """[1,4,S,S]: RGB + coverage of the photo warped into the view."""
        _, _, sh, sw = src.shape
        grid = warp_points(torch.from_numpy(H_view)[None].to(self.device), _pixel_grid(size, self.device))
        norm = torch.stack([2 * grid[..., 0] / (sw - 1) - 1, 2 * grid[..., 1] / (sh - 1) - 1], dim=-1)
        return F.grid_sample(src, norm.reshape(1, size, size, 2).float(), mode="bilinear",
                             padding_mode="zeros", align_corners=True)

    def sample(self, batch: int, size: int) -> PairBatch:
        views0, views1, hs = [], [], []
        for _ in range(batch):
            k = int(self.rng.choice(len(self.sources), p=self.weights))
            src = self.sources[k]
            h_v0, h_v1 = sample_view_homographies(self.rng, size, (src.shape[2], src.shape[3]), self.homography)
            views0.append(self._render(src, h_v0, size))
            views1.append(self._render(src, h_v1, size))
            hs.append(np.linalg.inv(h_v1) @ h_v0)
        v0, v1 = torch.cat(views0), torch.cat(views1)
        valid0, valid1 = v0[:, 3] > 0.999, v1[:, 3] > 0.999
        image0, image1 = augment_views(v0[:, :3] * valid0[:, None], v1[:, :3] * valid1[:, None],
                                       self.augment, self.gen)
        H = torch.from_numpy(np.stack(hs)).to(self.device)
        return PairBatch(image0=image0, image1=image1, valid0=valid0, valid1=valid1, H_0to1=H)
