"""Geometric verification (issue 23): the OpenCV verifier and the batched torch verifier (on the CPU here),
bad input, reproducibility, the essential matrix, the results' JSON and message fields, the settings.

Agreement of the two verifiers on real matches with ground truth: test/test_geometry_quality.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from matchanything_ros.core.errors import ConfigError
from matchanything_ros.core.geometry import (BAD_INTRINSICS, DEGENERATE, MINIMAL_SAMPLE, NO_INTRINSICS, NON_FINITE,
                                             SUBSET_GRID, TOO_FEW_MATCHES, GeometryOptions, GeometryResult,
                                             fundamental_from_essential, opencv_inlier_error, sampson_error,
                                             spread_subset, transfer_error, verify)
from matchanything_ros.core.geometry_torch import TORCH_MINIMAL_SAMPLE, TorchVerifier, padded_size
from matchanything_ros.core.result import MatchResult

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "geometry" / "demo_matches.npz"
MODELS = ("homography", "fundamental", "essential")
K_LEFT = np.array([[800.0, 0.0, 640.0], [0.0, 810.0, 360.0], [0.0, 0.0, 1.0]])
K_RIGHT = np.array([[700.0, 0.0, 600.0], [0.0, 700.0, 350.0], [0.0, 0.0, 1.0]])
TRUE_ROTATION_VEC = np.array([0.02, 0.1, 0.01])
TRUE_TRANSLATION = np.array([1.0, 0.1, 0.2])


@pytest.fixture(scope="module")
def torch_verifier() -> TorchVerifier:
    return TorchVerifier("cpu")


@pytest.fixture(params=["opencv", "torch"])
def verifier(request, torch_verifier):  # type: ignore[no-untyped-def]
    """Both verifiers behind the same call: verify(keypoints0, keypoints1, options) -> GeometryResult."""
    return verify if request.param == "opencv" else torch_verifier.verify


def minimal(model: str, verifier_fn) -> int:  # type: ignore[no-untyped-def]
    return MINIMAL_SAMPLE[model] if verifier_fn is verify else TORCH_MINIMAL_SAMPLE[model]


def two_view_scene(n: int = 2000, outlier_share: float = 0.4, seed: int = 0,
                   planar: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points seen by two calibrated cameras (K_LEFT, K_RIGHT; known motion), 0.3 px noise, and outliers
    scattered over image1. -> (keypoints0, keypoints1, true inlier flags)."""
    rng = np.random.default_rng(seed)
    depth = np.full(n, 10.0) if planar else rng.uniform(4, 20, n)
    X = np.stack([rng.uniform(-4, 4, n), rng.uniform(-2, 2, n), depth], axis=1)
    R = cv2.Rodrigues(TRUE_ROTATION_VEC)[0]
    p0 = X @ K_LEFT.T
    p1 = (X @ R.T + TRUE_TRANSLATION) @ K_RIGHT.T
    k0, k1 = p0[:, :2] / p0[:, 2:], p1[:, :2] / p1[:, 2:] + rng.normal(0, 0.3, (n, 2))
    outlier = rng.random(n) < outlier_share
    k1[outlier] = rng.uniform([0, 0], [1280, 720], (int(outlier.sum()), 2))
    return k0, k1, ~outlier


def options(model: str, **kw) -> GeometryOptions:  # type: ignore[no-untyped-def]
    return GeometryOptions(model, **({"K0": K_LEFT, "K1": K_RIGHT} if model == "essential" else {}), **kw)


def assert_no_model(result: GeometryResult | None, n: int, code: str) -> None:
    assert result is not None and not result.found and result.matrix is None
    assert result.inliers.dtype == bool and result.inliers.shape == (n,) and not result.inliers.any()
    assert result.num_inliers == 0 and result.reason_code == code and result.reason


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("model", MODELS)
def test_fewer_matches_than_a_minimal_sample(verifier, model: str) -> None:  # type: ignore[no-untyped-def]
    k0, k1, _ = two_view_scene(100, outlier_share=0.0)
    m = minimal(model, verifier)
    for n in (0, 1, m - 1):
        result = verifier(k0[:n], k1[:n], options(model))
        assert_no_model(result, n, TOO_FEW_MATCHES)
        assert f"fewer than the {m}" in result.reason


