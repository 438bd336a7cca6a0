"""The ELoFTR product graph as one ONNX model, run by ONNX Runtime on the CPU: the host path's matches."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx

from matchanything_ros.core.backends.torch_backend import TorchBackend
from matchanything_ros.core.checkpoint import load_state_dict
from matchanything_ros.core.eloftr.pipeline import EloftrPipeline
from matchanything_ros.core.engines.export import PRODUCT_INPUTS, PRODUCT_OUTPUTS, export_eloftr_product
from matchanything_ros.core.matcher import DATA_DIR, resolve_eloftr_checkpoint, run_pipeline


def test_product_graph_onnx_gives_the_host_paths_matches(tmp_path: Path) -> None:
    path, cfg, _ = resolve_eloftr_checkpoint("")
    state = load_state_dict(str(path), "eloftr")
    with np.load(DATA_DIR / "demo_homography.npz") as z:  # real photos, cut to multiples of 32 (no resize)
        a, b = np.ascontiguousarray(z["image0"][:384, :576]), np.ascontiguousarray(z["image1"][:384, :576])
    pipe = EloftrPipeline({"threshold": 0.1}, cfg)
    log = io.StringIO()
    report = export_eloftr_product(pipe, state, tmp_path / "product.onnx", image0=a, image1=b,
                                   checkpoint_sha256="test", log=log)
    model = onnx.load(str(tmp_path / "product.onnx"))
    assert [i.name for i in model.graph.input] == list(PRODUCT_INPUTS)
    assert [o.name for o in model.graph.output] == list(PRODUCT_OUTPUTS)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    # the model's matches are the host reference path's (the export verified ORT against torch on these images)
    host = EloftrPipeline({"threshold": 0.1}, cfg)
    ref = run_pipeline(host, TorchBackend(host.torch_graphs(state, "cpu"), "cpu"), a, b)
    assert report["matches"] == len(ref) > 300 and report["max_abs_diff"] < 1e-3
    import onnxruntime as ort

    out = ort.InferenceSession(str(tmp_path / "product.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"rgb0": a, "rgb1": b})[0]
    n = int(out[0, 0])
    assert n == len(ref)
    np.testing.assert_array_equal(out[1:n + 1, 0].astype(np.int64), ref.extras["coarse_i_ids"])
    np.testing.assert_array_equal(out[1:n + 1, 1].astype(np.int64), ref.extras["coarse_j_ids"])
    np.testing.assert_allclose(out[1:n + 1, 6], ref.confidence, rtol=1e-4, atol=1e-6)
    assert "same list True" in log.getvalue()
