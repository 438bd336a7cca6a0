"""Batched robust model fitting in torch: the geometric verifier that stays on the GPU.

`fit_padded` is one fixed-shape computation with no host round trip (no `.item()`, no `.cpu()`, no
`nonzero`, no data-dependent shapes), so it can run inside a captured CUDA graph:

1. Hartley normalisation of the valid matches (the first `num_valid` rows of padded [N, 2] inputs);
   for the essential matrix the points are first calibrated with K0^-1 / K1^-1.
2. S minimal samples drawn from a precomputed table of uniform numbers (seeded once, so a run is
   reproducible and the same on every device) and solved in one batch: the 4-point homography in closed
   form (two unit-square-to-quadrilateral maps), the 8-point fundamental/essential matrix as the null
   vector of the 8x9 system (inverse iteration on A^T A).
3. Scoring under a truncated quadratic (MSAC) cost of the transfer error (homography) or the Sampson
   distance (fundamental, essential), both in pixels: every hypothesis against a fixed preview of P
   matches at once, then the best few against every match (`preview_u=None`: every hypothesis against
   every match). The preview makes 8192 hypotheses cheaper than 1024 scored in full: 8-point samples
   need that many to find an outlier-free one among 40 % inliers.
4. Local optimisation of the best hypothesis: iteratively reweighted least squares with MAGSAC++
   weights (geometric-error-normalised linear fits), then Levenberg-Marquardt on the same weighted
   geometric error with the model kept on its manifold (rank 2 for F; singular values 1, 1, 0 for E,
   in closed form). The inliers are the matches within the threshold of the final model.

On CUDA `TorchVerifier` runs it torch.compile'd (fullgraph, fixed shapes: every frame up to COMPILED_ROWS
matches padded to one, the threshold an input, so one compilation per model; fused kernels in far fewer
launches), captured in a CUDA graph and replayed. It runs on the CPU too (the tests exercise it there,
compiled and eager); the CPU path of the matcher uses OpenCV instead (core/geometry.py). The only matrices
inverted are symmetric positive definite (normal equations plus a shift), inverted by Gauss-Jordan elimination
without pivoting, which is stable for them: plain tensor arithmetic, no solver library call that could
synchronise or refuse to be captured.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable

import numpy as np
import torch

from .device_wait import DeviceWait
from .geometry import (NO_MODEL_FOUND, GeometryOptions, GeometryResult, check_input, check_intrinsics)

# Points per minimal sample of the solvers here (8-point for both epipolar models).
TORCH_MINIMAL_SAMPLE = {"homography": 4, "fundamental": 8, "essential": 8}
DEFAULT_HYPOTHESES = 8192  # minimal samples solved per frame (8-point samples need many at 40 % inliers)
PREVIEW_MATCHES = 512  # matches every hypothesis is scored on first ...
FINALISTS = 64  # ... and how many of the best are then scored on all matches
IRLS_ITERATIONS = 3  # reweighted linear fits with MAGSAC++ weights
# MAGSAC++ marginalises the noise scale up to a largest threshold: OpenCV's USAC defaults (pixels), or the
# inlier threshold when that is larger. Residuals beyond it weigh nothing.
MAGSAC_MAX_THRESHOLD_PX = {"homography": 8.0, "fundamental": 2.5, "essential": 2.5}
MAGSAC_SIGMA_QUANTILE = 3.04  # the largest threshold is this many of the largest noise sigma (chi, 2 DoF)
INVERSE_ITERATIONS = 4  # power steps on (A^T A)^-1 for a null vector
LO_COST_SLACK = 1.1  # the locally optimised model is refused only when its truncated cost is this much higher
REFINE_ITERATIONS = 2  # Levenberg-Marquardt steps on the inliers' geometric error at the end
# The compiled fit's row count: every frame up to it is padded to it, larger ones to the next power of two. Its
# shapes are fixed (TorchDynamo's dynamic row count still recompiles per power of two), so this is one compilation
# per model in practice; the fit is launch-bound on a GPU, so the padding rows cost little there.
COMPILED_ROWS = 16_384
SUM_OF_PRODUCTS_MAX_K = 9  # inner dimensions up to this are written out as sums under torch.compile (`mm`)
_BIG = 1e30
_BIG_RESIDUAL = 1e15  # stands for a non-finite residual (its square stays finite in fp32)


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b; under torch.compile, where the inner dimension is small (3x3 and 9x9 models, a model against every
    match), as a sum of products that the compiler fuses into the surrounding kernels instead of a GEMM launch
    each (the fit is launch-bound on a GPU). Eager keeps the GEMM (one kernel instead of k)."""
    k = a.shape[-1]
    if not torch.compiler.is_compiling() or k > SUM_OF_PRODUCTS_MAX_K:
        return a @ b
    total = a[..., :, 0:1] * b[..., 0:1, :]
    for j in range(1, k):
        total = total + a[..., :, j:j + 1] * b[..., j:j + 1, :]
    return total


def magsac_weights(err2: torch.Tensor, max_threshold_px: float | torch.Tensor) -> torch.Tensor:
    """MAGSAC++ weights of squared residuals (pixels^2): the inlier likelihood marginalised over a noise
    sigma uniform up to max_threshold / MAGSAC_SIGMA_QUANTILE. For 2 degrees of freedom it is the upper
    incomplete gamma function of order 1/2, an erfc: erfc(r / (sqrt 2 sigma_max)) - erfc(k / sqrt 2) for
    r below the largest threshold, 0 beyond; scaled to 1 at r = 0."""
    sigma_max = max_threshold_px / MAGSAC_SIGMA_QUANTILE
    floor = math.erfc(MAGSAC_SIGMA_QUANTILE / math.sqrt(2.0))
    r = err2.clamp(min=0).sqrt()
    w = (torch.special.erfc(r / (math.sqrt(2.0) * sigma_max)) - floor) / (1.0 - floor)
    return w.clamp(min=0)


