"""ONNX Runtime through IOBinding (what a device provider uses): ELoFTR's fine feature maps stay where the
coarse session put them (OrtValues handed straight to the fine session, never numpy), and the matches are
those of a plain run. Run on the CPU provider here, real sessions on the seeded export."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
from test_export_onnx import exported_eloftr

from matchanything_ros.core.engines.onnxruntime_backend import OnnxRuntimeBackend
from matchanything_ros.core.eloftr.pipeline import EloftrPipeline
from matchanything_ros.core.matcher import DATA_DIR, run_pipeline


def test_bound_run_keeps_the_fine_maps_off_the_host_and_matches_the_plain_run() -> None:
    export = exported_eloftr()
    paths = {g: export / f"{g}.onnx" for g in ("coarse", "fine")}
    # the seeded weights match weakly: a low threshold (161 matches; the top-K may miss some, both runs alike)
    pipe = EloftrPipeline({"threshold": 0.001, "resize_max": 416})
    plain = OnnxRuntimeBackend(paths, "cpu")
    bound = OnnxRuntimeBackend(paths, "cpu", keep_on_device=pipe.device_outputs, io_binding=True)
    assert not plain.io_binding and bound.io_binding
    with np.load(DATA_DIR / "demo_homography.npz") as z:
        a, b = z["image0"], z["image1"]
    inputs, _ = pipe.preprocess(a, b)
    coarse = bound.run("coarse", inputs)
    assert isinstance(coarse["feat_f0"], ort.OrtValue) and isinstance(coarse["feat_f1"], ort.OrtValue)
    assert isinstance(coarse["cand_conf"], np.ndarray)  # the host selection's input comes back
    np.testing.assert_array_equal(coarse["cand_j"], plain.run("coarse", inputs)["cand_j"])
    ref = run_pipeline(pipe, plain, a, b)
    got = run_pipeline(pipe, bound, a, b)
    assert len(ref) > 50 and len(got) == len(ref)
    np.testing.assert_array_equal(got.extras["coarse_i_ids"], ref.extras["coarse_i_ids"])
    np.testing.assert_array_equal(got.extras["coarse_j_ids"], ref.extras["coarse_j_ids"])
    np.testing.assert_array_equal(got.keypoints0, ref.keypoints0)
    np.testing.assert_array_equal(got.keypoints1, ref.keypoints1)
    np.testing.assert_array_equal(got.confidence, ref.confidence)
    plain.close()
    bound.close()
