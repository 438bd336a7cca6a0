"""Geometric verification of matches: a homography, fundamental or essential matrix and its inliers.

`verify(keypoints0, keypoints1, options) -> GeometryResult` fits the model with OpenCV's USAC
(`USAC_MAGSAC`: uniform sampling, MAGSAC++ score, sigma-consensus local optimisation), the path for the
CPU and for ONNX Runtime / TensorRT outputs; `geometry_torch.TorchVerifier` is the batched one that
stays on a CUDA device. Both check their input the same way (`check_input`).

USAC's time grows with the number of matches it scores (every hypothesis and every local-optimisation step
visits them all), not with the scene. Above `options.usac_matches` matches it therefore fits on a seeded subset
spread over image0 (`spread_subset`), and every match is then classified against that model with the error and
threshold OpenCV's own mask uses (`opencv_inlier_error`); at or below it, the result is plain OpenCV's.

Bad input never raises: fewer matches than a minimal sample, a degenerate set (all points identical or
on one line in either image), non-finite coordinates or missing/invalid intrinsics give no model, every
inlier flag false, and a reason (a short code for counters and a sentence for people).

Conventions (those of OpenCV): homography H maps image0 to image1 (x1 ~ H x0), normalised to H[2,2] = 1;
fundamental F satisfies x1^T F x0 = 0 in pixels; essential E satisfies x1^T E x0 = 0 in normalised
camera coordinates (x = K^-1 [u, v, 1]) with K0 for image0 and K1 for image1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .params import GEOMETRY_MODELS, default
# Fewest matches OpenCV's solvers take: 4-point homography, 8 for the fundamental matrix (its 7-point
# solver returns nothing below 8 in USAC), 5-point essential matrix.
MINIMAL_SAMPLE = {"homography": 4, "fundamental": 8, "essential": 5}
# MAGSAC's local optimisation as OpenCV's USAC_MAGSAC flag configures it (sample size, inner iterations).
MAGSAC_LO = {"homography": (75, 15), "fundamental": (50, 10), "essential": (50, 10)}
# A point set whose second principal axis is below this fraction of the first lies on a line (exactly,
# up to float rounding): no homography or epipolar geometry is defined by it.
COLLINEAR_RATIO = 1e-6
# Cells per side of the grid a subset for OpenCV's fit is spread over (spread_subset).
SUBSET_GRID = 16

# Reason codes (counted by the node's diagnostics); the sentence in GeometryResult.reason says more.
TOO_FEW_MATCHES = "too_few_matches"
DEGENERATE = "degenerate"
NON_FINITE = "non_finite"
NO_INTRINSICS = "no_intrinsics"
BAD_INTRINSICS = "bad_intrinsics"
NO_MODEL_FOUND = "no_model_found"
REASON_CODES = (TOO_FEW_MATCHES, DEGENERATE, NON_FINITE, NO_INTRINSICS, BAD_INTRINSICS, NO_MODEL_FOUND)


@dataclass(frozen=True, eq=False)
class GeometryOptions:
    """What to fit and how. `K0`/`K1`: 3x3 intrinsics of image0/image1, needed by `essential` only."""

    model: str = default("geometry")
    threshold_px: float = default("geometry_threshold_px")  # inlier: transfer error / Sampson distance below this
    confidence: float = default("geometry_confidence")
    max_iterations: int = default("geometry_max_iterations")
    usac_matches: int = default("geometry_usac_matches")  # OpenCV fits on at most this many (see spread_subset)
    seed: int = 0  # the sampler's state: the same seed and input give the same result
    K0: np.ndarray | None = None
    K1: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.model not in GEOMETRY_MODELS:
            raise ValueError(f"geometry model {self.model!r} is not one of {', '.join(GEOMETRY_MODELS)}")


@dataclass
class GeometryResult:
    """The verdict on one pair's matches. `inliers[k]` is the flag of match k; no model: all False."""

    model: str  # homography | fundamental | essential
    matrix: np.ndarray | None  # float64 [3, 3], None when no model was found
    inliers: np.ndarray  # bool [N]
    num_inliers: int
    reason: str = ""  # why there is no model (empty when there is one)
    reason_code: str = ""  # one of REASON_CODES, or empty
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def found(self) -> bool:
        return self.matrix is not None

    @classmethod
    def failure(cls, model: str, n: int, code: str, reason: str) -> "GeometryResult":
        return cls(model, None, np.zeros(n, bool), 0, reason, code)

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "matrix": None if self.matrix is None else np.asarray(self.matrix, float).tolist(),
            "inliers": np.asarray(self.inliers, bool).tolist(),
            "num_inliers": int(self.num_inliers),
            **({"reason": self.reason, "reason_code": self.reason_code} if self.reason else {}),
        }


