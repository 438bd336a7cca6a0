"""What a person sees of a match run: the CLI's console line and PNG (real subprocess, real photos,
the bundled demo model), the sampling rule behind the drawn matches, and a picture in which the photos
still show and inliers and outliers can be told apart."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from matchanything_ros.core.matcher import DEMO_MODEL_NOTICE
from matchanything_ros.core.viz import (
    DEFAULT_MAX_LINES,
    INLIER_RGB,
    OUTLIER_RGB,
    draw_matches,
    header_counts,
    inlier_outlier_sample,
    spatially_even_sample,
)

REPO = Path(__file__).resolve().parent.parent


def clustered_matches(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints all over a 512x512 image; the most confident all in its left tenth."""
    rng = np.random.default_rng(seed)
    k0 = rng.uniform(0, 512, (n, 2))
    conf = rng.uniform(0.0, 0.5, n)
    conf[k0[:, 0] < 51] += 0.5
    return k0, conf


def test_sample_covers_the_image_evenly_not_just_where_confidence_is_high() -> None:
    k0, conf = clustered_matches()
    pick, columns = spatially_even_sample(k0, conf, (512, 512), 200)
    assert len(pick) == 200 and len(np.unique(pick)) == 200 and columns > 1
    # the 200 most confident would all lie in the left tenth; the even sample puts about a tenth there
    assert (k0[np.argsort(-conf)[:200], 0] < 51).all()
    assert (k0[pick, 0] < 51).mean() < 0.2
    quadrants = np.bincount((k0[pick, 0] >= 256).astype(int) * 2 + (k0[pick, 1] >= 256).astype(int), minlength=4)
    assert quadrants.min() >= 35, quadrants
    # inside each cell the most confident matches are taken first
    assert conf[pick].mean() > np.median(conf)


def test_fewer_matches_than_the_cap_are_all_drawn() -> None:
    k0, conf = clustered_matches(50)
    pick, _ = spatially_even_sample(k0, conf, (512, 512), 200)
    np.testing.assert_array_equal(pick, np.arange(50))


def test_demo_notice_adds_a_header_line_and_the_legend_shows_the_colour_ramp() -> None:
    img = skimage.data.astronaut()
    k0, conf = clustered_matches(300)
    plain = draw_matches(img, img, k0, k0, conf, max_lines=100)
    demo = draw_matches(img, img, k0, k0, conf, max_lines=100, demo_model=True)
    assert demo.shape[0] > plain.shape[0]  # one more header line: the notice
    header = demo[: demo.shape[0] - img.shape[0]]
    # the legend's colour bar: a row of the header running from blue (low) to red (high)
    hues = cv2.cvtColor(header, cv2.COLOR_RGB2HSV)[..., 0].astype(int)
    saturated = cv2.cvtColor(header, cv2.COLOR_RGB2HSV)[..., 1] > 150
    assert saturated.sum() > 500, "no colour legend in the header"
    assert hues[saturated].max() - hues[saturated].min() > 90


def test_cli_says_it_ran_the_demo_model_and_writes_the_picture(tmp_path: Path) -> None:
    left, right, _ = skimage.data.stereo_motorcycle()
    p0, p1, png = tmp_path / "l.png", tmp_path / "r.png", tmp_path / "m.png"
    cv2.imwrite(str(p0), left[:, :, ::-1])
    cv2.imwrite(str(p1), right[:, :, ::-1])
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "matchanything_ros.cli", "match", str(p0), str(p1), "--backend",
                           "torch", "--device", "cpu", "--png", str(png), "--max-lines", "300"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert DEMO_MODEL_NOTICE in proc.stdout, proc.stdout
    picture = cv2.imread(str(png))
    assert picture is not None and picture.shape[1] == left.shape[1] + right.shape[1]
    assert picture.shape[0] > left.shape[0]  # the header above the images