@pytest.mark.parametrize("model", MODELS)
def test_all_matches_identical_or_on_a_line(verifier, model: str) -> None:  # type: ignore[no-untyped-def]
    k0, k1, _ = two_view_scene(60, outlier_share=0.0)
    same = np.tile([[320.5, 240.25]], (60, 1))
    result = verifier(same, k1, options(model))
    assert_no_model(result, 60, DEGENERATE)
    assert "same point" in result.reason and "image0" in result.reason
    t = np.linspace(0, 1, 60)[:, None]
    line = np.hstack([100 + 500 * t, 50 + 300 * t])  # every point on one line, exactly
    result = verifier(k0, line, options(model))
    assert_no_model(result, 60, DEGENERATE)
    assert "one line" in result.reason and "image1" in result.reason
    # far from the origin (a panorama's pixels): still one line, still one point; a 2-px cloud there is not
    far = np.array([20000.0, 15000.0])
    for points, why in ((line + far, "one line"), (same + far, "same point")):
        result = verifier(k0, points, options(model))
        assert_no_model(result, 60, DEGENERATE)
        assert why in result.reason
    cloud = far + np.random.default_rng(1).uniform(0, 2, (60, 2))
    assert verifier(k0, cloud, options(model)).reason_code != DEGENERATE


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("model", MODELS)
def test_non_finite_keypoints(verifier, model: str, bad: float) -> None:  # type: ignore[no-untyped-def]
    k0, k1, _ = two_view_scene(200)
    k1 = k1.copy()
    k1[17, 1] = bad
    result = verifier(k0, k1, options(model))
    assert_no_model(result, 200, NON_FINITE)
    assert "1 of 200" in result.reason


def test_essential_without_or_with_unusable_intrinsics(verifier) -> None:  # type: ignore[no-untyped-def]
    k0, k1, _ = two_view_scene(300)
    assert_no_model(verifier(k0, k1, GeometryOptions("essential")), 300, NO_INTRINSICS)
    uncalibrated = np.zeros((3, 3))  # what a camera_info of an uncalibrated camera carries
    for K0, K1, what in [(uncalibrated, K_RIGHT, "K0"), (K_LEFT, np.full((3, 3), np.nan), "K1"),
                         (K_LEFT, np.eye(2), "K1")]:
        result = verifier(k0, k1, GeometryOptions("essential", K0=K0, K1=K1))
        assert_no_model(result, 300, BAD_INTRINSICS)
        assert what in result.reason


def test_torch_verifier_follows_changed_intrinsics() -> None:
    """The verifier remembers the last intrinsics by value: the same array changed in place, a new pair, an unusable
    one and the first again each give what a fresh verifier gives for them."""
    k0, k1, _ = two_view_scene(800)
    K0, K1 = K_LEFT.copy(), K_RIGHT.copy()
    verifier = TorchVerifier("cpu")
    first = verifier.verify(k0, k1, GeometryOptions("essential", K0=K0, K1=K1))
    assert first is not None and first.found
    K0[0, 0] = K0[1, 1] = 400.0  # the caller's array changed in place: a new camera
    cases = [(K0, K1), (K_RIGHT, K_LEFT), (np.zeros((3, 3)), K1), (K_LEFT, K_RIGHT)]
    for a, b in cases:
        options = GeometryOptions("essential", K0=a, K1=b)
        got, fresh = verifier.verify(k0, k1, options), TorchVerifier("cpu").verify(k0, k1, options)
        assert got is not None and fresh is not None and got.reason_code == fresh.reason_code
        assert np.array_equal(got.inliers, fresh.inliers)
        assert (got.matrix is None and fresh.matrix is None) or np.array_equal(got.matrix, fresh.matrix)
    changed = TorchVerifier("cpu").verify(k0, k1, GeometryOptions("essential", K0=K0, K1=K1))
    assert changed is not None and not np.array_equal(changed.matrix, first.matrix)  # the change mattered
    assert got.reason_code == "" and np.array_equal(got.matrix, first.matrix)  # back to the first pair


def test_none_verifies_nothing(verifier) -> None:  # type: ignore[no-untyped-def]
    k0, k1, _ = two_view_scene(50)
    assert verifier(k0, k1, GeometryOptions("none")) is None


def test_unknown_model_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="not one of"):
        GeometryOptions("affine")


