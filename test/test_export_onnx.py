"""ONNX export of ELoFTR: dynamic sizes, metadata, checker/shape inference, TensorRT operator support.

The export (seeded reference weights, ~40 s on 2 cores) is made once per test session and shared
with test_onnxruntime_backend.py / test_tensorrt_module.py / test_validate_benchmark.py through
`exported_eloftr()`.
"""
from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from matchanything_ros import __version__
from matchanything_ros.core.engines.build import read_onnx_metadata
from matchanything_ros.core.engines.export import (
    TRT_OPS_FILE,
    ExportCheckError,
    check_onnx_file,
    load_trt_op_table,
    trt_unsupported_ops,
)
from reference import REFERENCE_ROOT, seeded_weights_module  # noqa: E402

REF = REFERENCE_ROOT
SEED = 1234
_CACHE: dict[str, Any] = {}


def seeded_eloftr_state() -> dict[str, Any]:
    """The reference seeded ELoFTR weights (strict checkpoint layout, `matcher.` prefix removed)."""
    if "state" not in _CACHE:
        if not (REF / "eloftr" / "manifest.json").is_file():
            pytest.fail(f"reference material not found under {REF}; set MATCHANYTHING_REFERENCE_DIR")
        state = seeded_weights_module(REF).seeded_state_dict(REF / "eloftr" / "manifest.json", SEED)
        _CACHE["state"] = {k.removeprefix("matcher."): v for k, v in state.items()}
    return _CACHE["state"]


def exported_eloftr() -> Path:
    """Directory with coarse.onnx, fine.onnx, export.json of the seeded ELoFTR (made once per session)."""
    if "dir" not in _CACHE:
        import torch

        from matchanything_ros.core.eloftr.pipeline import EloftrPipeline
        from matchanything_ros.core.engines.export import export_eloftr

        out = Path(tempfile.mkdtemp(prefix="ma_export_"))
        atexit.register(shutil.rmtree, out, True)
        torch.set_grad_enabled(False)
        export_eloftr(EloftrPipeline({"threshold": 0.001}), seeded_eloftr_state(), out,
                      checkpoint_sha256="ab" * 32, verify_sizes=[])
        torch.set_grad_enabled(True)
        _CACHE["dir"] = out
    return _CACHE["dir"]


# --- TensorRT operator list (data) ---------------------------------------------------------------------

def test_trt_op_list_is_sourced_data() -> None:
    table = json.loads(TRT_OPS_FILE.read_text())
    src = table["source"]
    assert src["repository"].endswith("onnx/onnx-tensorrt") and src["path"] == "docs/operators.md"
    assert src["tensorrt_version"].startswith("10.")
    assert src["opset_range"][0] <= 17 <= src["opset_range"][1]
    ops = table["operators"]
    assert len(ops) > 150
    for name in ("Conv", "Einsum", "Softmax", "TopK", "LayerNormalization", "Resize", "GatherElements"):
        assert ops[name]["supported"], name
    for name in ("Unique", "SequenceAt", "StringNormalizer"):
        assert not ops[name]["supported"], name
    assert "3840" in ops["TopK"]["restrictions"]


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto] | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])], initializer=inits or [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_op_check_flags_what_tensorrt_cannot_parse() -> None:
    ok = _model([helper.make_node("Relu", ["x"], ["y"])])
    assert trt_unsupported_ops(ok) == []
    unique = _model([helper.make_node("Unique", ["x"], ["y"], name="uniq")])
    assert any("Unique (uniq)" in p for p in trt_unsupported_ops(unique))
    custom = _model([helper.make_node("FancyOp", ["x"], ["y"], domain="com.example")])
    assert any("custom domain" in p for p in trt_unsupported_ops(custom))
    big_k = onnx.numpy_helper.from_array(np.array([5000], np.int64), "k")
    topk = _model([helper.make_node("TopK", ["x", "k"], ["y", "idx"])], [big_k])
    assert any("K = 5000" in p for p in trt_unsupported_ops(topk))
    # inside a subgraph too
    body = helper.make_graph([helper.make_node("Unique", ["x"], ["z"])], "body", [],
                             [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    cond = helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=body)
    assert any("Unique" in p for p in trt_unsupported_ops(_model([cond])))


def test_check_onnx_file_rejects_unsupported_graph(tmp_path: Path) -> None:
    m = _model([helper.make_node("Unique", ["x"], ["y"])])
    onnx.save(m, tmp_path / "bad.onnx")
    with pytest.raises(ExportCheckError, match="TensorRT cannot parse"):
        check_onnx_file(tmp_path / "bad.onnx", load_trt_op_table())


# --- the real export --------------------------------------------------------------------------------------

def test_export_is_checked_dynamic_and_carries_metadata() -> None:
    d = exported_eloftr()
    manifest = json.loads((d / "export.json").read_text())
    assert manifest["variant"] == "eloftr" and manifest["graphs"] == ["coarse", "fine"]
    assert manifest["opset"] >= 17 and manifest["dynamic"] is True
    for graph in ("coarse", "fine"):
        path = d / f"{graph}.onnx"
        facts = check_onnx_file(path)  # checker + strict shape inference + TensorRT op list
        assert facts["opset"] >= 17
        assert facts["op_counts"].get("NonZero", 0) == 0  # no data-dependent output shapes
        model = onnx.load(str(path), load_external_data=False)
        assert trt_unsupported_ops(model) == []
        meta = read_onnx_metadata(path)
        assert meta["matchanything.variant"] == "eloftr"
        assert meta["matchanything.graph"] == graph
        assert meta["matchanything.package_version"] == __version__
        assert meta["matchanything.checkpoint_sha256"] == "ab" * 32
        cfg = json.loads(meta["matchanything.config"])
        assert cfg["candidates_per_cell"] == 9 and cfg["coarse_stride"] == 8
        thr = json.loads(meta["matchanything.thresholds"])
        assert thr["exact_for_threshold_at_least"] == pytest.approx(0.1)
        pre = json.loads(meta["matchanything.preprocessing"])
        assert pre["canvas_side"] == {"min": 416, "max": 1664, "multiple_of": 32}
        rules = json.loads(meta["matchanything.dynamic_dims"])
        assert rules["cells"] == {"canvas_div": 8}
        dims = {i.name: [x.dim_param or x.dim_value for x in i.type.tensor_type.shape.dim] for i in model.graph.input}
        if graph == "coarse":
            assert dims["image0"] == [1, 1, "canvas", "canvas"] and dims["mask1"] == [1, "cells", "cells"]
            outs = {o.name for o in model.graph.output}
            assert outs == {"cand_j", "cand_conf", "feat_f0", "feat_f1"}
        else:
            assert dims["i_ids"] == ["num_matches"] and dims["feat_f1"] == [1, 64, "canvas", "canvas"]


def test_export_refuses_bad_canvas_range(tmp_path: Path) -> None:
    from matchanything_ros.core.eloftr.pipeline import EloftrPipeline
    from matchanything_ros.core.errors import ConfigError
    from matchanything_ros.core.engines.export import export_eloftr

    with pytest.raises(ConfigError, match="multiples of 32"):
        export_eloftr(EloftrPipeline(), {}, tmp_path, checkpoint_sha256="0" * 64, sizes=(400, 1664))
    with pytest.raises(ConfigError, match="opset"):
        export_eloftr(EloftrPipeline(), {}, tmp_path, checkpoint_sha256="0" * 64, opset=13)
