"""`validate` metrics (correspondence level) and `validate` / `benchmark` end to end on the CPU."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_export_onnx import exported_eloftr, seeded_eloftr_state

from matchanything_ros.cli import main
from matchanything_ros.core.benchmark import plot_latencies, stats
from matchanything_ros.core.matcher import DATA_DIR
from matchanything_ros.core.result import MatchResult
from matchanything_ros.core.validate import CRITERIA, RunOutput, compare, load_pairs

DEMO = DATA_DIR / "demo_homography.npz"


def _run(keys: list[int], kp0: np.ndarray, kp1: np.ndarray, conf: np.ndarray) -> RunOutput:
    r = MatchResult(kp0.astype(np.float32), kp1.astype(np.float32), conf.astype(np.float32), (640, 480), (640, 480))
    return RunOutput(r, np.asarray(keys, np.int64), {"preprocess": 0.0, "inference": 0.0, "postprocess": 0.0})


def _reference(n: int = 50, seed: int = 0) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = list(rng.choice(10**6, n, replace=False))
    return keys, rng.uniform(0, 600, (n, 2)), rng.uniform(0, 600, (n, 2)), rng.uniform(0.1, 0.9, n)


def test_identical_runs_pass_regardless_of_row_order() -> None:
    keys, k0, k1, c = _reference()
    perm = np.random.default_rng(1).permutation(len(keys))
    m = compare(_run(keys, k0, k1, c), _run([keys[i] for i in perm], k0[perm], k1[perm], c[perm]))
    assert m["passed"] and m["jaccard"] == 1.0 and m["num_common"] == 50
    assert m["kp_err_max_px"] == 0.0 and m["conf_corr"] == pytest.approx(1.0)


def test_sorted_lists_that_look_alike_but_are_different_correspondences_fail() -> None:
    # the seed validator's blind spot: same confidences, same keypoint values, other correspondences
    keys, k0, k1, c = _reference()
    other = [k + 1 for k in keys]
    m = compare(_run(keys, k0, k1, c), _run(other, k0, k1, c))
    assert m["jaccard"] == 0.0 and not m["passed"]
    assert "no correspondence in common" in " ".join(m["failures"])


def test_each_criterion_fails_on_its_own() -> None:
    keys, k0, k1, c = _reference()
    ref = _run(keys, k0, k1, c)
    shifted = compare(ref, _run(keys, k0 + np.array([1.5, 0.0]), k1, c))
    assert not shifted["passed"] and shifted["kp_err_mean_px"] == pytest.approx(1.5)
    assert shifted["pct_within_1px"] == 0.0 and "mean keypoint error" in shifted["failures"][0]
    conf = compare(ref, _run(keys, k0, k1, c + 0.02))
    assert not conf["passed"] and any("confidence differs" in f for f in conf["failures"])
    fewer = compare(ref, _run(keys[:45], k0[:45], k1[:45], c[:45]))
    assert fewer["count_diff_pct"] == pytest.approx(10.0) and not fewer["passed"]
    assert fewer["jaccard"] == pytest.approx(45 / 50)
    shuffled_conf = compare(ref, _run(keys, k0, k1, c[::-1].copy()))  # same values, wrong matches
    assert any("correlation" in f for f in shuffled_conf["failures"])
    ok = compare(ref, _run(keys, k0 + 0.3, k1 - 0.3, c + 0.005))
    assert ok["passed"], ok["failures"]
    assert set(CRITERIA) == {"kp_mean_px_max", "conf_abs_max", "count_diff_pct_max", "conf_corr_min"}


def test_empty_results_agree() -> None:
    e = np.zeros((0, 2))
    m = compare(_run([], e, e, np.zeros(0)), _run([], e, e, np.zeros(0)))
    assert m["passed"] and m["jaccard"] == 1.0 and m["conf_corr"] is None


def test_load_pairs_reads_images_and_fixture_dirs(tmp_path: Path) -> None:
    with np.load(DEMO) as z:
        a, b = z["image0"], z["image1"]
    cv2.imwrite(str(tmp_path / "a.png"), a[:, :, ::-1])
    cv2.imwrite(str(tmp_path / "b.png"), b[:, :, ::-1])
    np.savez(tmp_path / "pair.npz", input_image0_rgb_u8=a, input_image1_rgb_u8=b)
    pairs = load_pairs([(str(tmp_path / "a.png"), str(tmp_path / "b.png"))], str(tmp_path))
    assert len(pairs) == 2 and np.array_equal(pairs[0][1], a) and np.array_equal(pairs[1][2], b)
    from matchanything_ros.core.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot read image"):
        load_pairs([(str(tmp_path / "missing.png"), str(tmp_path / "b.png"))])


def test_latency_plot_is_a_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    configs = []
    for label in ("torch cpu fp32 @416", "onnxruntime CPUExecutionProvider fp32 @416"):
        samples = list(rng.uniform(80, 120, 20))
        configs.append({"label": label, "samples_ms": {"total": samples}, "stages_ms": {"total": stats(samples)}})
    png = plot_latencies(configs, tmp_path / "lat.png")
    img = cv2.imread(str(png))
    assert img is not None and img.shape[0] > 100 and img.shape[1] == 1100
    assert (img < 250).any()


@pytest.fixture(scope="module")
def seeded_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "seeded_eloftr.ckpt"
    torch.save({"state_dict": {"matcher." + k: v for k, v in seeded_eloftr_state().items()}}, path)
    return path


@pytest.fixture(scope="module")
def demo_pngs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("pair")
    with np.load(DEMO) as z:
        cv2.imwrite(str(d / "a.png"), z["image0"][:, :, ::-1])
        cv2.imwrite(str(d / "b.png"), z["image1"][:, :, ::-1])
    return str(d / "a.png"), str(d / "b.png")


@pytest.mark.slow
def test_validate_cli_onnxruntime_vs_torch(tmp_path: Path, seeded_checkpoint: Path, demo_pngs: tuple[str, str],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "validate.json"
    code = main(["validate", "--backend", "onnxruntime", "--device", "cpu", "--checkpoint-path",
                 str(seeded_checkpoint), "--model-file-path", str(exported_eloftr()), "--pair", *demo_pngs,
                 "--resize-max", "416", "--threshold", "0.1", "--report", str(report)])
    out = capsys.readouterr().out
    assert code == 0, out
    doc = json.loads(report.read_text())
    assert doc["reference"] == {"backend": "torch", "device": "cpu", "precision": "fp32"}
    assert doc["test"]["backend"] == "onnxruntime" and doc["test"]["device"] == "CPUExecutionProvider"
    (pair,) = doc["pairs"]
    assert pair["num_ref"] == pair["num_test"] and pair["jaccard"] == 1.0 and pair["passed"]
    assert doc["summary"]["passed"] and "PASS" in out


@pytest.mark.slow
def test_benchmark_cli_writes_json_and_plot(tmp_path: Path, seeded_checkpoint: Path, demo_pngs: tuple[str, str]
                                            ) -> None:
    js, png = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main(["benchmark", "--backends", "torch,onnxruntime", "--device", "cpu", "--sizes", "416",
                 "--warmup", "1", "--runs", "2", "--checkpoint-path", str(seeded_checkpoint), "--model-file-path",
                 str(exported_eloftr()), "--pair", *demo_pngs, "--json", str(js), "--png", str(png)])
    assert code == 0
    doc = json.loads(js.read_text())
    assert [c["backend"] for c in doc["configs"]] == ["torch", "onnxruntime"]
    for c in doc["configs"]:
        assert c["canvas"] == 416 and c["runs"] == 2 and len(c["samples_ms"]["total"]) == 2
        st = c["stages_ms"]
        assert st["inference"]["median"] > 0 and st["total"]["median"] >= st["inference"]["median"]
        assert c["pairs_per_s"] == pytest.approx(1000.0 / st["total"]["median"])
        assert c["peak_host_rss_mb"] > 50 and c["peak_device_mb"] is None
    assert doc["environment"]["package_version"]
    assert cv2.imread(str(png)) is not None


def test_matcher_info_names_the_onnx_models_in_use(seeded_checkpoint: Path) -> None:
    """MatcherInfo.engine_file says which exported files run (empty for torch, which runs none)."""
    from matchanything_ros.core.matcher import Matcher, MatcherConfig

    onnx_dir = exported_eloftr()
    params = {"checkpoint_path": str(seeded_checkpoint), "device": "cpu", "resize_max": 416}
    with Matcher(MatcherConfig.from_params({**params, "backend": "onnxruntime",
                                            "model_file_path": str(onnx_dir)})) as m:
        assert m.info["engine_file"] == (f"coarse={(onnx_dir / 'coarse.onnx').resolve()}, "
                                         f"fine={(onnx_dir / 'fine.onnx').resolve()}")
    with Matcher(MatcherConfig.from_params({**params, "backend": "torch"})) as m:
        assert m.info["engine_file"] == ""
