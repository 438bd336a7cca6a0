"""The Gaussian-process match of RoMa's coarsest scale, with its solve forms.

posterior mean  mu = K_xy (K_yy + 0.1 I)^-1 f,  K(a, b) = exp((cos(a, b) - 1) / T),  T = 0.2,
f = cos(8 pi pos_conv(grid)) the Fourier embedding of the support-image coordinates.

Why the form matters (docs/parity.md, "The GP solve"; tools/gp_conditioning.py measures it): A = K_yy + 0.1 I has
eigenvalues in [0.1, n + 0.1], so kappa(A) reaches 10 n + 1 (1.1e4 .. 1.6e4 at the default 1600 tokens, on the
fixtures as on a bright object on black), and alpha = A^-1 f has entries ~17x those of f that cancel in K_xy alpha
(sum |K_xy| |alpha| ~ 3e3 x |mu|). In fp32 that product alone moves the posterior by ~2e-3 of its largest value,
whatever solved for alpha, and with it the CPU's rounding moves the original's output.

* `"inverse"` (CPU default, the original): `torch.linalg.inv` in fp32 and K_xy (A^-1 f), the original's own
  operations in the original's order (`GP.forward`, `no_cov`), so that it reproduces the original's rounding.
* `"inverse_fp64"` (diagnostic): the same system (fp32 kernels) solved and multiplied in float64.
* `"cholesky"` (GPU speed form): A = L L^T (`cholesky_ex`, no error check so no host sync), then the posterior
  weights W = K_xy A^-1 by two triangular solves of A W^T = K_yx and mu = W f. W has entries of the size of K's,
  so the product does not cancel: ~10x closer to a float64 solve than the original's order. CUDA-graph capturable.
* `"newton_schulz"` (export form, ONNX / TensorRT: MatMul, Add, Mul, ReduceSum only): A^-1 ~ X by a fixed number
  of Newton-Schulz steps X <- X (2I - A X), W = K_xy X, then `NS_REFINEMENT_STEPS` residual corrections
  W <- W + (K_xy - W A) X, and mu = W f (`newton_schulz_iterations` derives the counts).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .options import GP_SOLVERS, GpSolver  # noqa: F401  (the solve forms' names, torch-free, defined once there)

KERNEL_T = 0.2
SIGMA_NOISE = 0.1
KERNEL_EPS = 1e-6
FOURIER_FREQ = 8 * math.pi
FP32_UNIT_ROUNDOFF = 2.0 ** -24
# Residual corrections of the posterior weights after Newton-Schulz. One completes the exact-arithmetic contraction
# (newton_schulz_iterations); each squares what fp32 Newton-Schulz leaves, ||I - A X|| up to ~1 at kappa 1.6e4
# (kappa^2 u > 1: no normwise bound holds there). The second brings the worst spectrum (every feature equal,
# lambda_max = n) to the floor of one fp32 residual; a third changes nothing (measured, docs/parity.md).
NS_REFINEMENT_STEPS = 2


def cos_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B, N, D] x [B, M, D] -> [B, N, M]; eps added to the product of the norms, as the original."""
    c = torch.einsum("bnd,bmd->bnm", x, y) / (x.norm(dim=-1)[..., None] * y.norm(dim=-1)[:, None] + KERNEL_EPS)
    return torch.exp((c - 1.0) / KERNEL_T)


def newton_schulz_iterations(n: int) -> int:
    """Newton-Schulz steps before the residual corrections, for any n x n system of this GP.

    A = K + 0.1 I with K entries in (0, 1]: eigenvalues in [0.1, n + 0.1] (Gershgorin). From X0 = 2 / (l + 0.1) I,
    l >= lambda_max the Gershgorin bound computed at run time, the error I - A X_k has eigenvalues
    (1 - 2 lambda / (l + 0.1))^(2^k), at most rho^(2^k) with rho = n / (n + 0.2) (the worst case l = n + 0.1).
    No fp32 step can resolve anything below the unit round-off u = 2^-24, so the contraction stops at
    rho^(2^K) <= u; the first residual correction squares the error once more (it is one Newton-Schulz step in
    residual form), hence K - 1 steps here. What fp32 rounding leaves is for the corrections (NS_REFINEMENT_STEPS)."""
    rho = n / (n + 2.0 * SIGMA_NOISE)
    contraction_steps = math.ceil(math.log2(math.log(FP32_UNIT_ROUNDOFF) / math.log(rho)))
    return max(contraction_steps - 1, 1)