# ------------------------------------------------------------------------------------------ models
@pytest.mark.parametrize("model", MODELS)
def test_recovers_the_true_model_among_40_percent_outliers(verifier, model: str) -> None:  # type: ignore[no-untyped-def]
    k0, k1, truth = two_view_scene(3000, outlier_share=0.4, planar=model == "homography")
    result = verifier(k0, k1, options(model))
    assert result.found, result.reason
    assert result.matrix.shape == (3, 3) and result.num_inliers == int(result.inliers.sum())
    agree = (result.inliers & truth).sum() / (result.inliers | truth).sum()
    assert agree >= 0.98, agree  # 0.3 px noise, 1 px threshold: a handful of outliers land on the model
    if model == "homography":
        assert result.matrix[2, 2] == pytest.approx(1.0)
        assert np.median(transfer_error(result.matrix, k0[truth], k1[truth])) < 0.5
    else:
        F = result.matrix if model == "fundamental" else fundamental_from_essential(result.matrix, K_LEFT, K_RIGHT)
        assert np.median(sampson_error(F, k0[truth], k1[truth])) < 0.3
        singular = np.linalg.svd(result.matrix, compute_uv=False)
        assert singular[2] < 1e-6 * singular[0]  # rank 2
    if model == "essential":
        singular = np.linalg.svd(result.matrix, compute_uv=False)
        assert singular[1] == pytest.approx(singular[0], rel=1e-5)  # on the essential manifold
        c0 = cv2.undistortPoints(k0[result.inliers].reshape(-1, 1, 2), K_LEFT, None)
        c1 = cv2.undistortPoints(k1[result.inliers].reshape(-1, 1, 2), K_RIGHT, None)
        _, R, t, _ = cv2.recoverPose(result.matrix, c0, c1, np.eye(3))
        rotation_error = np.degrees(np.linalg.norm(cv2.Rodrigues(R @ cv2.Rodrigues(TRUE_ROTATION_VEC)[0].T)[0]))
        direction_error = np.degrees(np.arccos(t.ravel() @ TRUE_TRANSLATION / np.linalg.norm(TRUE_TRANSLATION)))
        assert rotation_error < 0.1 and direction_error < 0.5, (rotation_error, direction_error)


def test_opencv_path_is_usac_magsac_and_seeded() -> None:
    """Seed 0 on all matches (usac_matches at or above their count) is exactly what the cv2.USAC_MAGSAC flag gives;
    another seed samples otherwise, reproducibly (on all matches and on a subset)."""
    with np.load(FIXTURE) as data:
        k0, k1 = data["motorcycle_k0"].astype(np.float64), data["motorcycle_k1"].astype(np.float64)
    n = len(k0)
    assert n > GeometryOptions().usac_matches  # the default fits a subset of this pair
    ours = verify(k0, k1, GeometryOptions("fundamental", 1.0, 0.999, 10000, usac_matches=n, seed=0))
    F, mask = cv2.findFundamentalMat(k0, k1, cv2.USAC_MAGSAC, 1.0, 0.999, 10000)
    assert np.array_equal(ours.matrix, F) and np.array_equal(ours.inliers, mask.ravel().astype(bool))
    assert "usac_matches" not in ours.extras
    H, mask = cv2.findHomography(k0, k1, cv2.USAC_MAGSAC, 1.0, maxIters=10000, confidence=0.999)
    ours = verify(k0, k1, GeometryOptions("homography", 1.0, 0.999, 10000, usac_matches=n + 1, seed=0))
    assert np.array_equal(ours.matrix, H) and np.array_equal(ours.inliers, mask.ravel().astype(bool))
    for usac_matches in (n, 2000):
        first = verify(k0, k1, GeometryOptions("fundamental", usac_matches=usac_matches, seed=7))
        again = verify(k0, k1, GeometryOptions("fundamental", usac_matches=usac_matches, seed=7))
        assert np.array_equal(first.matrix, again.matrix) and np.array_equal(first.inliers, again.inliers)


