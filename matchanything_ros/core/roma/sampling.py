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

from ..device_wait import DEFAULT_HOST_WAIT, DeviceWait
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


def kde_density_triton(x: torch.Tensor, std: float = KDE_STD, block_i: int | None = None,
                       block_j: int | None = None) -> torch.Tensor:
    """`kde_density` in one Triton kernel (`triton_kernels.kde`; CUDA): each program sums
    exp(-|x_i - x_j|^2 / (2 std^2)) over all j for a block of rows in registers, so none of the N x N
    distances is written to memory (cdist + square + exp + sum make ~6 passes over them). Rounds
    differently from cdist (which squares a square root): 1e-7 relative from a float64 KDE. block_i / block_j:
    the kernel's tile (None: KDE_BLOCK_I / KDE_BLOCK_J; bench/roma_stages.py compares tiles)."""
    from .triton_kernels import kde

    assert x.dim() == 2 and x.shape[1] == 4, x.shape
    xt = x.float().t().contiguous()  # [4, N]: each coordinate a row
    n = x.shape[0]
    bi, bj = block_i or KDE_BLOCK_I, block_j or KDE_BLOCK_J
    out = torch.empty(n, dtype=torch.float32, device=x.device)
    kde[(-(-n // bi),)](xt, out, n, -1.0 / (2 * std**2), BLOCK_I=bi, BLOCK_J=bj, num_warps=4)
    return out


# the KDE kernel's tile: points a program, points a step of its loop. 16 x 128 was the fastest of the earlier kernel
# (a reduction per step; H200, 20,000 points: 16 rows 0.63 ms, 32 0.85, 64 0.89); this one's tiles not yet timed
KDE_BLOCK_I, KDE_BLOCK_J = 16, 128


def exponential_race(weights: torch.Tensor, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """torch.multinomial(weights, num, replacement=False) as torch computes it — the top `num` of
    weights / Exp(1) draws, the same indices from the same generator state — without its host-side
    checks of the weights (two waits for the GPU per call). Weights must be finite and >= 0."""
    return race(weights, torch.empty_like(weights).exponential_(1, generator=generator), num)


def race(weights: torch.Tensor, noise: torch.Tensor, num: int) -> torch.Tensor:
    """The `num` indices of the largest weights / noise (`exponential_race` with its Exp(1) noise given)."""
    return torch.topk(weights / noise, num).indices


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

    On CUDA nothing waits for the GPU before the final copy back: `device_draws` on the generator's noise
    (`race_noise`; races are torch's own algorithm without its host-side checks), the KDE by
    `kde_density_triton` where Triton is. (`DeviceSampler` replays the same as one CUDA graph.)"""
    m = warp.reshape(-1, 4)
    if m.is_cuda:
        n1, n2 = draw_counts(m.shape[0], num)
        q1, q2 = race_noise(m.shape[0], n1, generator, m.device)
        drawn = device_draws(m, certainty, n2, q1, q2)
        wait_without_spinning(m.device)  # a plain copy back would busy-wait a core for the draws
        return sparse_from_draws([t.cpu().numpy() for t in drawn])
    c = thresholded_weights(certainty)
    try:
        n1 = min(BALANCED_EXPANSION * num, c.numel())
        idx1 = torch.multinomial(c, n1, replacement=False, generator=generator)
        m1, c1 = m[idx1], c[idx1]
        density = kde_density(m1)
        p = _stage2_weights(density)
        idx2 = torch.multinomial(p, min(num, c1.numel()), replacement=False, generator=generator)
    except RuntimeError:
        # too few non-zero weights for a draw without replacement: the original keeps the first cell
        return SparseMatches(m[:1].cpu().numpy(), c[:1].cpu().numpy())
    return SparseMatches(m1[idx2].cpu().numpy(), c1[idx2].cpu().numpy(), None, idx1.cpu().numpy(),
                         idx2.cpu().numpy(), density.cpu().numpy())


def sparse_from_draws(drawn: list[np.ndarray]) -> SparseMatches:
    """`device_draws`' five arrays (on the host) as SparseMatches."""
    matches, confidence, stage1, stage2, density = drawn
    return SparseMatches(matches, confidence, None, stage1, stage2, density)


def thresholded_weights(certainty: torch.Tensor) -> torch.Tensor:
    """The original's stage-1 weights: certainties above SAMPLE_THRESH become 1; all zero -> the first cell 1.
    Its masked assignments and `if c.sum() == 0` written as selects: the same values, and no wait for the GPU
    on CUDA (a boolean-mask write and a Python `if` on a device value each wait for it)."""
    c = certainty.reshape(-1)
    c = torch.where(c > SAMPLE_THRESH, torch.ones_like(c), c)
    return torch.cat((torch.where(c.sum() == 0, torch.ones_like(c[:1]), c[:1]), c[1:]))


def _stage2_weights(density: torch.Tensor) -> torch.Tensor:
    p = 1 / (density + 1)
    return torch.where(density < 10, torch.full_like(p, 1e-7), p)


def draw_counts(cells: int, num: int) -> tuple[int, int]:
    """(stage-1 draws, stage-2 draws) for `cells` weights and `num` samples."""
    n1 = min(BALANCED_EXPANSION * num, cells)
    return n1, min(num, n1)


def race_noise(cells: int, n1: int, generator: torch.Generator | None,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The Exp(1) draws of both stages' races (`exponential_race`), in the generator's order: they depend on
    the generator and the sizes only, so a seeded sampler's noise is the same every frame."""
    q1 = torch.empty(cells, device=device).exponential_(1, generator=generator)
    q2 = torch.empty(n1, device=device).exponential_(1, generator=generator)
    return q1, q2


def device_draws(m: torch.Tensor, certainty: torch.Tensor, n2: int, q1: torch.Tensor, q2: torch.Tensor
                 ) -> tuple[torch.Tensor, ...]:
    """The balanced sampler's device half: fixed shapes, no host wait (capturable in a CUDA graph). m [N, 4]
    fp32, certainty [N], the races' noise q1 [N], q2 [n1] (`race_noise`) -> (matches [n2, 4], confidence [n2],
    stage-1 indices [n1], stage-2 indices [n2], KDE density [n1]). Each draw is a `race`: torch's draw
    without replacement (the top n of weights / Exp(1) noise)."""
    c = thresholded_weights(certainty)
    idx1 = race(c, q1, q2.shape[0])
    m1, c1 = m[idx1], c[idx1]
    density = _device_kde(m1) if m1.is_cuda else kde_density(m1)
    idx2 = race(_stage2_weights(density), q2, n2)
    return m1[idx2], c1[idx2], idx1, idx2, density


@dataclass
class _SamplerCapture:
    graph: "torch.cuda.CUDAGraph"
    warp: torch.Tensor  # static input buffers [N, 4] and [N]
    certainty: torch.Tensor
    outputs: tuple[torch.Tensor, ...]  # device_draws' five outputs (the graph's static buffers)
    host: tuple[torch.Tensor, ...]  # pinned buffers for them
    done: "torch.cuda.Event"  # recorded after their copies down


class DeviceSampler:
    """The balanced sampler on CUDA as one CUDA-graph replay a frame: eager it is ~30 kernel launches, each
    costing the host more than the GPU's work, and the GPU idles between them while the frame waits.

    One capture per (device, cells, num, seed). The inputs are copied into the capture's own buffers (30 MB at
    864: microseconds on the device), so any warp/certainty tensors may be passed. A seeded sampler's race noise
    is the same every frame (`race_noise`): made once, a constant of the capture — the draws equal the eager
    `balanced_sample` with `seeded_generator(seed)` bit for bit. Unseeded (seed < 0), the noise is drawn
    inside the graph from torch's default CUDA generator, which advances on every replay. Where a capture
    fails (said once in the log), that key runs eagerly. capture=False: always eagerly (RomaOptions.capture_sampler)."""

    def __init__(self, capture: bool = True, host_wait: str = DEFAULT_HOST_WAIT) -> None:
        self.capture = capture
        self.waiting = DeviceWait(host_wait)  # the frame's one wait: for the dense network and the draws
        self._captures: dict[tuple[str, int, int, int], _SamplerCapture] = {}
        self._eager: set[tuple[str, int, int, int]] = set()

    def __call__(self, warp: torch.Tensor, certainty: torch.Tensor, num: int, seed: int) -> SparseMatches:
        m = warp.reshape(-1, 4).float()
        key = (str(m.device), int(m.shape[0]), int(num), int(seed))
        if not self.capture or key in self._eager:
            return balanced_sample(m, certainty, num, seeded_generator(seed, m.device))
        with torch.inference_mode():
            cap = self._captures.get(key)
            if cap is None:
                try:
                    cap = self._capture(m, num, seed)
                except Exception as exc:  # noqa: BLE001 - e.g. an op that cannot be captured on this torch
                    log.warning("RoMa sampling: capturing the sampler failed (%s: %s); running it eagerly",
                                type(exc).__name__, exc)
                    self._eager.add(key)
                    return balanced_sample(m, certainty, num, seeded_generator(seed, m.device))
                if len(self._captures) >= 4:  # ever new sizes: bounded memory
                    self._captures.clear()
                self._captures[key] = cap
            cap.warp.copy_(m, non_blocking=True)
            cap.certainty.copy_(certainty.reshape(-1), non_blocking=True)
            cap.graph.replay()
            for host, out in zip(cap.host, cap.outputs):
                host.copy_(out, non_blocking=True)
            cap.done.record()
            self.waiting.wait(cap.done)
            return sparse_from_draws([h.numpy().copy() for h in cap.host])  # the pinned buffers are reused

    @staticmethod
    def _capture(m: torch.Tensor, num: int, seed: int) -> _SamplerCapture:
        cells = m.shape[0]
        n1, n2 = draw_counts(cells, num)
        static_m = torch.empty_like(m)
        static_c = torch.zeros(cells, device=m.device)
        noise = race_noise(cells, n1, seeded_generator(seed, m.device), m.device) if seed >= 0 else None

        def draws() -> tuple[torch.Tensor, ...]:
            q1, q2 = noise if noise is not None else race_noise(cells, n1, None, m.device)
            return device_draws(static_m, static_c, n2, q1, q2)

        side = torch.cuda.Stream(m.device)
        side.wait_stream(torch.cuda.current_stream(m.device))
        with torch.cuda.stream(side):
            static_m.copy_(m)
            for _ in range(2):  # warm-up: Triton's compile, the allocator's blocks for the capture
                draws()
        side.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            outputs = draws()
        torch.cuda.current_stream(m.device).wait_stream(side)
        host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in outputs)
        return _SamplerCapture(graph, static_m, static_c, outputs, host, torch.cuda.Event(blocking=True))


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
