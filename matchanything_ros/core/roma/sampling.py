"""Dense warp + certainty -> sparse matches.

* `balanced` (the original `RegressionMatcher.sample`, mode `threshold_balanced`): certainties
  > 0.05 become 1; draw 4*num cells with `torch.multinomial` (no replacement) weighted by that;
  Gaussian KDE (std 0.1) of the drawn 4-D matches; draw num of them with weights 1/(1+density)
  (1e-7 where density < 10). Returned confidence is the *thresholded* certainty, as the original.
  Seeding: a generator seeded with s gives exactly the draws of `torch.manual_seed(s)` on CPU
  right before the original forward (its only RNG use is these two calls).
* `topk` (deterministic, not in the original): the num cells with the highest raw certainty over
  the (H, 2W) grid, ties to the lower flat index; returned confidence is the raw certainty.

Then pixels `x = W/2 (x_n + 1)` per image (no -0.5, as the model) and the original's mask:
confidence > 0 and x <= W-1, y <= H-1 on both images (no lower-bound test).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from .config import BALANCED_EXPANSION, KDE_STD, SAMPLE_THRESH

log = logging.getLogger(__name__)


@dataclass
class SparseMatches:
    matches: np.ndarray  # float32 [n, 4] normalised (x_A, y_A, x_B, y_B)
    confidence: np.ndarray  # float32 [n]
    flat_index: np.ndarray | None = None  # int64 [n] index into the flattened (H*2W) grid (topk)
    stage1_index: np.ndarray | None = None  # balanced: first multinomial draw
    stage2_index: np.ndarray | None = None  # balanced: second draw (indices into stage 1)
    density: np.ndarray | None = None  # balanced: KDE density of the stage-1 matches


def kde_density(x: torch.Tensor, std: float = KDE_STD, rows_per_chunk: int = 2048) -> torch.Tensor:
    """sum_j exp(-|x_i - x_j|^2 / (2 std^2)) (self term included) with `torch.cdist` as the original,
    row-chunked so the N x N matrix (1.6 GB for N = 20000) never exists at once."""
    out = []
    for r0 in range(0, x.shape[0], rows_per_chunk):
        d = torch.cdist(x[r0:r0 + rows_per_chunk], x)
        out.append((-(d**2) / (2 * std**2)).exp().sum(dim=-1))
    return torch.cat(out)


def kde_density_triton(x: torch.Tensor, std: float = KDE_STD) -> torch.Tensor:
    """`kde_density` in one Triton kernel (`triton_kernels.kde`; CUDA): each program sums
    exp(-|x_i - x_j|^2 / (2 std^2)) over all j for a block of rows in registers, so none of the N x N
    distances is written to memory (cdist + square + exp + sum make ~6 passes over them). Rounds
    differently from cdist (which squares a square root): 1e-7 relative from a float64 KDE."""
    from .triton_kernels import kde

    x = x.float().contiguous()
    assert x.dim() == 2 and x.shape[1] == 4, x.shape
    n = x.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=x.device)
    block_i = 64
    kde[(-(-n // block_i),)](x, out, n, -1.0 / (2 * std**2), BLOCK_I=block_i, BLOCK_J=128, num_warps=4)
    return out


def exponential_race(weights: torch.Tensor, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """torch.multinomial(weights, num, replacement=False) as torch computes it — the top `num` of
    weights / Exp(1) draws, the same indices from the same generator state — without its host-side
    checks of the weights (two waits for the GPU per call). Weights must be finite and >= 0."""
    q = torch.empty_like(weights).exponential_(1, generator=generator)
    return torch.topk(weights / q, num).indices


def wait_without_spinning(device: torch.device) -> None:
    """On CUDA, wait for the queued work on a blocking event (the CPU sleeps; a synchronising copy or
    `.item()` would spin a core for the whole GPU time). Nothing to do on the CPU."""
    if device.type == "cuda":
        done = torch.cuda.Event(blocking=True)
        done.record()
        done.synchronize()


# CUDA: the KDE by `kde_density_triton` (None: not decided yet; False: Triton missing, `kde_density`)
_use_triton_kde: bool | None = None


def _device_kde(x: torch.Tensor) -> torch.Tensor:
    global _use_triton_kde
    if _use_triton_kde is None:
        from .refiner_kernel import triton_available

        _use_triton_kde = triton_available()
    if _use_triton_kde:
        try:
            return kde_density_triton(x)
        except Exception as exc:  # noqa: BLE001 - e.g. Triton present but no kernel for this GPU
            log.warning("RoMa sampling: the Triton KDE failed (%s: %s); using cdist", type(exc).__name__, exc)
            _use_triton_kde = False
    return kde_density(x)


def balanced_sample(warp: torch.Tensor, certainty: torch.Tensor, num: int,
                    generator: torch.Generator | None = None) -> SparseMatches:
    """The original threshold-balanced sampler on torch tensors (any device; CPU reproduces the fixtures).

    On CUDA nothing waits for the GPU before the final copy back: the draws by `exponential_race` (torch's
    own algorithm without its host-side checks) and the KDE by `kde_density_triton` where Triton is."""
    # the original's masked assignments and `if c.sum() == 0`, written as selects: the same values, and no
    # wait for the GPU on CUDA (a boolean-mask write and a Python `if` on a device value each wait for it)
    c = certainty.reshape(-1)
    c = torch.where(c > SAMPLE_THRESH, torch.ones_like(c), c)
    c = torch.cat((torch.where(c.sum() == 0, torch.ones_like(c[:1]), c[:1]), c[1:]))
    m = warp.reshape(-1, 4)
    on_gpu = m.is_cuda
    try:
        n1 = min(BALANCED_EXPANSION * num, c.numel())
        idx1 = (exponential_race(c, n1, generator) if on_gpu
                else torch.multinomial(c, n1, replacement=False, generator=generator))
        m1, c1 = m[idx1], c[idx1]
        density = _device_kde(m1) if on_gpu else kde_density(m1)
        p = 1 / (density + 1)
        p = torch.where(density < 10, torch.full_like(p, 1e-7), p)
        n2 = min(num, c1.numel())
        idx2 = (exponential_race(p, n2, generator) if on_gpu
                else torch.multinomial(p, n2, replacement=False, generator=generator))
    except RuntimeError:
        # too few non-zero weights for a draw without replacement: the original keeps the first cell
        return SparseMatches(m[:1].cpu().numpy(), c[:1].cpu().numpy())
    wait_without_spinning(m.device)  # a plain copy back would busy-wait a core for the draws
    return SparseMatches(m1[idx2].cpu().numpy(), c1[idx2].cpu().numpy(), None, idx1.cpu().numpy(),
                         idx2.cpu().numpy(), density.cpu().numpy())


def seeded_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator | None:
    """A generator for `seed` (None for seed < 0: the global RNG, unseeded as the original)."""
    if seed < 0:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def topk_sample(warp: np.ndarray, certainty: np.ndarray, num: int) -> SparseMatches:
    """Deterministic: the `num` highest-certainty cells (ties -> lower flat index), numpy only."""
    c = np.asarray(certainty, np.float32).reshape(-1)
    k = min(num, c.size)
    order = np.argsort(-c, kind="stable")[:k]
    return SparseMatches(np.asarray(warp, np.float32).reshape(-1, 4)[order], c[order], order.astype(np.int64))


def to_pixels(matches: np.ndarray, size0_wh: tuple[int, int],
              size1_wh: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Normalised matches [n, 4] -> pixel keypoints of each model-input image, x = W/2 (x_n + 1)."""
    w0, h0 = size0_wh
    w1, h1 = size1_wh
    m = matches.astype(np.float32)
    k0 = np.stack((w0 / 2 * (m[:, 0] + 1), h0 / 2 * (m[:, 1] + 1)), axis=-1).astype(np.float32)
    k1 = np.stack((w1 / 2 * (m[:, 2] + 1), h1 / 2 * (m[:, 3] + 1)), axis=-1).astype(np.float32)
    return k0, k1


def valid_mask(k0: np.ndarray, k1: np.ndarray, confidence: np.ndarray, size0_wh: tuple[int, int],
               size1_wh: tuple[int, int]) -> np.ndarray:
    """The original's output mask: confidence > 0 and inside the upper/right borders of both images."""
    w0, h0 = size0_wh
    w1, h1 = size1_wh
    return ((confidence > 0.0) & (k0[:, 0] <= w0 - 1) & (k0[:, 1] <= h0 - 1)
            & (k1[:, 0] <= w1 - 1) & (k1[:, 1] <= h1 - 1))