@pytest.mark.parametrize("model", MODELS)
def test_the_inlier_error_is_the_one_opencvs_mask_thresholds(model: str) -> None:
    """opencv_inlier_error(model) < threshold reproduces OpenCV's own mask (up to float rounding at the threshold),
    so matches left out of a subset's fit are classified as OpenCV would have: also for the essential matrix of
    two cameras with very different focal lengths, where a pixel Sampson distance would not do."""
    K0 = np.array([[500.0, 0.0, 640.0], [0.0, 900.0, 360.0], [0.0, 0.0, 1.0]])
    K1 = np.array([[1400.0, 0.0, 600.0], [0.0, 700.0, 350.0], [0.0, 0.0, 1.0]])
    k0, k1, _ = two_view_scene(3000, outlier_share=0.3, seed=3, planar=model == "homography")
    # the same scene seen through K0 / K1: pixels mapped by K0 K_LEFT^-1, K1 K_RIGHT^-1 (affine maps)
    k0 = k0 @ (K0 @ np.linalg.inv(K_LEFT))[:2, :2].T + (K0 @ np.linalg.inv(K_LEFT))[:2, 2]
    k1 = k1 @ (K1 @ np.linalg.inv(K_RIGHT))[:2, :2].T + (K1 @ np.linalg.inv(K_RIGHT))[:2, 2]
    for threshold in (0.5, 1.0, 3.0):
        options = GeometryOptions(model, threshold, usac_matches=len(k0), K0=K0, K1=K1)
        result = verify(k0, k1, options)
        assert result is not None and result.found and "usac_matches" not in result.extras
        error = opencv_inlier_error(model, result.matrix, k0, k1, K0, K1)
        differ = (error < threshold) != result.inliers
        assert np.all(np.abs(error[differ] - threshold) < 1e-6 * threshold), (threshold, error[differ])
        assert 0.3 * len(k0) < result.num_inliers < len(k0)  # a threshold that splits the matches


def test_the_subset_is_seeded_and_spread_over_the_image() -> None:
    """A cluster of 9,000 matches beside 1,000 spread ones: every occupied cell of the grid gives its points in
    turn, so the sparse region is in the subset in full; the same seed, the same subset."""
    rng = np.random.default_rng(0)
    dense = rng.normal([300.0, 200.0], 5.0, (9000, 2))
    sparse = rng.uniform([0.0, 0.0], [1280.0, 720.0], (1000, 2))
    points = np.concatenate([dense, sparse])
    subset = spread_subset(points, 2000, seed=0)
    assert subset.shape == (2000,) and np.all(np.diff(subset) > 0) and subset[-1] < len(points)
    assert np.array_equal(subset, spread_subset(points, 2000, seed=0))
    assert not np.array_equal(subset, spread_subset(points, 2000, seed=1))
    span = points.max(axis=0) - points.min(axis=0)
    cell_xy = np.minimum((points - points.min(axis=0)) / span * SUBSET_GRID, SUBSET_GRID - 1).astype(int)
    cell = cell_xy[:, 1] * SUBSET_GRID + cell_xy[:, 0]
    counts = np.bincount(cell, minlength=SUBSET_GRID ** 2)
    taken = np.bincount(cell[subset], minlength=SUBSET_GRID ** 2)
    # water filling: each cell gives all its points or at least as many as any cell that gave more
    level = taken[taken < counts].min()
    assert np.all((taken == counts) | (taken >= level)) and taken.max() <= level + 1
    assert np.isin(np.arange(9000, 10000), subset).mean() > 0.75  # a uniform draw would keep ~20 %


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("outlier_share", [0.0, 0.4])
def test_above_usac_matches_a_subset_fit_classifies_every_match_as_a_fit_on_all(model: str,
                                                                                 outlier_share: float) -> None:
    """10,000 matches: the default fits 4,000 of them, then every match is an inlier exactly when its error
    against that model is under the threshold. The verdict agrees with a fit on all 10,000 (OpenCV's plain run):
    inlier sets within Jaccard 0.995, and the model as close to the truth."""
    k0, k1, truth = two_view_scene(10000, outlier_share=outlier_share, seed=10000, planar=model == "homography")
    intrinsics = {"K0": K_LEFT, "K1": K_RIGHT} if model == "essential" else {}
    subset_fit = verify(k0, k1, GeometryOptions(model, **intrinsics))
    all_fit = verify(k0, k1, GeometryOptions(model, usac_matches=len(k0), **intrinsics))
    assert subset_fit is not None and all_fit is not None and subset_fit.found and all_fit.found
    assert subset_fit.extras["usac_matches"] == GeometryOptions().usac_matches == 4000
    error = opencv_inlier_error(model, subset_fit.matrix, k0, k1, K_LEFT, K_RIGHT)
    assert np.array_equal(subset_fit.inliers, error < 1.0) and subset_fit.num_inliers == int((error < 1.0).sum())
    jaccard = (subset_fit.inliers & all_fit.inliers).sum() / (subset_fit.inliers | all_fit.inliers).sum()
    assert jaccard >= 0.995, jaccard
    recall = [(r.inliers & truth).sum() / truth.sum() for r in (subset_fit, all_fit)]
    assert recall[0] >= recall[1] - 0.005, recall
    if model == "homography":
        corners = np.array([[0.0, 0.0], [1280.0, 0.0], [1280.0, 720.0], [0.0, 720.0]])
        assert np.abs(transfer_error(subset_fit.matrix, corners, cv2.perspectiveTransform(
            corners[None], all_fit.matrix)[0])).max() < 1.0
    else:  # the true correspondences' epipolar error against each model
        F = [r.matrix if model == "fundamental" else fundamental_from_essential(r.matrix, K_LEFT, K_RIGHT)
             for r in (subset_fit, all_fit)]
        errors = [np.median(sampson_error(f, k0[truth], k1[truth])) for f in F]
        assert errors[0] <= 1.1 * errors[1], errors