def hubble_matches(n: int = 8000) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The real Hubble pair of the fixtures (872x1000, a homography apart) with `n` matches along its homography."""
    z = np.load(REPO / "test" / "fixtures" / "reference" / "eloftr" / "hubble_homography.npz")
    a, b = z["input_image0_rgb_u8"], z["input_image1_rgb_u8"]
    rng = np.random.default_rng(0)
    k0 = rng.uniform([0, 0], [a.shape[1], a.shape[0]], (n, 2))
    k1 = cv2.perspectiveTransform(k0.reshape(-1, 1, 2), z["H_0to1"]).reshape(-1, 2)
    return a, b, k0, k1, rng.uniform(0.1, 1.0, n)


def share_covered(picture: np.ndarray, image0: np.ndarray, image1: np.ndarray) -> float:
    """The share of the photos' pixels that the drawing changed visibly (by more than 30 of 255)."""
    body = picture[picture.shape[0] - max(image0.shape[0], image1.shape[0]):].astype(np.int64)
    photos = np.zeros_like(body)
    photos[:image0.shape[0], :image0.shape[1]] = image0
    photos[:image1.shape[0], image0.shape[1]:] = image1
    return float((np.abs(body - photos).max(axis=-1) > 30).mean())


def test_the_default_picture_leaves_the_photos_visible() -> None:
    """8000 matches of a real pair: by default 150 thin lines, which leave most of both photos as they were
    (500 lines, the old default, changed 42 % of the pixels of this pair)."""
    a, b, k0, k1, conf = hubble_matches()
    assert DEFAULT_MAX_LINES == 150
    default = share_covered(draw_matches(a, b, k0, k1, conf), a, b)
    crowded = share_covered(draw_matches(a, b, k0, k1, conf, max_lines=500), a, b)
    assert default < 0.25 and crowded > 2 * default, (default, crowded)


def grey(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


def coloured_pixels(picture: np.ndarray, rgb: tuple[int, int, int], rows: int) -> int:
    """Pixels of the picture's last `rows` rows (the photos, grey here) close in hue to `rgb`."""
    body = picture[-rows:].astype(np.int64)
    main = int(np.argmax(rgb))
    others = [c for c in range(3) if c != main]
    return int(((body[..., main] - body[..., others[0]] > 60) & (body[..., main] - body[..., others[1]] > 60)).sum())


def test_inliers_and_outliers_are_drawn_in_two_colours_and_counted() -> None:
    img = grey(skimage.data.astronaut())
    rng = np.random.default_rng(1)
    n = 3000
    k0 = rng.uniform(0, 512, (n, 2))
    inlier = rng.uniform(size=n) < 0.9
    k1 = np.where(inlier[:, None], k0 + 2.0, rng.uniform(0, 512, (n, 2)))
    conf = np.where(inlier, rng.uniform(0.5, 1.0, n), rng.uniform(0.1, 0.5, n))  # outliers the less confident
    both = draw_matches(img, img, k0, k1, conf, inliers=inlier)
    only_inliers = draw_matches(img, img, k0, k1, conf, inliers=np.ones(n, bool))
    assert coloured_pixels(both, INLIER_RGB, 512) > 1000 and coloured_pixels(both, OUTLIER_RGB, 512) > 1000
    assert coloured_pixels(only_inliers, OUTLIER_RGB, 512) == 0
    # the outliers are shown although the most confident per cell are all inliers: at least a fifth of the lines
    pick = inlier_outlier_sample(k0, conf, inlier, (512, 512), 150)
    assert len(pick) == 150 and (~inlier[pick]).sum() == 30
    assert header_counts(n, pick, inlier, ("inliers", "outliers")) == [
        f"{n} matches: {inlier.sum()} inliers, {n - inlier.sum()} outliers",
        "drawn: 150 spread evenly over image 0 (120 inliers, 30 outliers)"]
    # fewer outliers than a fifth of the lines: all of them
    few = inlier.copy()
    few[np.flatnonzero(~inlier)[10:]] = True
    assert (~few[inlier_outlier_sample(k0, conf, few, (512, 512), 150)]).sum() == 10


def test_inliers_must_have_one_entry_per_match() -> None:
    img = skimage.data.astronaut()
    k0, conf = clustered_matches(20)
    with pytest.raises(ValueError, match="inliers has 19 entries for 20 matches"):
        draw_matches(img, img, k0, k0, conf, inliers=np.ones(19, bool))


def test_cli_draws_150_lines_by_default() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "matchanything_ros.cli", "match", "--help"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    help_text = " ".join(proc.stdout.split())  # argparse wraps lines to the terminal's width
    assert "--max-lines MAX_LINES most matches drawn in the PNG, a spatially even sample (default: 150)" in help_text, \
        proc.stdout
