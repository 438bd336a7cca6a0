"""The compiled torch verifier (the CUDA product path: torch.compile, fullgraph, fixed shapes) against the eager
one, on the CPU (inductor compiles C++ here; on CUDA it makes Triton kernels from the same graph).

On the demo model's real matches (test/fixtures/geometry/demo_matches.npz): the held-out homography pair and
the Middlebury "Motorcycle" stereo pair (fundamental, and essential with its published calibration), seeded:
the same model as eager up to float rounding (the same inlier flags but for matches within 0.02 px
of the threshold), and a second frame of the same row bucket reuses the
compiled code (no recompile). A cold compile takes about a minute per model on 2 cores, hence `slow`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from matchanything_ros.core.geometry import (GeometryOptions, GeometryResult, fundamental_from_essential,
                                             sampson_error, transfer_error)
from matchanything_ros.core.geometry_torch import TorchVerifier, padded_size

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "geometry" / "demo_matches.npz"
# skimage.data.stereo_motorcycle (Middlebury 2014 "Motorcycle", down-sampled 4x): focal length 994.978 px,
# principal point (311.193, 254.877), the right camera's 31.086 px further in x
MOTORCYCLE_K_LEFT = np.array([[994.978, 0.0, 311.193], [0.0, 994.978, 254.877], [0.0, 0.0, 1.0]])
MOTORCYCLE_K_RIGHT = MOTORCYCLE_K_LEFT + np.array([[0.0, 0.0, 31.086], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
# (model, pair) and the second frame: the first matches of the same pair, in the same row bucket
CASES = {"homography": "coffee_plain", "fundamental": "motorcycle", "essential": "motorcycle"}
SECOND_FRAME_SHARE = 0.9
THRESHOLD_PX = 1.0
AGREEMENT_PX = 0.02  # the two models' distances of a match differ by at most this (pixels)
MAX_FLIPPED_SHARE = 0.002  # of the matches, whose inlier flag differs (each within AGREEMENT_PX of the threshold)


@pytest.fixture(scope="module")
def pairs() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


def compiled_graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def match_errors(model: str, matrix: np.ndarray, k0: np.ndarray, k1: np.ndarray) -> np.ndarray:
    """[N] each match's distance (pixels) to the model: the verifier's inlier test is this < threshold."""
    if model == "homography":
        return transfer_error(matrix, k0, k1)
    F = matrix if model == "fundamental" else fundamental_from_essential(matrix, MOTORCYCLE_K_LEFT, MOTORCYCLE_K_RIGHT)
    return sampson_error(F, k0, k1)


def assert_same_verdict(model: str, compiled: GeometryResult | None, eager: GeometryResult | None,
                        k0: np.ndarray, k1: np.ndarray, threshold_px: float) -> None:
    """The same model up to float rounding (fused kernels sum in another order, and the fit iterates in fp32):
    every match the two call an inlier is as far from both models within AGREEMENT_PX, and a match whose flag
    differs lies that close to the threshold. Checked on the models' distances, not their entries: a rectified
    stereo pair leaves some entries of F barely constrained."""
    assert compiled is not None and eager is not None and compiled.found and eager.found
    assert compiled.matrix is not None and eager.matrix is not None
    assert eager.num_inliers > 0.3 * len(k0)
    e_err, c_err = (match_errors(model, m, k0.astype(np.float64), k1.astype(np.float64))
                    for m in (eager.matrix, compiled.matrix))
    near = eager.inliers | compiled.inliers
    assert np.abs(c_err - e_err)[near].max() <= AGREEMENT_PX
    flipped = eager.inliers != compiled.inliers
    assert flipped.sum() <= MAX_FLIPPED_SHARE * len(k0)
    assert (np.abs(e_err[flipped] - threshold_px) <= AGREEMENT_PX).all()
    assert (np.abs(c_err[flipped] - threshold_px) <= AGREEMENT_PX).all()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["homography", "fundamental", "essential"])
def test_compiled_verifier_equals_eager_and_compiles_once_per_row_bucket(pairs, model: str) -> None:  # type: ignore[no-untyped-def]  # noqa: E501
    k0, k1 = pairs[f"{CASES[model]}_k0"], pairs[f"{CASES[model]}_k1"]
    n_second = int(SECOND_FRAME_SHARE * len(k0))
    assert padded_size(n_second) == padded_size(len(k0))  # the premise: one row bucket for both frames
    intrinsics = {"K0": MOTORCYCLE_K_LEFT, "K1": MOTORCYCLE_K_RIGHT} if model == "essential" else {}
    options = GeometryOptions(model, THRESHOLD_PX, seed=7, **intrinsics)
    eager = TorchVerifier("cpu", compiled=False)
    compiled = TorchVerifier("cpu", compiled=True)
    assert compiled.compiled and not eager.compiled and not TorchVerifier("cpu").compiled  # CPU default: eager

    graphs_before = compiled_graph_count()
    assert_same_verdict(model, compiled.verify(k0, k1, options), eager.verify(k0, k1, options), k0, k1, THRESHOLD_PX)
    assert compiled.compile_fallback == "" and compiled.compiled
    assert compiled_graph_count() == graphs_before + 1  # compiled: one graph for the whole fit

    # the next frame, fewer matches in the same bucket: the compiled code runs again, no recompile
    second_compiled = compiled.verify(k0[:n_second], k1[:n_second], options)
    assert compiled_graph_count() == graphs_before + 1
    assert_same_verdict(model, second_compiled, eager.verify(k0[:n_second], k1[:n_second], options),
                        k0[:n_second], k1[:n_second], THRESHOLD_PX)
