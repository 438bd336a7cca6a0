"""Geometric verification in the Matcher and `matchanything match` (issue 23), on the bundled demo model and
the shipped held-out homography pair: geometry none leaves today's output as it was, the verdict rides in
the result, its JSON and the PNG, settings change in place, essential needs intrinsics."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from matchanything_ros.core.geometry import NO_INTRINSICS, transfer_error
from matchanything_ros.core.matcher import DATA_DIR, Matcher, MatcherConfig

REPO = Path(__file__).resolve().parent.parent
PAIR = DATA_DIR / "demo_homography.npz"
CPU = {"backend": "torch", "device": "cpu"}


@pytest.fixture(scope="module")
def pair() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.load(PAIR) as data:
        return data["image0"], data["image1"], data["H_0to1"]


@pytest.fixture(scope="module")
def matcher():  # type: ignore[no-untyped-def]
    with Matcher(MatcherConfig(**CPU)) as m:
        yield m


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "matchanything_ros.cli", "match", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=600)


def test_geometry_none_is_todays_output_and_settings_change_in_place(matcher, pair) -> None:  # type: ignore[no-untyped-def]
    image0, image1, H_true = pair
    plain = matcher.match(image0, image1)
    assert plain.geometry is None and plain.inliers is None and "verify" not in plain.timings_ms
    assert "geometry" not in plain.to_json_dict()

    # a geometry setting changes in place: no new model, the network's output bit for bit the same
    backend = matcher.backend
    assert matcher.update(MatcherConfig(**CPU, geometry="homography", geometry_threshold_px=2.0))
    assert matcher.backend is backend
    verified = matcher.match(image0, image1)
    for name in ("keypoints0", "keypoints1", "confidence"):
        assert getattr(verified, name).tobytes() == getattr(plain, name).tobytes(), name
    g = verified.geometry
    assert g is not None and g.found and g.model == "homography" and verified.timings_ms["verify"] > 0
    assert g.inliers.shape == (len(plain),) and 0.5 * len(plain) < g.num_inliers < len(plain)
    assert np.median(transfer_error(H_true, plain.keypoints0[g.inliers], plain.keypoints1[g.inliers])) < 2.0

    # the rest verifies the same matches again (Matcher.match = the pipeline, then Matcher.verify)
    assert matcher.update(MatcherConfig(**CPU, geometry="homography", geometry_threshold_px=2.0,
                                        publish_inliers_only=True))
    kept = matcher.verify(dataclasses.replace(plain, timings_ms={}))
    assert len(kept) == g.num_inliers and kept.inliers.all()
    assert kept.keypoints0.tobytes() == plain.keypoints0[g.inliers].tobytes()

    # essential: without intrinsics a reason, not an exception; with them a model
    assert matcher.update(MatcherConfig(**CPU, geometry="essential"))
    no_k = matcher.verify(dataclasses.replace(plain, timings_ms={}))
    assert no_k.geometry is not None and not no_k.geometry.found and no_k.geometry.reason_code == NO_INTRINSICS
    assert len(no_k) == len(plain)  # the matches are still there
    height, width = image0.shape[:2]
    K = np.array([[500.0, 0.0, width / 2], [0.0, 500.0, height / 2], [0.0, 0.0, 1.0]])
    with_k = matcher.verify(dataclasses.replace(plain, timings_ms={}), K, K)
    assert with_k.geometry is not None and with_k.geometry.found, with_k.geometry.reason
    assert matcher.update(MatcherConfig(**CPU))


def test_cli_writes_the_verdict_to_json_and_png(tmp_path: Path, pair) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    image0, image1, _ = pair
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for path, image in zip(paths, (image0, image1)):
        Image.fromarray(image).save(path)
    out_json, out_png = tmp_path / "m.json", tmp_path / "m_drawn.png"
    done = run_cli(*map(str, paths), *CPU_FLAGS, "--geometry", "homography", "--geometry-threshold-px", "2",
                   "--json", str(out_json), "--png", str(out_png))
    assert done.returncode == 0, done.stderr
    doc = json.loads(out_json.read_text())
    geometry = doc["geometry"]
    assert geometry["model"] == "homography" and np.asarray(geometry["matrix"]).shape == (3, 3)
    assert len(geometry["inliers"]) == doc["num_matches"] and sum(geometry["inliers"]) == geometry["num_inliers"]
    assert geometry["num_inliers"] > doc["num_matches"] / 2
    assert doc["matcher"] and doc["timings_ms"]["verify"] > 0
    assert f"homography: {geometry['num_inliers']} inliers of {doc['num_matches']}" in done.stdout
    drawn = np.asarray(Image.open(out_png))
    assert drawn.shape[1] == image0.shape[1] + image1.shape[1]


def test_cli_essential_without_intrinsics_is_a_clear_error(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(path)
    done = run_cli(str(path), str(path), *CPU_FLAGS, "--geometry", "essential")
    assert done.returncode == 1
    assert "--geometry essential needs the cameras' intrinsics" in done.stderr and "Traceback" not in done.stderr


CPU_FLAGS = ("--backend", "torch", "--device", "cpu")
