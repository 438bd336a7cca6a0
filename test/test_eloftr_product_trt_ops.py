"""The ELoFTR product model uses only what TensorRT's ONNX parser takes (data/trt_onnx_ops.json):
operators, their checkable restrictions (TopK's K < 3840) and their input types."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from matchanything_ros.core.checkpoint import load_state_dict
from matchanything_ros.core.eloftr.pipeline import EloftrPipeline
from matchanything_ros.core.engines.export import (TOPK_MAX_K, export_eloftr_product, trt_type_problems,
                                           trt_unsupported_ops)
from matchanything_ros.core.matcher import DATA_DIR, resolve_eloftr_checkpoint


def test_product_model_has_nothing_tensorrt_lacks(tmp_path: Path) -> None:
    path, cfg, _ = resolve_eloftr_checkpoint("")
    state = load_state_dict(str(path), "eloftr")
    with np.load(DATA_DIR / "demo_homography.npz") as z:  # real photos; 1600 image0 cells x K=9 candidates
        a, b = np.ascontiguousarray(z["image0"][:256, :320]), np.ascontiguousarray(z["image1"][:256, :320])
    pipe = EloftrPipeline({"threshold": 0.1}, cfg)
    assert (320 // cfg.coarse_stride) ** 2 * cfg.candidates_per_cell > TOPK_MAX_K  # a full sort could not build
    report = export_eloftr_product(pipe, state, tmp_path / "product.onnx", image0=a, image1=b,
                                   checkpoint_sha256="test", log=io.StringIO())
    assert report["matches"] > 300
    assert report["trt_unsupported_ops"] == []
    model = onnx.load(str(tmp_path / "product.onnx"))
    assert trt_unsupported_ops(model) == [] and trt_type_problems(model) == []
    ops = {n.op_type for n in model.graph.node}
    assert {"CumSum", "ScatterElements"} <= ops  # the compaction: prefix sum + scatter


def test_type_check_refuses_an_integer_cumsum() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.INT64, [8])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, [8])
    axis = helper.make_tensor("axis", TensorProto.INT64, [], [0])
    graph = helper.make_graph([helper.make_node("CumSum", ["x", "axis"], ["y"], name="prefix")], "g", [x], [y],
                              initializer=[axis])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert trt_unsupported_ops(model) == []  # the operator itself is supported
    # ...but not on int64
    assert trt_type_problems(model) == ["CumSum (prefix): input type INT64 not among FP32, FP16, BF16"]
