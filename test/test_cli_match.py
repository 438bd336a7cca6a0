"""`matchanything match` end to end (a real subprocess), the Matcher facade and its settings."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from matchanything_ros.core.errors import CheckpointError, ConfigError
from matchanything_ros.core.bundled import DEMO_ELOFTR_CONFIG, DEMO_ELOFTR_WEIGHTS
from matchanything_ros.core.matcher import (Matcher, MatcherConfig,
                                            matcher_param_names)
import parity_rules as pr
from reference import REFERENCE_ROOT, seeded_weights_module  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
REF_ROOT = REFERENCE_ROOT
REF = REF_ROOT / "eloftr"


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "matchanything_ros.cli", "match", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=600)


def test_matcher_config_holds_every_matcher_param() -> None:
    assert {f.name for f in fields(MatcherConfig)} - {"options"} == matcher_param_names()  # + the speed forms


def test_matcher_config_validates() -> None:
    with pytest.raises(ConfigError, match="threshold"):
        MatcherConfig(threshold=2.0)
    with pytest.raises(ConfigError, match="unknown parameter"):
        MatcherConfig.from_params({"thresold": 0.2})
    with pytest.raises(ConfigError, match="both"):
        MatcherConfig(force_resize_width=640)
    cfg = MatcherConfig.from_params({"threshold": "0.3", "queue_size": 4})  # node-only params are ignored
    assert cfg.threshold == 0.3


def test_demo_model_or_clear_error() -> None:
    if DEMO_ELOFTR_WEIGHTS.is_file() and DEMO_ELOFTR_CONFIG.is_file():
        with Matcher(MatcherConfig(backend="torch", device="cpu")) as m:
            assert m.info["is_demo_model"] is True
            assert m.info["checkpoint_sha256"]
    else:
        with pytest.raises(CheckpointError, match="demo model is missing"):
            Matcher(MatcherConfig(backend="torch", device="cpu"))


def test_cli_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(img)
    proc = _run_cli(str(img), str(img), "--checkpoint", str(tmp_path / "missing.ckpt"), "--backend", "torch")
    assert proc.returncode == 1
    assert "checkpoint file not found" in proc.stderr


def test_cli_non_image_file_is_a_clear_error(tmp_path: Path) -> None:
    txt = tmp_path / "a.png"
    txt.write_text("hello")
    proc = _run_cli(str(txt), str(txt), "--backend", "torch")
    assert proc.returncode == 1 and "not a readable image" in proc.stderr


def test_cli_bad_force_resize(tmp_path: Path) -> None:
    proc = _run_cli("a.png", "b.png", "--force-resize", "640by480")
    assert proc.returncode == 1 and "WxH" in proc.stderr


@pytest.mark.parity
def test_cli_reproduces_fixture_keypoints(tmp_path: Path) -> None:
    """Released checkpoint format ({"state_dict": seeded weights}) + the fixture's images -> its keypoints."""
    if not (REF / "index.json").is_file():
        pytest.fail(f"reference fixtures not found under {REF}; set MATCHANYTHING_REFERENCE_DIR")

    index = json.loads((REF / "index.json").read_text())
    pair = sorted(index["pairs"], key=lambda p: index["pairs"][p]["n_matches"])[-1]  # the most matches
    ref = np.load(REF / index["pairs"][pair]["file"])
    seeded = seeded_weights_module(REF_ROOT)
    ckpt = tmp_path / "matchanything_eloftr.ckpt"
    torch.save({"state_dict": seeded.seeded_state_dict(REF / "manifest.json", index["seed"])}, ckpt)
    img0, img1 = tmp_path / "img0.png", tmp_path / "img1.png"
    Image.fromarray(ref["input_image0_rgb_u8"]).save(img0)
    Image.fromarray(ref["input_image1_rgb_u8"]).save(img1)
    w, h = index["force_resize_wh"]
    out_json, out_png = tmp_path / "m.json", tmp_path / "m.png"
    proc = _run_cli(str(img0), str(img1), "--variant", "eloftr", "--checkpoint", str(ckpt), "--backend", "torch",
                    "--device", "cpu", "--precision", "fp32", "--threshold", str(index["threshold"]),
                    "--preset", "hf_space", "--force-resize", f"{w}x{h}", "--json", str(out_json),
                    "--png", str(out_png))
    assert proc.returncode == 0, proc.stderr
    assert f"{len(ref['confidence'])} matches" in proc.stdout
    doc = json.loads(out_json.read_text())
    assert doc["num_matches"] == len(ref["confidence"])
    kp0, kp1 = np.array(doc["keypoints0"]), np.array(doc["keypoints1"])
    # the parity rules (test/parity_rules.py): a keypoint off by more than 1e-3 px must be a fine-argmax near-tie,
    # whose margins take a forward in this process; none is needed when every keypoint agrees
    margins = None
    if max(np.abs(kp0 - ref["keypoints0"]).max(), np.abs(kp1 - ref["keypoints1"]).max()) > pr.KEYPOINT_ATOL_PX:
        from test_eloftr_parity import fine_margins_of_pair

        margins = fine_margins_of_pair(pair)
    _, excused = pr.compare_keypoints(kp0, ref["keypoints0"], kp1, ref["keypoints1"], margins, f"CLI {pair}")
    pr.assert_conf_close(np.array(doc["confidence"]), ref["confidence"], "CLI confidence")
    pr.report(excused)
    assert doc["image0_size"] == [ref["input_image0_rgb_u8"].shape[1], ref["input_image0_rgb_u8"].shape[0]]
    assert doc["matcher"]["backend"] == "torch" and doc["matcher"]["is_demo_model"] is False
    assert set(doc["timings_ms"]) == {"preprocess", "inference", "postprocess"}
    png = np.asarray(Image.open(out_png))
    h0, w0 = ref["input_image0_rgb_u8"].shape[:2]
    h1, w1 = ref["input_image1_rgb_u8"].shape[:2]
    assert png.shape[1] == w0 + w1 and png.shape[0] > max(h0, h1)
    assert png[-max(h0, h1):, :w0].std() > 0  # the image is drawn, not a blank canvas