def test_torch_verifier_is_reproducible_and_ignores_padding(torch_verifier) -> None:  # type: ignore[no-untyped-def]
    """The same seed gives the same result; the result does not depend on how far a frame is padded."""
    import torch

    from matchanything_ros.core.geometry_torch import fit_padded, sample_tables

    k0, k1, _ = two_view_scene(1500, planar=True)
    first = torch_verifier.verify(k0, k1, GeometryOptions("homography"))
    again = TorchVerifier("cpu").verify(k0, k1, GeometryOptions("homography"))
    assert np.array_equal(first.matrix, again.matrix) and np.array_equal(first.inliers, again.inliers)
    samples, preview = sample_tables(2048, 4, seed=0)
    outputs = []
    for rows in (padded_size(1500), 4 * padded_size(1500)):
        data = torch.zeros(rows, 4)
        data[:1500] = torch.from_numpy(np.hstack([k0, k1])).float()
        data[1500:] = 1e4  # garbage in the padding must not matter
        matrix, inliers, count, found = fit_padded("homography", data[:, :2], data[:, 2:], torch.tensor(1500),
                                                   samples, 1.0, preview_u=preview)
        assert bool(found) and not inliers[1500:].any() and int(count) == int(inliers.sum())
        outputs.append((matrix.numpy(), inliers[:1500].numpy()))
    assert np.allclose(outputs[0][0], outputs[1][0], rtol=1e-3, atol=1e-4)
    assert (outputs[0][1] != outputs[1][1]).sum() <= 2


def test_padded_sizes_are_few() -> None:
    assert [padded_size(n) for n in (1, 1024, 1025, 10_000, 20_000)] == [1024, 1024, 2048, 10_240, 20_480]


# ------------------------------------------------------------------------------------------ results
def test_result_json_and_inliers_only() -> None:
    k0, k1, _ = two_view_scene(500, planar=True)
    geometry = verify(k0, k1, GeometryOptions("homography"))
    result = MatchResult(k0.astype(np.float32), k1.astype(np.float32), np.linspace(0, 1, 500, dtype=np.float32),
                         (1280, 720), (1280, 720), geometry=geometry)
    doc = json.loads(json.dumps(result.to_json_dict()))
    assert set(doc["geometry"]) == {"model", "matrix", "inliers", "num_inliers"}
    assert doc["geometry"]["model"] == "homography" and np.allclose(doc["geometry"]["matrix"], geometry.matrix)
    assert doc["geometry"]["inliers"] == geometry.inliers.tolist() and len(doc["geometry"]["inliers"]) == 500
    assert doc["geometry"]["num_inliers"] == geometry.num_inliers == sum(doc["geometry"]["inliers"])
    kept = result.only_inliers()
    assert len(kept) == geometry.num_inliers and kept.inliers.all()
    assert np.array_equal(kept.keypoints0, result.keypoints0[geometry.inliers])
    assert kept.geometry.extras["num_matches"] == 500
    failed = MatchResult(k0[:3].astype(np.float32), k1[:3].astype(np.float32), np.ones(3, np.float32), (9, 9),
                         (9, 9), geometry=verify(k0[:3], k1[:3], GeometryOptions("homography")))
    assert json.loads(json.dumps(failed.to_json_dict()))["geometry"] == {
        "model": "homography", "matrix": None, "inliers": [False] * 3, "num_inliers": 0,
        "reason": failed.geometry.reason, "reason_code": TOO_FEW_MATCHES}
    assert len(failed.only_inliers()) == 0
    unverified = MatchResult(k0.astype(np.float32), k1.astype(np.float32), np.ones(500, np.float32), (9, 9), (9, 9))
    assert "geometry" not in unverified.to_json_dict() and unverified.inliers is None


