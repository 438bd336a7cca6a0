"""ELoFTR's one-graph product model, exported by the command docs/engines.md gives a robot with a fixed
camera (`matchanything export --image-size`), run by the onnxruntime backend on the CPU through the Matcher:
the torch host path's matches, the size, threshold and cap it was exported for, and a clear error for
anything else. `export` without a size says which export to choose; `--free-size` writes the two graphs."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import cv2
import numpy as np
import pytest

from matchanything_ros.cli import main
from matchanything_ros.core.errors import ConfigError
from matchanything_ros.core.matcher import DATA_DIR, Matcher, MatcherConfig

SIZE = (320, 256)  # camera W x H: 1600 image0 cells, quick on a CPU


DOCS = Path(__file__).resolve().parent.parent / "docs" / "engines.md"


def documented_export_argv(model_dir: Path, size: str) -> list[str]:
    """The `matchanything export` command of docs/engines.md's "Example session" (the Jetson user's path), run
    with this test's output directory, the bundled model (its --checkpoint-path dropped) and a small camera."""
    text = DOCS.read_text()
    block = text[text.index("## Example session"):]
    block = block[block.index("```bash") + 7:]
    block = block[:block.index("```")]
    command = next(ln for ln in block.replace("\\\n", " ").splitlines() if ln.startswith("matchanything export "))
    argv = shlex.split(command.split("#")[0])[1:]
    swap = {"--checkpoint-path": None, "--model-file-path": str(model_dir), "--image-size": size}
    assert set(swap) <= set(argv), f"the documented export command changed: {command}"
    out: list[str] = []
    words = iter(argv)
    for word in words:
        if word in swap:
            next(words)
            value = swap[word]
            if value is not None:
                out += [word, value]
        else:
            out.append(word)
    return out


@pytest.fixture(scope="module")
def product_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("product")
    assert main(documented_export_argv(d, f"{SIZE[0]}x{SIZE[1]}")) == 0
    return d


def test_the_documented_export_writes_one_graph(product_dir: Path) -> None:
    assert sorted(p.name for p in product_dir.glob("*.onnx")) == ["product.onnx"]  # no coarse/fine
    manifest = json.loads((product_dir / "export.json").read_text())
    assert manifest["graphs"] == ["product"] and manifest["dynamic"] is False and manifest["precision"] == "fp32"
    assert manifest["image_shapes"] == [[SIZE[1], SIZE[0], 3]] * 2


