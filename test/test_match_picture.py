"""What a person sees of a match run: the CLI's console line and PNG (real subprocess, real photos,
the bundled demo model), and the sampling rule behind the drawn matches."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import skimage.data

from matchanything_ros.core.matcher import DEMO_MODEL_NOTICE
from matchanything_ros.core.viz import draw_matches, spatially_even_sample

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