def check_intrinsics(K: Any, name: str) -> tuple[np.ndarray | None, str]:
    """-> (K as float64 3x3, "") or (None, why it cannot be used)."""
    if K is None:
        return None, f"{name} is missing"
    try:
        K = np.asarray(K, dtype=np.float64)
    except (TypeError, ValueError):
        return None, f"{name} is not numeric"
    if K.size == 9:
        K = K.reshape(3, 3)
    if K.shape != (3, 3):
        return None, f"{name} must be 3x3, got shape {K.shape}"
    if not np.isfinite(K).all():
        return None, f"{name} has non-finite entries"
    if K[0, 0] <= 0 or K[1, 1] <= 0 or abs(K[2, 2] - 1.0) > 1e-9 or np.any(K[2, :2] != 0) or K[1, 0] != 0:
        return None, (f"{name} is not a camera matrix [[fx, s, cx], [0, fy, cy], [0, 0, 1]] with fx, fy > 0 "
                      f"(got {K.ravel().tolist()}); an uncalibrated camera publishes zeros")
    return K, ""


def _degenerate_reason(points: np.ndarray, which: str) -> str:
    # The spread's singular values in closed form, with the points as complex numbers z = x + iy: for the centred
    # c, sum |c|^2 is the 2x2 scatter matrix's trace and |sum c^2| the difference of its eigenvalues. Every step is
    # a 1-D pass (numpy's [N, 2] broadcasts and axis-0 reductions cost ~0.2 ms an image at 10,000 matches, a
    # quarter of the GPU verifier's budget; these ~20 us).
    z = np.ascontiguousarray(points, dtype=np.float64).view(np.complex128).ravel()
    centred = z - z.mean()
    trace = float(np.vdot(centred, centred).real)
    gap = float(abs(np.dot(centred, centred)))
    largest, smallest = (math.sqrt(max(0.5 * (trace + gap), 0.0)), math.sqrt(max(0.5 * (trace - gap), 0.0)))
    if largest <= 1e-9 * max(1.0, float(np.abs(points).max())):
        return f"all {len(points)} keypoints in {which} are the same point"
    if smallest <= COLLINEAR_RATIO * largest:
        return f"all {len(points)} keypoints in {which} lie on one line"
    return ""


def check_input(keypoints0: np.ndarray, keypoints1: np.ndarray, options: GeometryOptions,
                minimal_sample: int, intrinsics: bool = True) -> tuple[GeometryResult | None, np.ndarray, np.ndarray]:
    """-> (a failure result, or None when fitting can go ahead; keypoints as float64 [N, 2] each).
    `intrinsics=False`: the essential matrix's K0 / K1 are not checked (the caller has)."""
    k0 = np.asarray(keypoints0, dtype=np.float64).reshape(-1, 2)
    k1 = np.asarray(keypoints1, dtype=np.float64).reshape(-1, 2)
    if k0.shape != k1.shape:
        raise ValueError(f"keypoints0 {k0.shape} and keypoints1 {k1.shape} differ in length")  # a caller's bug
    n, model = len(k0), options.model
    if n < minimal_sample:
        return GeometryResult.failure(model, n, TOO_FEW_MATCHES,
                                      f"{n} matches, fewer than the {minimal_sample} a {model} needs"), k0, k1
    if not (np.isfinite(k0).all() and np.isfinite(k1).all()):  # the per-row count only when there is one
        bad = ~(np.isfinite(k0).all(axis=1) & np.isfinite(k1).all(axis=1))
        return GeometryResult.failure(model, n, NON_FINITE,
                                      f"{int(bad.sum())} of {n} matches have non-finite coordinates"), k0, k1
    for points, which in ((k0, "image0"), (k1, "image1")):
        why = _degenerate_reason(points, which)
        if why:
            return GeometryResult.failure(model, n, DEGENERATE, f"degenerate matches: {why}"), k0, k1
    if model == "essential" and intrinsics:
        for K, name in ((options.K0, "K0"), (options.K1, "K1")):
            if K is None:
                return GeometryResult.failure(model, n, NO_INTRINSICS,
                                              f"the essential matrix needs intrinsics: {name} is missing"), k0, k1
            _, why = check_intrinsics(K, name)
            if why:
                return GeometryResult.failure(model, n, BAD_INTRINSICS, f"invalid intrinsics: {why}"), k0, k1
    return None, k0, k1