def newton_schulz_inverse(a: torch.Tensor, iterations: int) -> torch.Tensor:
    """Approximate inverse of a batch of SPD matrices [B, n, n] with eigenvalues >= SIGMA_NOISE."""
    n = a.shape[-1]
    eye = torch.eye(n, dtype=a.dtype, device=a.device).expand_as(a)
    # Gershgorin: every eigenvalue <= the largest absolute row sum
    lam_hi = a.abs().sum(dim=-1).amax(dim=-1)[:, None, None]
    x = eye * (2.0 / (lam_hi + SIGMA_NOISE))
    for _ in range(iterations):
        x = x @ (2.0 * eye - a @ x)
    # no symmetrisation: averaging with the transpose made the posterior 15x less accurate (measured)
    return x


def newton_schulz_posterior(k_xy: torch.Tensor, a: torch.Tensor, f: torch.Tensor,
                            iterations: int | None = None, refinement_steps: int = NS_REFINEMENT_STEPS) -> torch.Tensor:
    """mu = K_xy A^-1 f with matrix products only: W = K_xy X (X by Newton-Schulz), corrected by
    W <- W + (K_xy - W A) X, then W f. In exact arithmetic each correction squares the error (W* E -> W* E^2,
    E = I - A X); in fp32 the residual K_xy - W A is formed without the cancellation of K_xy (A^-1 f)."""
    x = newton_schulz_inverse(a, newton_schulz_iterations(a.shape[-1]) if iterations is None else iterations)
    w = k_xy @ x
    for _ in range(refinement_steps):
        w = w + (k_xy - w @ a) @ x
    return w @ f


def solve_posterior(solver: GpSolver, k_xy: torch.Tensor, a: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """The posterior mean [B, Nq, dim] of the system (K_xy [B, Nq, Ns], A = K_yy + 0.1 I, f [B, Ns, dim])."""
    if solver == "inverse":
        return k_xy @ (torch.linalg.inv(a) @ f)
    if solver == "cholesky":
        # A is SPD (eigenvalues >= 0.1): the factorisation cannot fail, so its info is not checked
        low, _ = torch.linalg.cholesky_ex(a)
        z = torch.linalg.solve_triangular(low, k_xy.transpose(1, 2), upper=False)
        weights_t = torch.linalg.solve_triangular(low.transpose(-1, -2), z, upper=True)  # A^-1 K_yx
        return weights_t.transpose(1, 2) @ f
    if solver == "newton_schulz":
        return newton_schulz_posterior(k_xy, a, f)
    if solver == "inverse_fp64":
        return (k_xy.double() @ (torch.linalg.inv(a.double()) @ f.double())).float()
    raise ValueError(f"unknown GP solver {solver!r}; choose one of {', '.join(GP_SOLVERS)}")


class GaussianProcessMatch(nn.Module):
    """RoMa `GP` (CosKernel, T = 0.2, sigma_noise 0.1, Fourier basis, no covariance)."""

    def __init__(self, dim: int = 512, solver: GpSolver = "inverse") -> None:
        super().__init__()
        self.pos_conv = nn.Conv2d(2, dim, 1, 1)
        self.solver: GpSolver = solver

    def kernel_system(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query features x, support features y [B, C, h, w] -> (K_xy [B, hw, hw], A = K_yy + 0.1 I, f [B, hw, dim]),
        in fp32 as the original computes them."""
        b, _, h, w = y.shape
        grid_y, grid_x = torch.meshgrid(
            torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=y.device),
            torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=y.device), indexing="ij")
        coords = torch.stack((grid_x, grid_y))[None].expand(b, 2, h, w)
        f = torch.cos(FOURIER_FREQ * self.pos_conv(coords.to(self.pos_conv.weight.dtype))).float()
        f = f.flatten(2).transpose(1, 2)  # [B, h*w, dim]
        xq = x.float().flatten(2).transpose(1, 2)
        ys = y.float().flatten(2).transpose(1, 2)
        k_xy = cos_kernel(xq, ys)
        k_yy = cos_kernel(ys, ys)
        n = k_yy.shape[-1]
        eye = torch.eye(n, device=k_yy.device, dtype=k_yy.dtype)
        a = k_yy + SIGMA_NOISE * eye
        # MatchAnything's addition: +0.1 on diagonal entries that are exactly 0 (never true here; kept literal)
        a = a + SIGMA_NOISE * eye * (a == 0).to(a.dtype)
        return k_xy, a, f

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Query features x, support features y [B, C, h, w] -> posterior mean [B, dim, h, w]."""
        k_xy, a, f = self.kernel_system(x, y)
        mu = solve_posterior(self.solver, k_xy, a, f)
        return mu.transpose(1, 2).reshape(x.shape[0], -1, x.shape[2], x.shape[3])