def test_export_without_a_size_says_which_export_to_choose(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    assert main(["export", "--model-file-path", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "--image-size WxH" in err and "product.onnx" in err and "--free-size" in err
    assert not list(tmp_path.iterdir())


def test_free_size_writes_the_two_graphs_and_the_directory_runs_the_last_export(
        tmp_path: Path, camera_pair: tuple[np.ndarray, np.ndarray]) -> None:
    assert main(documented_export_argv(tmp_path, f"{SIZE[0]}x{SIZE[1]}")) == 0  # first the one-graph export
    assert main(["export", "--free-size", "--no-verify", "--model-file-path", str(tmp_path),
                 "--engine-min-size", "416", "--engine-max-size", "512"]) == 0  # then, into the same folder, two
    assert {"coarse.onnx", "fine.onnx"} <= {p.name for p in tmp_path.glob("*.onnx")}
    manifest = json.loads((tmp_path / "export.json").read_text())
    assert manifest["graphs"] == ["coarse", "fine"] and manifest["canvas_range"] == [416, 512]
    # the folder's manifest says which export is current: the product.onnx left behind is not run
    with Matcher(MatcherConfig.from_params({"device": "cpu", "backend": "onnxruntime",
                                            "model_file_path": str(tmp_path)})) as m:
        assert "product=" not in m.info["engine_file"] and "coarse=" in m.info["engine_file"]
        assert m.match(*camera_pair).extras.get("graph") != "product"


@pytest.fixture(scope="module")
def camera_pair() -> tuple[np.ndarray, np.ndarray]:
    with np.load(DATA_DIR / "demo_homography.npz") as z:  # real photos, at another camera's size
        return (cv2.resize(z["image0"], SIZE, interpolation=cv2.INTER_LINEAR),
                cv2.resize(z["image1"], SIZE, interpolation=cv2.INTER_LINEAR))


def test_onnxruntime_runs_the_product_model_with_the_host_paths_matches(
        product_dir: Path, camera_pair: tuple[np.ndarray, np.ndarray]) -> None:
    params = {"device": "cpu", "threshold": 0.1}
    with Matcher(MatcherConfig.from_params({**params, "backend": "onnxruntime",
                                            "model_file_path": str(product_dir)})) as m:
        assert m.info["engine_file"] == f"product={(product_dir / 'product.onnx').resolve()}"
        got = m.match(*camera_pair)
        got_ij = (got.extras["coarse_i_ids"], got.extras["coarse_j_ids"])
    with Matcher(MatcherConfig.from_params({**params, "backend": "torch"})) as ref_m:
        ref = ref_m.match(*camera_pair)
        ref_ij = (ref.extras["coarse_i_ids"], ref.extras["coarse_j_ids"])
    assert got.extras["graph"] == "product" and got.extras["matches_capped"] is False
    assert len(ref) > 300 and got.extras["coarse_matches_total"] == len(got) == len(ref)
    np.testing.assert_array_equal(got_ij[0], ref_ij[0])  # the same list, in the same (row-major) order
    np.testing.assert_array_equal(got_ij[1], ref_ij[1])
    # the ONNX Runtime parity rule (test_onnxruntime_backend): keypoints within 1e-2 px (none meets an argmax tie here)
    np.testing.assert_allclose(got.keypoints0, ref.keypoints0, atol=1e-2)
    np.testing.assert_allclose(got.keypoints1, ref.keypoints1, atol=1e-2)
    np.testing.assert_allclose(got.confidence, ref.confidence, rtol=1e-4, atol=1e-6)
    assert got.image0_size == ref.image0_size == SIZE


def test_another_camera_size_says_how_to_export_for_it(product_dir: Path,
                                                       camera_pair: tuple[np.ndarray, np.ndarray]) -> None:
    with Matcher(MatcherConfig.from_params({"device": "cpu", "threshold": 0.1, "backend": "onnxruntime",
                                            "model_file_path": str(product_dir)})) as m:
        with pytest.raises(ConfigError, match=r"export for your camera size with `matchanything export "
                                              r"--image-size WxH`"):
            m.match(camera_pair[0][:224], camera_pair[1][:224])


def test_a_threshold_other_than_the_exported_one_is_refused(product_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"exported for threshold 0.1 .* this matcher has threshold 0.2"):
        Matcher(MatcherConfig.from_params({"device": "cpu", "threshold": 0.2, "backend": "onnxruntime",
                                           "model_file_path": str(product_dir)}))


def test_with_a_forced_resize_the_product_model_fits_every_camera(tmp_path: Path) -> None:
    force = {"force_resize_width": 320, "force_resize_height": 256}
    code = main(["export", "--model-file-path", str(tmp_path), "--force-resize-width", "320",
                 "--force-resize-height", "256", "--threshold", "0.1"])  # no --image-size: the forced one
    assert code == 0 and (tmp_path / "product.onnx").is_file()
    with np.load(DATA_DIR / "demo_homography.npz") as z:
        pairs = [(z["image0"], z["image1"]), (z["image0"][:352, :480], z["image1"][:400, :544])]  # 2 cameras
    params = {"device": "cpu", "threshold": 0.1, **force}
    with Matcher(MatcherConfig.from_params({**params, "backend": "onnxruntime", "model_file_path": str(tmp_path)})
                 ) as m, Matcher(MatcherConfig.from_params({**params, "backend": "torch"})) as ref_m:
        for a, b in pairs:
            got, ref = m.match(a, b), ref_m.match(a, b)
            assert got.extras["graph"] == "product" and len(got) == len(ref) > 100
            np.testing.assert_array_equal(got.extras["coarse_i_ids"], ref.extras["coarse_i_ids"])
            np.testing.assert_array_equal(got.extras["coarse_j_ids"], ref.extras["coarse_j_ids"])
            np.testing.assert_allclose(got.keypoints1, ref.keypoints1, atol=1e-2)
            assert got.image0_size == (a.shape[1], a.shape[0])