def usac_params(options: GeometryOptions) -> Any:
    """cv2.UsacParams equal to what the `cv2.USAC_MAGSAC` flag sets, plus our seed."""
    import cv2

    params = cv2.UsacParams()
    params.threshold = float(options.threshold_px)
    params.confidence = float(options.confidence)
    params.maxIterations = int(options.max_iterations)
    params.sampler = cv2.SAMPLING_UNIFORM
    params.score = cv2.SCORE_METHOD_MAGSAC
    params.loMethod = cv2.LOCAL_OPTIM_SIGMA
    params.loSampleSize, params.loIterations = MAGSAC_LO[options.model]
    params.final_polisher = cv2.LSQ_POLISHER
    params.final_polisher_iterations = 3
    params.isParallel = False  # a parallel run is not reproducible
    params.randomGeneratorState = int(options.seed)
    return params


def spread_subset(points: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of `size` of the [N, 2] `points`, spread over their bounding box: a seeded shuffle taken
    round-robin over a SUBSET_GRID x SUBSET_GRID grid of cells (every occupied cell gives its k-th point before
    any cell gives its k+1-th), so a sparse region of the image keeps its matches and a dense one cannot crowd
    it out of the fit."""
    n = len(points)
    shuffled = np.random.default_rng(seed).permutation(n)
    cell = np.zeros(n, np.int16)
    for axis, scale in ((0, 1), (1, SUBSET_GRID)):  # per column: numpy's axis-0 reductions of [N, 2] are slow
        values = points[shuffled, axis]
        low, span = values.min(), max(float(values.max() - values.min()), 1e-12)
        cell += np.minimum((values - low) * (SUBSET_GRID / span), SUBSET_GRID - 1).astype(np.int16) * scale
    by_cell = np.argsort(cell, kind="stable")  # shuffled order within each cell (a radix sort for int16)
    sorted_cell = cell[by_cell]
    first_of_cell = np.flatnonzero(np.r_[True, sorted_cell[1:] != sorted_cell[:-1]])
    turn = np.empty(n, np.int64)  # the point's place in its cell
    turn[by_cell] = np.arange(n) - np.repeat(first_of_cell, np.diff(np.r_[first_of_cell, n]))
    taken = np.argpartition(turn * n + np.arange(n), size - 1)[:size]  # by turn, then by shuffled position
    return np.sort(shuffled[taken])


def opencv_inlier_error(model: str, matrix: np.ndarray, k0: np.ndarray, k1: np.ndarray,
                        K0: np.ndarray | None = None, K1: np.ndarray | None = None) -> np.ndarray:
    """[N] the error OpenCV's USAC thresholds for its inlier mask, in pixels: forward transfer error
    (homography), Sampson distance (fundamental), Sampson distance in normalised camera coordinates times the
    mean of the four focal lengths (essential: OpenCV divides the pixel threshold by that mean)."""
    if model == "homography":
        return transfer_error(matrix, k0, k1)
    if model == "fundamental":
        return sampson_error(matrix, k0, k1)
    assert K0 is not None and K1 is not None
    calibrated0 = homogeneous(k0) @ np.linalg.inv(K0).T
    calibrated1 = homogeneous(k1) @ np.linalg.inv(K1).T
    mean_focal = (K0[0, 0] + K0[1, 1] + K1[0, 0] + K1[1, 1]) / 4.0
    return sampson_error(matrix, calibrated0[:, :2], calibrated1[:, :2]) * mean_focal


def _opencv_fit(model: str, k0: np.ndarray, k1: np.ndarray, options: GeometryOptions,
                K0: np.ndarray | None, K1: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """OpenCV's USAC_MAGSAC on these matches -> (3x3 model, inlier mask, "") or (None, None, why not)."""
    import cv2

    params = usac_params(options)
    try:
        if model == "homography":
            matrix, mask = cv2.findHomography(k0, k1, params)
        elif model == "fundamental":
            matrix, mask = cv2.findFundamentalMat(k0, k1, params)
        else:
            assert K0 is not None and K1 is not None  # check_input accepted them
            no_distortion = np.zeros(5)
            matrix, mask = cv2.findEssentialMat(k0, k1, K0, K1, no_distortion, no_distortion, params)
    except cv2.error as exc:  # OpenCV refuses some inputs our checks let through (e.g. near-degenerate)
        return None, None, f"OpenCV found no {model}: {exc.err}"
    if matrix is None or mask is None or np.asarray(matrix).size < 9 or not np.isfinite(matrix).all():
        return None, None, f"no {model} fits the {len(k0)} matches (threshold {options.threshold_px:g} px)"
    # several E solutions come stacked: the first is the best
    return np.asarray(matrix, dtype=np.float64)[:3, :3].copy(), np.asarray(mask).reshape(-1).astype(bool), ""


def verify(keypoints0: np.ndarray, keypoints1: np.ndarray, options: GeometryOptions) -> GeometryResult | None:
    """Fit `options.model` to the matches with OpenCV's USAC MAGSAC (on a spread subset above
    `options.usac_matches` matches). None when the model is `none`."""
    if options.model == "none":
        return None
    model = options.model
    failure, k0, k1 = check_input(keypoints0, keypoints1, options, MINIMAL_SAMPLE[model])
    if failure is not None:
        return failure
    n = len(k0)
    K0 = K1 = None
    if model == "essential":
        K0, _ = check_intrinsics(options.K0, "K0")
        K1, _ = check_intrinsics(options.K1, "K1")
    extras: dict[str, Any] = {}
    matrix = inliers = None
    if n > options.usac_matches:
        subset = spread_subset(k0, options.usac_matches, options.seed)
        matrix, _, _ = _opencv_fit(model, k0[subset], k1[subset], options, K0, K1)
        if matrix is not None:
            inliers = opencv_inlier_error(model, matrix, k0, k1, K0, K1) < options.threshold_px
            extras["usac_matches"] = len(subset)
    if matrix is None:  # all matches, or a subset that gave no model (then all matches get their chance)
        matrix, inliers, why = _opencv_fit(model, k0, k1, options, K0, K1)
        if matrix is None:
            return GeometryResult.failure(model, n, NO_MODEL_FOUND, why)
    assert inliers is not None
    num_inliers = int(inliers.sum())
    minimal = MINIMAL_SAMPLE[model]
    if num_inliers < minimal:
        return GeometryResult.failure(model, n, NO_MODEL_FOUND,
                                      f"the best {model} has {num_inliers} inliers, fewer than {minimal}")
    return GeometryResult(model, matrix, inliers, num_inliers, extras=extras)


# ------------------------------------------------------------------------------------ error measures
def homogeneous(points: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(points, np.float64), np.ones((len(points), 1))], axis=1)