def test_message_fields_carry_the_verdict() -> None:
    from matchanything_ros.ros.message_fields import keypoint_matches_fields

    k0, k1, _ = two_view_scene(400)
    result = MatchResult(k0.astype(np.float32), k1.astype(np.float32), np.ones(400, np.float32), (1280, 720),
                         (1280, 720), geometry=verify(k0, k1, options("essential")))
    fields = keypoint_matches_fields((720, 1280), (720, 1280), result, {}, {"verify": 2.5})
    assert fields["geometry_model"] == "essential" and fields["geometry_reason"] == ""
    assert np.array_equal(fields["geometry_matrix"], result.geometry.matrix.ravel())
    assert fields["geometry_matrix"].dtype == np.float64
    assert np.array_equal(fields["inliers"], result.inliers) and fields["num_inliers"] == result.geometry.num_inliers
    assert fields["verify_ms"] == 2.5
    result.geometry = None
    fields = keypoint_matches_fields((720, 1280), (720, 1280), result, {}, {})
    assert (fields["geometry_model"], fields["num_inliers"], len(fields["inliers"])) == ("", 0, 0)
    assert not fields["geometry_matrix"].any()


# ------------------------------------------------------------------------------------------ settings
def test_settings_are_parameters() -> None:
    from matchanything_ros.core.matcher import GEOMETRY_PARAM_NAMES, MatcherConfig
    from matchanything_ros.core.params import MATCHER_PARAM_NAMES, PARAMS_BY_NAME

    assert GEOMETRY_PARAM_NAMES <= set(MATCHER_PARAM_NAMES)
    assert PARAMS_BY_NAME["geometry"].default == "none"
    config = MatcherConfig(geometry="essential", geometry_threshold_px=0.5)
    assert (config.geometry, config.geometry_threshold_px) == ("essential", 0.5)
    for bad in ({"geometry": "affine"}, {"geometry_threshold_px": 0.0}, {"geometry_confidence": 0.0},
                {"geometry_max_iterations": 0}, {"geometry_usac_matches": 499}):
        with pytest.raises(ConfigError):
            MatcherConfig(**bad)  # type: ignore[arg-type]
    from matchanything_ros.core.geometry_torch import DEFAULT_HYPOTHESES

    assert f"min(this, {DEFAULT_HYPOTHESES})" in PARAMS_BY_NAME["geometry_max_iterations"].description
    defaults = GeometryOptions()
    assert (defaults.model, defaults.threshold_px, defaults.confidence, defaults.max_iterations) == (
        "none", PARAMS_BY_NAME["geometry_threshold_px"].default, PARAMS_BY_NAME["geometry_confidence"].default,
        PARAMS_BY_NAME["geometry_max_iterations"].default)


def test_cli_intrinsics_from_flags_and_files(tmp_path: Path) -> None:
    import argparse

    from matchanything_ros.cli.match import intrinsics

    def parse(**kw) -> tuple:  # type: ignore[no-untyped-def,type-arg]
        return intrinsics(argparse.Namespace(**{"intrinsics": None, "K0": None, "K1": None, **kw}))

    K0, K1 = parse(K0="800,810,640,360")
    assert np.array_equal(K0, K_LEFT) and np.array_equal(K1, K_LEFT)
    K0, K1 = parse(K0="800,810,640,360", K1=",".join(map(str, K_RIGHT.ravel())))
    assert np.array_equal(K1, K_RIGHT)
    (tmp_path / "k.json").write_text(json.dumps({"K0": K_LEFT.tolist(), "K1": K_RIGHT.ravel().tolist()}))
    K0, K1 = parse(intrinsics=str(tmp_path / "k.json"))
    assert np.array_equal(K0, K_LEFT) and np.array_equal(K1, K_RIGHT)
    (tmp_path / "left.yaml").write_text(  # the ROS camera_calibration format
        "image_width: 1280\nimage_height: 720\ncamera_name: left\ncamera_matrix:\n  rows: 3\n  cols: 3\n"
        "  data: [800.0, 0.0, 640.0, 0.0, 810.0, 360.0, 0.0, 0.0, 1.0]\n")
    K0, K1 = parse(intrinsics=str(tmp_path / "left.yaml"), K1="700,700,600,350")
    assert np.array_equal(K0, K_LEFT) and np.array_equal(K1, K_RIGHT)
    for kw, message in [({"K0": "800,640,360"}, "fx,fy,cx,cy or 9 numbers"), ({"K0": "a,b,c,d"}, "expected"),
                        ({"K0": "0,0,640,360"}, "fx, fy > 0"), ({"intrinsics": str(tmp_path / "none.yaml")},
                                                                  "cannot read"),
                        ({"intrinsics": str(tmp_path / "k.json"), "K0": "1,1,1"}, "9 numbers")]:
        with pytest.raises(ConfigError, match=message):
            parse(**kw)