def _start_vector(n: int, like: torch.Tensor) -> torch.Tensor:
    """A fixed vector to start inverse iteration from (made on the device: no host copy inside a capture)."""
    return torch.linspace(0.5, 1.5, n, dtype=like.dtype, device=like.device)


def _batched_eye(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device).expand(*like.shape[:-2], n, n)


def spd_inverse(M: torch.Tensor) -> torch.Tensor:
    """[..., n, n] symmetric positive definite -> its inverse, by Gauss-Jordan elimination (no pivoting:
    stable for SPD matrices; n small and fixed, so the loop unrolls into a fixed sequence of kernels)."""
    n = M.shape[-1]
    eye = torch.eye(n, dtype=M.dtype, device=M.device)
    augmented = torch.cat([M, eye.expand(*M.shape[:-2], n, n)], dim=-1)  # [..., n, 2n]
    is_row = eye > 0  # is_row[:, k]: row k
    for k in range(n):
        pivot_row = augmented[..., k:k + 1, :] / augmented[..., k:k + 1, k:k + 1]
        eliminated = augmented - augmented[..., :, k:k + 1] * pivot_row  # column k out of every row ...
        augmented = torch.where(is_row[:, k:k + 1], pivot_row, eliminated)  # ... but row k: the pivot row
    return augmented[..., n:]


def smallest_eigvec(M: torch.Tensor, start: torch.Tensor, iterations: int = INVERSE_ITERATIONS) -> torch.Tensor:
    """[..., n, n] symmetric PSD -> [..., n] unit eigenvector of the smallest eigenvalue (inverse iteration).

    The shift keeps the inverse finite for an exact null vector; it is far below the second eigenvalue
    of any well-posed system, so a few steps converge."""
    n = M.shape[-1]
    trace = torch.diagonal(M, dim1=-2, dim2=-1).sum(-1)[..., None, None]
    shift = trace * (1e-6 / n) + torch.finfo(M.dtype).tiny
    shifted = M + shift * _batched_eye(n, M)
    # 3x3: the adjugate is the inverse up to a positive factor (the determinant), which the normalisation drops
    inverse = adjugate3(shifted) if n == 3 else spd_inverse(shifted)
    v = start.expand(M.shape[:-1]).unsqueeze(-1)
    for _ in range(iterations):
        v = mm(inverse, v)
        v = v / v.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(M.dtype).tiny)
    return v.squeeze(-1)


def adjugate3(M: torch.Tensor) -> torch.Tensor:
    """[..., 3, 3] -> adjugate (the inverse times the determinant; defined for singular M too)."""
    r0, r1, r2 = M[..., 0, :], M[..., 1, :], M[..., 2, :]
    return torch.stack([torch.linalg.cross(r1, r2), torch.linalg.cross(r2, r0), torch.linalg.cross(r0, r1)], dim=-1)


def square_to_quad(q: torch.Tensor) -> torch.Tensor:
    """[..., 4, 2] corners -> [..., 3, 3] homography (up to scale) taking the unit square's corners
    (0,0), (1,0), (1,1), (0,1) to them; no division, so three collinear corners give a singular matrix."""
    x0, x1, x2, x3 = q[..., 0, 0], q[..., 1, 0], q[..., 2, 0], q[..., 3, 0]
    y0, y1, y2, y3 = q[..., 0, 1], q[..., 1, 1], q[..., 2, 1], q[..., 3, 1]
    dx1, dx2, dx3 = x1 - x2, x3 - x2, x0 - x1 + x2 - x3
    dy1, dy2, dy3 = y1 - y2, y3 - y2, y0 - y1 + y2 - y3
    den = dx1 * dy2 - dx2 * dy1
    g = dx3 * dy2 - dx2 * dy3  # the perspective terms, times den
    h = dx1 * dy3 - dx3 * dy1
    rows = [(x1 - x0) * den + g * x1, (x3 - x0) * den + h * x3, x0 * den,
            (y1 - y0) * den + g * y1, (y3 - y0) * den + h * y3, y0 * den,
            g, h, den]
    return torch.stack(rows, dim=-1).reshape(*q.shape[:-2], 3, 3)


def homography_4pt(p0: torch.Tensor, p1: torch.Tensor) -> torch.Tensor:
    """[S, 4, 2] x2 -> [S, 3, 3] homographies with p1 ~ H p0."""
    return mm(square_to_quad(p1), adjugate3(square_to_quad(p0)))


def epipolar_rows(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """[..., 2] x2 -> [..., 9]: the row a with a . vec(F) = x1^T F x0 (F row-major)."""
    h0 = torch.cat([x0, torch.ones_like(x0[..., :1])], dim=-1)
    h1 = torch.cat([x1, torch.ones_like(x1[..., :1])], dim=-1)
    return (h1.unsqueeze(-1) * h0.unsqueeze(-2)).flatten(-2)


def homography_rows(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """[..., 2] x2 -> [..., 2, 9]: the two DLT rows with a . vec(H) = 0 for x1 ~ H x0."""
    x, y = x0[..., 0], x0[..., 1]
    u, v = x1[..., 0], x1[..., 1]
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    r1 = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y, -u], dim=-1)
    r2 = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y, -v], dim=-1)
    return torch.stack([r1, r2], dim=-2)