def transfer_error(H: np.ndarray, keypoints0: np.ndarray, keypoints1: np.ndarray) -> np.ndarray:
    """[N] distance in image1 pixels between keypoints1 and H applied to keypoints0."""
    mapped = homogeneous(keypoints0) @ np.asarray(H, np.float64).T
    return np.asarray(np.linalg.norm(mapped[:, :2] / mapped[:, 2:] - keypoints1, axis=1))


def sampson_error(F: np.ndarray, keypoints0: np.ndarray, keypoints1: np.ndarray) -> np.ndarray:
    """[N] Sampson distance (pixels) of each match to the epipolar geometry x1^T F x0 = 0."""
    x0, x1 = homogeneous(keypoints0), homogeneous(keypoints1)
    Fx0, Ftx1 = x0 @ np.asarray(F, np.float64).T, x1 @ np.asarray(F, np.float64)
    residual = np.sum(x1 * Fx0, axis=1)
    denominator = Fx0[:, 0] ** 2 + Fx0[:, 1] ** 2 + Ftx1[:, 0] ** 2 + Ftx1[:, 1] ** 2
    return np.asarray(np.abs(residual) / np.sqrt(np.maximum(denominator, 1e-300)))


def symmetric_epipolar_error(F: np.ndarray, keypoints0: np.ndarray, keypoints1: np.ndarray) -> np.ndarray:
    """[N] mean of the two point-to-epipolar-line distances (pixels)."""
    x0, x1 = homogeneous(keypoints0), homogeneous(keypoints1)
    Fx0, Ftx1 = x0 @ np.asarray(F, np.float64).T, x1 @ np.asarray(F, np.float64)
    residual = np.abs(np.sum(x1 * Fx0, axis=1))
    d1 = residual / np.maximum(np.hypot(Fx0[:, 0], Fx0[:, 1]), 1e-300)
    d0 = residual / np.maximum(np.hypot(Ftx1[:, 0], Ftx1[:, 1]), 1e-300)
    return np.asarray(0.5 * (d0 + d1))


def fundamental_from_essential(E: np.ndarray, K0: np.ndarray, K1: np.ndarray) -> np.ndarray:
    """F = K1^-T E K0^-1 (pixels)."""
    return np.asarray(np.linalg.inv(K1).T @ E @ np.linalg.inv(K0))