def test_launch_switches_it_on_with_one_argument() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("matcher_launch", Path(__file__).resolve().parents[1] / "launch"
                                                  / "matcher.launch.py")
    assert spec is not None and spec.loader is not None
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    settings = launch.node_settings({"geometry": "essential", "camera_info0": "/left/camera_info",
                                     "camera_info1": "/right/camera_info"})
    assert settings["parameters"] == {"geometry": "essential"}
    assert set(settings["remappings"]) == {("camera_info0", "/left/camera_info"),
                                           ("camera_info1", "/right/camera_info")}
    with pytest.raises(ConfigError, match="geometry: 'affine' is not one of"):
        launch.node_settings({"geometry": "affine"})


def test_node_intrinsics_pair_camera_info_with_images() -> None:
    from matchanything_ros.ros.intrinsics import CAMERA_INFO_INCONSISTENT, CAMERA_INFO_MISSING, IntrinsicsStore

    store = IntrinsicsStore(["/left/camera_info", "/right/camera_info"])
    missing = store.lookup(1, 5, 1280, 720)
    assert missing.K is None and missing.code == CAMERA_INFO_MISSING and "/right/camera_info" in missing.reason
    store.add(0, 10, K_LEFT.ravel(), 1280, 720)
    store.add(0, 20, (K_LEFT * [[2], [2], [1]]).ravel(), 2560, 1440)  # the camera switched resolution
    assert np.array_equal(store.lookup(0, 10, 1280, 720).K, K_LEFT)  # the one stamped like the image
    assert store.lookup(0, 20, 2560, 1440).K[0, 0] == 1600.0
    assert store.lookup(0, 30, 2560, 1440).K[0, 0] == 1600.0  # none with that stamp: the newest
    wrong_size = store.lookup(0, 30, 1280, 720)
    assert wrong_size.K is None and wrong_size.code == CAMERA_INFO_INCONSISTENT and "2560x1440" in wrong_size.reason
    store.add(1, 40, np.zeros(9), 1280, 720)  # an uncalibrated camera
    uncalibrated = store.lookup(1, 40, 1280, 720)
    assert uncalibrated.K is None and uncalibrated.code == CAMERA_INFO_INCONSISTENT
    assert "uncalibrated camera publishes zeros" in uncalibrated.reason


@pytest.mark.parametrize("model", ["homography", "essential"])  # essential: the fundamental path and more
def test_torch_verifier_is_one_graph_without_host_reads(model: str) -> None:
    """What a CUDA graph needs (checked here on the CPU): TorchDynamo traces fit_padded as a single graph,
    i.e. no .item(), no data-dependent shape, no host round trip anywhere in it."""
    import torch
    import torch._dynamo

    from matchanything_ros.core.geometry_torch import fit_padded, sample_tables

    k0, k1, _ = two_view_scene(900, planar=model == "homography")
    data = torch.zeros(1024, 4)
    data[:900] = torch.from_numpy(np.hstack([k0, k1])).float()
    samples, preview = sample_tables(256, TORCH_MINIMAL_SAMPLE[model], seed=0)
    kinv = ([torch.from_numpy(np.linalg.inv(K)).float() for K in (K_LEFT, K_RIGHT)] if model == "essential"
            else [None, None])

    def fit(d: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return fit_padded(model, d[:, :2], d[:, 2:], count, samples, 1.0, kinv[0], kinv[1], preview_u=preview)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(fit)(data, torch.tensor(900))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