class Normalised:
    """Valid points in normalised coordinates (centroid 0, mean distance sqrt 2) and what maps back.

    `jac0`/`jac1` [2]: d(normalised)/d(pixel) per axis, to measure errors in pixels."""

    def __init__(self, kp0: torch.Tensor, kp1: torch.Tensor, valid: torch.Tensor, count: torch.Tensor,
                 Kinv0: torch.Tensor | None, Kinv1: torch.Tensor | None) -> None:
        ones = torch.ones_like(kp0[:, :1])
        pix_jac0 = torch.ones(2, dtype=kp0.dtype, device=kp0.device)
        pix_jac1 = pix_jac0
        if Kinv0 is not None and Kinv1 is not None:  # calibrated coordinates (skew ignored in the Jacobian)
            kp0 = mm(torch.cat([kp0, ones], 1), Kinv0.T)[:, :2]
            kp1 = mm(torch.cat([kp1, ones], 1), Kinv1.T)[:, :2]
            pix_jac0 = torch.stack([Kinv0[0, 0], Kinv0[1, 1]])
            pix_jac1 = torch.stack([Kinv1[0, 0], Kinv1[1, 1]])
        weight = valid.to(kp0.dtype).unsqueeze(1)
        n = count.to(kp0.dtype).clamp_min(1)
        self.T0, self.x0 = self._normalise(kp0, weight, n)
        self.T1, self.x1 = self._normalise(kp1, weight, n)
        self.T0_inv = self._inverse(self.T0)
        self.T1_inv = self._inverse(self.T1)
        self.jac0 = pix_jac0 * self.T0[0, 0]
        self.jac1 = pix_jac1 * self.T1[0, 0]

    @staticmethod
    def _inverse(T: torch.Tensor) -> torch.Tensor:
        """The inverse of a normalising similarity [[s, 0, a], [0, s, b], [0, 0, 1]]."""
        s = T[0, 0]
        zero, one = torch.zeros_like(s), torch.ones_like(s)
        # built from tensors (no Python scalar written into a device tensor: that copies from the host,
        # which a CUDA-graph capture refuses)
        return torch.stack([torch.stack([1 / s, zero, -T[0, 2] / s]), torch.stack([zero, 1 / s, -T[1, 2] / s]),
                            torch.stack([zero, zero, one])])

    @staticmethod
    def _normalise(points: torch.Tensor, weight: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        centre = (points * weight).sum(0) / n
        spread = ((points - centre).norm(dim=1, keepdim=True) * weight).sum() / n
        scale = math.sqrt(2.0) / spread.clamp_min(torch.finfo(points.dtype).tiny)
        zero, one = torch.zeros_like(scale), torch.ones_like(scale)
        T = torch.stack([torch.stack([scale, zero, -scale * centre[0]]), torch.stack([zero, scale, -scale * centre[1]]),
                         torch.stack([zero, zero, one])])
        return T, ((points - centre) * scale) * weight  # padding rows become 0 (finite)


def squared_errors(model: str, M: torch.Tensor, norm: Normalised, rows: torch.Tensor | None = None) -> torch.Tensor:
    """[S, 3, 3] models in normalised coordinates -> [S, N] squared errors in pixels (non-finite: _BIG);
    `rows`: only these matches ([P] indices -> [S, P])."""
    x0, x1 = (norm.x0, norm.x1) if rows is None else (norm.x0[rows], norm.x1[rows])
    h0 = torch.cat([x0, torch.ones_like(x0[:, :1])], 1).T  # [3, N]
    if model == "homography":
        mapped = mm(M, h0)  # [S, 3, N]
        w = mapped[:, 2]
        du = (mapped[:, 0] / w - x1[:, 0]) / norm.jac1[0]
        dv = (mapped[:, 1] / w - x1[:, 1]) / norm.jac1[1]
        err = du * du + dv * dv
    else:
        h1 = torch.cat([x1, torch.ones_like(x1[:, :1])], 1).T
        Fx0 = mm(M[:, :2], h0)  # [S, 2, N]: the first two rows of F x0
        Ftx1 = mm(M[:, :, :2].transpose(1, 2), h1)  # [S, 2, N]: of F^T x1
        residual = mm(M.flatten(1), epipolar_rows(x0, x1).T)  # [S, N]: x1^T F x0
        jac0, jac1 = norm.jac0, norm.jac1
        grad2 = ((Fx0[:, 0] * jac1[0]) ** 2 + (Fx0[:, 1] * jac1[1]) ** 2
                 + (Ftx1[:, 0] * jac0[0]) ** 2 + (Ftx1[:, 1] * jac0[1]) ** 2)
        err = residual * residual / grad2
    return torch.nan_to_num(err, nan=_BIG, posinf=_BIG)


def weighted_fit(model: str, M: torch.Tensor, weights: torch.Tensor, norm: Normalised) -> torch.Tensor:
    """One reweighted linear least-squares step from model M [3, 3]: the linear residuals are divided
    by their derivative (transfer: the homogeneous scale; Sampson: the gradient) so that the fit minimises
    the robust-weighted geometric error to first order. -> [3, 3]."""
    x0, x1 = norm.x0, norm.x1
    if model == "homography":
        rows = homography_rows(x0, x1)  # [N, 2, 9]
        w_scale = mm(torch.cat([x0, torch.ones_like(x0[:, :1])], 1), M[2:].T)[:, 0]  # h3 . x0
        scale = weights / (w_scale * w_scale).clamp_min(1e-12)
        rows = rows.reshape(-1, 9)
        scale = scale.repeat_interleave(2)
    else:
        rows = epipolar_rows(x0, x1)  # [N, 9]
        h0 = torch.cat([x0, torch.ones_like(x0[:, :1])], 1)
        h1 = torch.cat([x1, torch.ones_like(x1[:, :1])], 1)
        Fx0, Ftx1 = mm(h0, M.T), mm(h1, M)
        grad2 = ((Fx0[:, 0] * norm.jac1[0]) ** 2 + (Fx0[:, 1] * norm.jac1[1]) ** 2
                 + (Ftx1[:, 0] * norm.jac0[0]) ** 2 + (Ftx1[:, 1] * norm.jac0[1]) ** 2)
        scale = weights / grad2.clamp_min(1e-12)
    scale = torch.nan_to_num(scale, nan=0.0, posinf=0.0)
    normal = (rows * scale.unsqueeze(1)).T @ rows  # [9, 9]
    normal = normal / normal.diagonal().sum().clamp_min(1e-30)
    return smallest_eigvec(normal, M.reshape(9), iterations=2).reshape(3, 3)


def _outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.unsqueeze(-1) * b.unsqueeze(-2)


def rank2(F: torch.Tensor) -> torch.Tensor:
    """[..., 3, 3] -> the nearest rank-2 matrices (Frobenius): F's smallest singular direction removed."""
    start = _start_vector(3, F)
    v3 = smallest_eigvec(mm(F.transpose(-1, -2), F), start)
    return F - _outer(mm(F, v3.unsqueeze(-1)).squeeze(-1), v3)


def essential_projection(E: torch.Tensor) -> torch.Tensor:
    """[..., 3, 3] -> the nearest essential matrices (singular values 1, 1, 0), in closed form: remove the
    smallest singular direction, then divide by the square root of E^T E on the remaining plane."""
    start = _start_vector(3, E)
    v3 = smallest_eigvec(mm(E.transpose(-1, -2), E), start)
    E2 = E - _outer(mm(E, v3.unsqueeze(-1)).squeeze(-1), v3)
    S = mm(E2.transpose(-1, -2), E2)
    plane = _batched_eye(3, S) - _outer(v3, v3)
    trace = S.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    square_sum = (S * S).sum((-2, -1))[..., None, None]
    s1s2 = (0.5 * (trace * trace - square_sum)).clamp_min(1e-30).sqrt()  # product of the singular values
    s_sum = (trace + 2 * s1s2).sqrt()  # their sum
    root = (S + s1s2 * plane) / s_sum  # sqrt(S) on the plane
    root_inverse = (s_sum * plane - root) / s1s2  # its inverse there (2x2: (trace I - R) / det)
    return mm(E2, root_inverse)


def on_manifold(model: str, M: torch.Tensor, norm: Normalised) -> torch.Tensor:
    """[B, 3, 3] normalised-coordinate models -> the nearest valid ones (rank 2 / essential), unit norm."""
    if model == "fundamental":
        M = rank2(M)
    elif model == "essential":  # the essential manifold lives in calibrated coordinates
        E = essential_projection(mm(mm(norm.T1.T, M), norm.T0))
        M = mm(mm(norm.T1_inv.T, E), norm.T0_inv)
    return M / M.flatten(-2).norm(dim=-1).clamp_min(1e-30)[..., None, None]


def signed_residuals(model: str, M: torch.Tensor, norm: Normalised) -> torch.Tensor:
    """[B, 3, 3] -> [B, R] residuals in pixels whose squares sum to the error: transfer error components
    (R = 2N) for a homography, the signed Sampson distance (R = N) for F and E."""
    x0, x1 = norm.x0, norm.x1
    h0 = torch.cat([x0, torch.ones_like(x0[:, :1])], 1).T
    if model == "homography":
        mapped = mm(M, h0)
        du = (mapped[:, 0] / mapped[:, 2] - x1[:, 0]) / norm.jac1[0]
        dv = (mapped[:, 1] / mapped[:, 2] - x1[:, 1]) / norm.jac1[1]
        return torch.cat([du, dv], dim=1)
    h1 = torch.cat([x1, torch.ones_like(x1[:, :1])], 1).T
    Fx0 = mm(M[:, :2], h0)
    Ftx1 = mm(M[:, :, :2].transpose(1, 2), h1)
    residual = mm(M.flatten(1), epipolar_rows(x0, x1).T)
    grad2 = ((Fx0[:, 0] * norm.jac1[0]) ** 2 + (Fx0[:, 1] * norm.jac1[1]) ** 2
             + (Ftx1[:, 0] * norm.jac0[0]) ** 2 + (Ftx1[:, 1] * norm.jac0[1]) ** 2)
    return residual / grad2.sqrt()


def refine(model: str, M: torch.Tensor, weights: torch.Tensor, norm: Normalised, iterations: int) -> torch.Tensor:
    """Levenberg-Marquardt on the weighted geometric error (transfer / Sampson), over the 9 entries with
    the manifold constraint applied inside the residuals; Jacobians by central differences, all
    parameter sets of a step evaluated in one batch. A step that does not lower the cost is refused."""
    dtype, device = M.dtype, M.device
    root_w = weights.sqrt()
    if model == "homography":
        root_w = torch.cat([root_w, root_w])
    f = M.reshape(9) / M.norm().clamp_min(1e-30)
    eye = torch.eye(9, dtype=dtype, device=device)
    step = 1e-3  # of a unit-norm parameter vector
    damping = torch.full((), 1e-3, dtype=dtype, device=device)

    def residuals(params: torch.Tensor) -> torch.Tensor:
        r = signed_residuals(model, on_manifold(model, params.reshape(-1, 3, 3), norm), norm) * root_w
        return torch.nan_to_num(r, nan=_BIG_RESIDUAL, posinf=_BIG_RESIDUAL, neginf=-_BIG_RESIDUAL)

    for _ in range(iterations):
        batch = torch.cat([f.unsqueeze(0), f + step * eye, f - step * eye])  # [19, 9]
        r = residuals(batch)
        r0 = r[0]
        J = (r[1:10] - r[10:]) / (2 * step)  # [9, R]
        JJ = J @ J.T
        g = J @ r0
        lhs = JJ + damping * torch.diag(JJ.diagonal() + 1e-12)
        delta = -mm(spd_inverse(lhs), g.unsqueeze(-1)).squeeze(-1)
        candidate = f + delta
        candidate = candidate / candidate.norm().clamp_min(1e-30)
        better = (residuals(candidate.unsqueeze(0))[0] ** 2).sum() < (r0 ** 2).sum()
        f = torch.where(better, candidate, f)
        damping = torch.where(better, damping * 0.1, damping * 10).clamp(1e-9, 1e9)
    return on_manifold(model, f.reshape(1, 3, 3), norm)[0]


def fit_padded(model: str, kp0: torch.Tensor, kp1: torch.Tensor, num_valid: torch.Tensor, sample_u: torch.Tensor,
               threshold_px: float | torch.Tensor, Kinv0: torch.Tensor | None = None,
               Kinv1: torch.Tensor | None = None,
               preview_u: torch.Tensor | None = None, finalists: int = FINALISTS,
               refine_iterations: int = REFINE_ITERATIONS) -> tuple[torch.Tensor, ...]:
    """Fit `model` to the first `num_valid` rows of kp0/kp1 [N, 2] (fixed N; the rest is padding).

    sample_u: [S, m] uniform numbers in [0, 1) choosing each minimal sample's matches. preview_u: [P]
    uniform numbers choosing the matches every hypothesis is first scored on; the `finalists` best are then
    scored on all matches (None: every hypothesis against every match). threshold_px: a float, or a 0-d tensor
    (an input of a compiled or captured fit: a new threshold needs no recompile). Returns device tensors: matrix
    [3, 3] (pixels; calibrated coordinates for E), inlier flags [N] bool, their count (0-d int64) and
    whether a model was found (0-d bool). Nothing here waits for the device."""
    N = kp0.shape[0]
    dtype = kp0.dtype
    index = torch.arange(N, device=kp0.device)
    count = num_valid.reshape(()).to(torch.int64)
    valid = index < count
    norm = Normalised(kp0, kp1, valid, count, Kinv0, Kinv1)
    threshold = (threshold_px.to(dtype) if isinstance(threshold_px, torch.Tensor)
                 else torch.full((), float(threshold_px), dtype=dtype, device=kp0.device))
    thr2 = threshold * threshold

    # hypotheses from minimal samples (with replacement: a repeated match makes a hypothesis that scores badly)
    picks = (sample_u.to(dtype) * count.to(dtype)).to(torch.int64).clamp(min=0)
    picks = torch.minimum(picks, (count - 1).clamp_min(0))
    s0, s1 = norm.x0[picks], norm.x1[picks]  # [S, m, 2]
    if model == "homography":
        hypotheses = homography_4pt(s0, s1)
    else:
        rows = epipolar_rows(s0, s1)  # [S, 8, 9]
        normal = mm(rows.transpose(1, 2), rows)
        hypotheses = smallest_eigvec(normal, _start_vector(9, normal)).reshape(-1, 3, 3)
    hypotheses = hypotheses / hypotheses.flatten(1).norm(dim=1).clamp_min(1e-30)[:, None, None]
    hypotheses = torch.nan_to_num(hypotheses)

    # scoring under a truncated quadratic cost: every hypothesis against a preview of the matches, the best
    # of them against every match (or, without a preview, every hypothesis against every match)
    zero = torch.zeros((), dtype=dtype, device=kp0.device)
    if preview_u is not None:
        preview = torch.minimum((preview_u.to(dtype) * count.to(dtype)).to(torch.int64), (count - 1).clamp_min(0))
        preview_cost = squared_errors(model, hypotheses, norm, preview).clamp(max=thr2).sum(1)
        hypotheses = hypotheses[torch.topk(preview_cost, min(finalists, len(hypotheses)), largest=False).indices]
    cost = torch.where(valid, squared_errors(model, hypotheses, norm).clamp(max=thr2), zero).sum(1)
    current = hypotheses.index_select(0, torch.argmin(cost).reshape(1))[0]  # a 0-d index would read it on the host

    # local optimisation: IRLS with MAGSAC++ weights, then Levenberg-Marquardt on the manifold with them
    weight_valid = valid.to(dtype)
    max_threshold = threshold.clamp_min(MAGSAC_MAX_THRESHOLD_PX[model])
    lo = current
    for _ in range(IRLS_ITERATIONS):
        weights = magsac_weights(squared_errors(model, lo.unsqueeze(0), norm)[0], max_threshold) * weight_valid
        lo = weighted_fit(model, lo, weights, norm)
    lo = on_manifold(model, lo.unsqueeze(0), norm)[0]
    weights = magsac_weights(squared_errors(model, lo.unsqueeze(0), norm)[0], max_threshold) * weight_valid
    lo = refine(model, lo, weights, norm, refine_iterations)

    def msac(M: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, squared_errors(model, M.unsqueeze(0), norm)[0].clamp(max=thr2), zero).sum()

    current = on_manifold(model, current.unsqueeze(0), norm)[0]
    # The local optimisation minimises the MAGSAC++-weighted error, not the truncated quadratic cost, so its
    # model may cost a little more than the best minimal sample's: keep it unless it is clearly worse (diverged).
    keep_lo = torch.isfinite(lo).all() & (msac(lo) <= LO_COST_SLACK * msac(current))
    final = torch.where(keep_lo, lo, current)

    # the final inliers; back to pixels (calibrated coordinates for E)
    inliers = (squared_errors(model, final.unsqueeze(0), norm)[0] < thr2) & valid
    num_inliers = inliers.sum()
    if model == "homography":
        matrix = mm(mm(norm.T1_inv, final), norm.T0)
        h22 = matrix[2, 2]
        matrix = torch.where(h22.abs() > 1e-12, matrix / h22, matrix / matrix.norm().clamp_min(1e-30))
    else:
        matrix = mm(mm(norm.T1.T, final), norm.T0)
        matrix = matrix / matrix.norm().clamp_min(1e-30)
        if model == "essential":
            matrix = matrix * math.sqrt(2.0)  # singular values 1, 1, 0
    found = (num_inliers >= TORCH_MINIMAL_SAMPLE[model]) & torch.isfinite(matrix).all()
    inliers = inliers & found
    return matrix, inliers, torch.where(found, num_inliers, torch.zeros_like(num_inliers)), found


def hypotheses_for(max_iterations: int) -> int:
    """How many minimal samples one batch solves for an iteration cap: the cap, at most DEFAULT_HYPOTHESES."""
    return max(1, min(int(max_iterations), DEFAULT_HYPOTHESES))


def sample_tables(num_hypotheses: int, sample_size: int, seed: int, device: Any = "cpu",
                  preview_matches: int = PREVIEW_MATCHES) -> tuple[torch.Tensor, torch.Tensor]:
    """The uniform numbers that choose the minimal samples [S, m] and the preview matches [P]: seeded once,
    the same on every device (drawn in float64 on the CPU)."""
    generator = torch.Generator().manual_seed(int(seed))
    samples = torch.rand(num_hypotheses, sample_size, generator=generator, dtype=torch.float64)
    preview = torch.rand(preview_matches, generator=generator, dtype=torch.float64)
    return (samples.to(device=device, dtype=torch.float32), preview.to(device=device, dtype=torch.float32))


def padded_size(n: int, granule: int = 1024) -> int:
    """The fixed row count a frame of n matches runs at: the next multiple of `granule` (a few shapes,
    each a CUDA graph worth keeping, and at most granule - 1 rows of padding to score)."""
    return max(granule, -(-int(n) // granule) * granule)


VERDICT_HEADER = 11  # a packed verdict: the 3x3 matrix, found, the inlier count, then one flag per row


def pack_verdict(matrix: torch.Tensor, inliers: torch.Tensor, num_inliers: torch.Tensor,
                 found: torch.Tensor) -> torch.Tensor:
    """fit_padded's outputs as one vector [VERDICT_HEADER + N] in the matrix's dtype, so that the verdict reaches
    the host in one copy (the inlier count is exact in it: at most 2^24 rows)."""
    dtype = matrix.dtype
    return torch.cat([matrix.reshape(9), found.to(dtype).reshape(1), num_inliers.to(dtype).reshape(1),
                      inliers.to(dtype)])


def unpack_verdict(verdict: np.ndarray, n: int) -> tuple[np.ndarray, bool, int, np.ndarray]:
    """A packed verdict on the host -> (matrix float64 [3, 3], found, inlier count, flags bool [n]), copies."""
    return (verdict[:9].astype(np.float64).reshape(3, 3), bool(verdict[9]), int(verdict[10]),
            verdict[VERDICT_HEADER:VERDICT_HEADER + n] > 0)


FRAME_PARAMS = 20  # after a frame's two planes: its match count, the threshold, K0^-1 and K1^-1 (row-major)


def frame_size(rows: int) -> int:
    """Values in a frame buffer of `rows` rows: kp0 and kp1 as two planes [2, rows, 2], then FRAME_PARAMS."""
    return 4 * rows + FRAME_PARAMS


def stage_frame(frame: np.ndarray, rows: int, kp0: np.ndarray, kp1: np.ndarray, threshold: float,
                Kinv: np.ndarray | None) -> np.ndarray:
    """Write a frame of n = len(kp0) matches into a host frame buffer (rows n and beyond are left as they are) ->
    its planes [2, rows, 2]. The count is exact in float32 up to 2^24 rows. numpy, single-threaded: torch's CPU
    copy or cast would spin its OpenMP pool (87 ms of host CPU per 13 ms frame, H100 host)."""
    n = len(kp0)
    planes = frame[:4 * rows].reshape(2, rows, 2)
    planes[0, :n], planes[1, :n] = kp0, kp1  # each plane written contiguously (strided writes: ~70 us at 10,000)
    params = frame[4 * rows:]
    params[0], params[1] = n, threshold
    if Kinv is not None:
        params[2:] = Kinv.reshape(-1)
    return planes


def frame_inputs(frame: torch.Tensor, rows: int, calibrated: bool) -> tuple[torch.Tensor | None, ...]:
    """A frame buffer on the device -> the fit's inputs as views of it: (kp0, kp1, count, threshold, Kinv0, Kinv1)."""
    planes = frame[:4 * rows].view(2, rows, 2)
    params = frame[4 * rows:]
    kinv = (params[2:11].view(3, 3), params[11:20].view(3, 3)) if calibrated else (None, None)
    return (planes[0], planes[1], params[0], params[1], *kinv)


class _CapturedFit:
    """The fit for one (model, seed, row count) captured in a CUDA graph: one static device buffer holds all a frame
    brings (its two planes of matches, their count, the inlier threshold and the intrinsics: all inputs, so a new
    threshold is a write, not a new capture), filled from one pinned host buffer by one copy and replayed each frame
    (one launch instead of about a thousand); the packed verdict comes back by one copy into a pinned buffer. All
    captures of a verifier share one memory pool, so their scratch memory is that of the largest, not the sum: safe
    in any replay order because they run one at a time, read only static buffers made outside the pool, and their
    outputs are copied to the host before the next replay."""

    def __init__(self, fit: Any, rows: int, calibrated: bool, device: torch.device, dtype: torch.dtype,
                 pool: Any) -> None:
        # the frame's layout (stage_frame): one copy to the device instead of a copy and two fills (each a launch
        # of the host's)
        self.rows, self.calibrated = rows, calibrated
        self.frame = torch.zeros(frame_size(rows), device=device, dtype=dtype)
        self.frame_host = torch.zeros(frame_size(rows), dtype=dtype, pin_memory=True)
        self.staged_rows = 0  # rows of the planes holding the last frame (the rest is zero)
        self.verdict_host = torch.zeros(VERDICT_HEADER + rows, dtype=dtype, pin_memory=True)
        self.done = torch.cuda.Event(blocking=True)
        self.waiting = DeviceWait(sleep=False)  # a sub-millisecond wait: spin on the event (device_wait)
        self.fit = fit
        # a valid count, threshold and intrinsics (identities) for the warm-up and the capture
        self.frame_host[4 * rows:4 * rows + 2] = 1.0
        self.frame_host[4 * rows + 2:].view(2, 3, 3).copy_(torch.eye(3, dtype=dtype).expand(2, 3, 3))
        self.frame.copy_(self.frame_host)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.no_grad():
            self._run()  # warm-up outside the capture (compilation, allocations, lazy initialisation)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool), torch.no_grad():
            self.verdict = self._run()

    def _run(self) -> torch.Tensor:
        return self.fit(*frame_inputs(self.frame, self.rows, self.calibrated))

    def launch(self, kp0: np.ndarray, kp1: np.ndarray, threshold: float,
               Kinv: np.ndarray | None) -> Callable[[], np.ndarray]:
        """Queue the fit of kp0, kp1 [n, 2] on the device -> a function that waits for it and returns the packed
        verdict on the host (valid until the next launch)."""
        n = len(kp0)
        planes = stage_frame(self.frame_host.numpy(), self.rows, kp0, kp1, threshold, Kinv)
        planes[:, n:self.staged_rows] = 0  # padding rows are zero
        self.staged_rows = n
        self.frame.copy_(self.frame_host, non_blocking=True)
        self.graph.replay()
        self.verdict_host[:VERDICT_HEADER + n].copy_(self.verdict[:VERDICT_HEADER + n], non_blocking=True)
        self.done.record()
        return self._collect

    def _collect(self) -> np.ndarray:
        self.waiting.wait(self.done)  # the one wait for the device
        return self.verdict_host.numpy()

    def device_ms(self, repeat: int) -> float:
        """The device time of one replay (milliseconds, the mean of `repeat` back to back): the fit alone,
        without the copies and the host's work around it."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            self.graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / repeat


class TorchVerifier:
    """`verify(kp0, kp1, options) -> GeometryResult` on a torch device, same contract as geometry.verify.

    Keeps the sample tables per (model, seed); pads each frame to `rows_for(n)` rows. The threshold, the
    frame's match count and the intrinsics are inputs of the fit, so one fit per (model, seed) serves every
    setting. `compiled` (None: on CUDA) runs it under torch.compile (fullgraph, fixed shapes: one compilation
    per model and seed for every frame up to COMPILED_ROWS matches, the first such frame's stall; a compiler
    failure falls back to eager for good, said once in the log and in `compile_fallback`). On CUDA each row
    count is then captured once in a CUDA graph and replayed (`cuda_graphs=False`: not captured; a capture that
    fails falls back to uncaptured, logged once), and the input is checked on the host while the device fits.
    `preview=False` scores every hypothesis against every match (slower; for comparison)."""

    def __init__(self, device: Any = "cpu", num_hypotheses: int = DEFAULT_HYPOTHESES,
                 dtype: torch.dtype = torch.float32, preview: bool = True, cuda_graphs: bool = True,
                 compiled: bool | None = None) -> None:
        self.device = torch.device(device)
        self.num_hypotheses = num_hypotheses
        self.dtype = dtype
        self._host_dtype = torch.empty((), dtype=dtype).numpy().dtype  # the padded frame is built in it, by numpy
        self.preview = preview
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        # On CUDA the captured eager fit is launch-bound (about a thousand small kernels: 2.1 / 3.4 / 3.8 ms for
        # H / F / E at 10,000 matches, H100); the compiled one fuses them (H200: 0.47 / 0.66 / 0.74 ms, after one
        # 14-58 s compile per model). On the CPU the eager fit is the one measured (the matcher uses OpenCV there).
        self.compiled = self.device.type == "cuda" if compiled is None else bool(compiled)
        self.compile_fallback = ""  # why fits run uncompiled although compiled was asked ("" otherwise)
        self._tables: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._fits: dict[tuple[str, int], Any] = {}
        self._captured: dict[tuple[str, int, int], _CapturedFit] = {}
        self._graph_pool: Any = None
        self._last_intrinsics: tuple[tuple[Any, ...], np.ndarray | None] | None = None  # (K0, K1 by value, Kinv)

    def tables(self, model: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (model, seed)
        if key not in self._tables:
            self._tables[key] = sample_tables(self.num_hypotheses, TORCH_MINIMAL_SAMPLE[model], seed, self.device)
        return self._tables[key]

    def _make_fit(self, model: str, seed: int) -> Any:
        """fit_padded with this verifier's settings fixed: (kp0 [N, 2], kp1 [N, 2], count, threshold, Kinv0, Kinv1)
        -> the packed verdict; under torch.compile when `compiled` (it is the compiled function's one entry point)."""
        samples, preview = self.tables(model, seed)
        preview_u = preview if self.preview else None

        def geometry_fit(kp0: torch.Tensor, kp1: torch.Tensor, count: torch.Tensor, threshold: torch.Tensor,
                         kinv0: torch.Tensor | None, kinv1: torch.Tensor | None) -> torch.Tensor:
            return pack_verdict(*fit_padded(model, kp0, kp1, count, samples, threshold, kinv0, kinv1, preview_u))

        if not self.compiled:
            return geometry_fit
        # the project's compile-or-fall-back wrapper; all fits of a process share one compile cache, an entry
        # per (model, seed)
        from .compiled import FIXED_SHAPE_COMPILES, CompiledOrEager

        compiled = CompiledOrEager(geometry_fit, dynamic=False, fullgraph=True,
                                   recompile_limit=FIXED_SHAPE_COMPILES)

        def compiled_fit(*args: Any) -> torch.Tensor:
            outputs = compiled(*args)
            if compiled.fallback and self.compiled:  # compile no more fits for this verifier
                self.compiled, self.compile_fallback = False, compiled.fallback
            return outputs

        return compiled_fit

    def _launch(self, model: str, options: GeometryOptions, kp0: np.ndarray, kp1: np.ndarray,
                Kinv: np.ndarray | None) -> Callable[[], np.ndarray]:
        """Start the fit of kp0, kp1 [n, 2] -> a function returning its packed verdict on the host (on CUDA the
        device works until it is called; elsewhere the fit is done already)."""
        key = (model, options.seed)
        if key not in self._fits:
            self._fits[key] = self._make_fit(model, options.seed)
        fit = self._fits[key]
        rows = self.rows_for(len(kp0))
        if self.cuda_graphs:
            try:
                captured = self._captured.get((*key, rows))
                if captured is None:
                    if self._graph_pool is None:
                        self._graph_pool = torch.cuda.graph_pool_handle()
                    captured = self._captured[(*key, rows)] = _CapturedFit(fit, rows, Kinv is not None, self.device,
                                                                           self.dtype, self._graph_pool)
                return captured.launch(kp0, kp1, float(options.threshold_px), Kinv)
            except RuntimeError as exc:  # a torch or driver that cannot capture this: uncaptured from now on
                logging.getLogger(__name__).warning("geometry: CUDA graph capture failed (%s); verifying without a "
                                                    "graph", exc)
                self.cuda_graphs = False
        # the captured fit's frame layout, built in the verifier's dtype (stage_frame), padding rows zero
        frame = np.zeros(frame_size(rows), self._host_dtype)
        stage_frame(frame, rows, kp0, kp1, float(options.threshold_px), Kinv)
        with torch.no_grad():
            verdict = fit(*frame_inputs(torch.from_numpy(frame).to(device=self.device), rows, Kinv is not None))
        return lambda: verdict.cpu().numpy()

    def _inverse_intrinsics(self, options: GeometryOptions) -> np.ndarray | None:
        """[K0^-1, K1^-1] in the verifier's dtype, or None when either is missing or not a camera matrix. The last
        pair given as arrays is remembered by value: a camera's intrinsics seldom change, and checking and
        inverting them costs the host ~45 us a frame."""
        K0, K1 = options.K0, options.K1
        key = None
        if isinstance(K0, np.ndarray) and isinstance(K1, np.ndarray):
            key = (K0.dtype.str, K0.shape, K0.tobytes(), K1.dtype.str, K1.shape, K1.tobytes())
            if self._last_intrinsics is not None and self._last_intrinsics[0] == key:
                return self._last_intrinsics[1]
        checked0, why0 = check_intrinsics(K0, "K0")
        checked1, why1 = check_intrinsics(K1, "K1")
        Kinv = (None if checked0 is None or checked1 is None or why0 or why1 else
                np.stack([np.linalg.inv(checked0), np.linalg.inv(checked1)]).astype(self._host_dtype))
        if key is not None:
            self._last_intrinsics = (key, Kinv)
        return Kinv

    def rows_for(self, n: int) -> int:
        """The row count a frame of n matches is padded to: COMPILED_ROWS or more when compiled, else the next
        multiple of 1,024 (`padded_size`: the uncompiled fit's cost follows its rows)."""
        return max(COMPILED_ROWS, 1 << (int(n) - 1).bit_length()) if self.compiled else padded_size(n)

    def fit_device_ms(self, model: str, seed: int, n: int, repeat: int = 50) -> float | None:
        """The device time of the captured fit a frame of n matches runs (ms; None: none captured yet)."""
        captured = self._captured.get((model, seed, self.rows_for(n)))
        return None if captured is None else captured.device_ms(repeat)

    def verify(self, keypoints0: np.ndarray, keypoints1: np.ndarray, options: GeometryOptions) -> GeometryResult | None:
        if options.model == "none":
            return None
        model = options.model
        k0, k1 = np.asarray(keypoints0).reshape(-1, 2), np.asarray(keypoints1).reshape(-1, 2)
        n = len(k0)
        Kinv = self._inverse_intrinsics(options) if model == "essential" else None
        if k0.shape != k1.shape or n < TORCH_MINIMAL_SAMPLE[model] or (model == "essential" and Kinv is None):
            failure, _, _ = check_input(keypoints0, keypoints1, options, TORCH_MINIMAL_SAMPLE[model])
            assert failure is not None  # each of these is a failure check_input reports (or raises)
            return failure
        # the fit is queued first and the input checked while the device works (~0.1 ms of the host's at 10,000
        # matches; the intrinsics were checked above); a rejected frame's verdict is waited for and dropped
        collect = self._launch(model, options, k0, k1, Kinv)
        failure, _, _ = check_input(k0, k1, options, TORCH_MINIMAL_SAMPLE[model], intrinsics=False)
        matrix, found, num_inliers, inliers = unpack_verdict(collect(), n)
        if failure is not None:
            return failure
        if not found:
            return GeometryResult.failure(model, n, NO_MODEL_FOUND,
                                          f"no {model} fits the {n} matches (threshold {options.threshold_px:g} px)")
        return GeometryResult(model, matrix, inliers, num_inliers)
