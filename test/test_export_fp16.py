"""`matchanything export --precision fp16`: ELoFTR's product model with fp16 weights and explicit fp32 islands
(what TensorRT 11's strongly typed networks need: the precision lives in the model).

On the CPU: the fp16 ONNX model loads and runs in ONNX Runtime, its matches agree with the torch fp32 product
on the reference fixtures' pairs within the fp16 rule (export.FP16_MIN_WITHIN_1PX of the common matches
within 1 px, counts within export.FP16_MAX_COUNT_DIFF), its graph has fp16 weights, and fp32 exactly where
said (the backbone's layers 0-2, the fine FPN, layer norms, the matching head, top-k, the fine level), and the
engine build reads its metadata to build it strongly typed on TensorRT 10 and 11.
ONNX Runtime's CPU provider computes most fp16 nodes in fp32 (it inserts casts), so these figures test the
graph and its fp16 weights; fp16 arithmetic itself is TensorRT's (the validate checklist on a GPU)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from matchanything_ros.cli import main
from matchanything_ros.core.checkpoint import load_state_dict
from matchanything_ros.core.eloftr.product import EloftrProduct
from matchanything_ros.core.eloftr.pipeline import EloftrPipeline
from matchanything_ros.core.engines.build import network_typing, onnx_precision
from matchanything_ros.core.engines.export import (FP16_MAX_COUNT_DIFF, FP16_MIN_WITHIN_1PX, compare_product_outputs,
                                                   export_eloftr_product)
from matchanything_ros.core.errors import ConfigError
from matchanything_ros.core.matcher import Matcher, MatcherConfig, resolve_eloftr_checkpoint
from reference import REFERENCE_ROOT

FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


def _fixture_pairs_512() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The reference fixtures' ELoFTR pairs of one size (512², both astronaut pairs): one fixed-shape export."""
    pairs = []
    for f in sorted((REFERENCE_ROOT / "eloftr").glob("*.npz")):
        with np.load(f) as z:
            if "input_image0_rgb_u8" in z and z["input_image0_rgb_u8"].shape == (512, 512, 3):
                pairs.append((f.stem, z["input_image0_rgb_u8"], z["input_image1_rgb_u8"]))
    assert len(pairs) >= 2, f"expected the 512x512 ELoFTR fixture pairs under {REFERENCE_ROOT / 'eloftr'}"
    return pairs


@pytest.fixture(scope="module")
def fp16_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, EloftrPipeline, dict]:
    path, cfg, _ = resolve_eloftr_checkpoint("")  # the bundled demo model: real matches on real images
    state = load_state_dict(path, "eloftr")
    pipeline = EloftrPipeline({"threshold": 0.1}, cfg)
    _, im0, im1 = _fixture_pairs_512()[0]
    out = tmp_path_factory.mktemp("fp16") / "product.onnx"
    report = export_eloftr_product(pipeline, state, out, image0=im0, image1=im1, checkpoint_sha256="0" * 64,
                                   precision="fp16", log=io.StringIO(), manifest=True)
    # TensorRT's parser would take it: every operator, TopK's K and every operator's input type (fp16 included)
    assert report["trt_unsupported_ops"] == [] and report["precision"] == "fp16"
    return out, pipeline, state


def test_onnxruntime_runs_the_fp16_model_within_the_fp16_rule_of_torch_fp32(fp16_export: tuple) -> None:
    path, pipeline, state = fp16_export
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = EloftrProduct(pipeline.build_net(state), pipeline.threshold, pipeline.max_matches).eval()
    for name, im0, im1 in _fixture_pairs_512():
        with torch.inference_mode():
            expected = reference(torch.from_numpy(im0), torch.from_numpy(im1)).numpy()
        got = session.run(None, {"rgb0": im0, "rgb1": im1})[0]
        cmp = compare_product_outputs(got, expected)
        print(f"{name}: fp16 ONNX {cmp['count']} vs torch fp32 {cmp['count_expected']} matches; "
              f"{cmp['within_1px']:.2%} of {cmp['common']} common within 1 px, max {cmp['kp_max']:.2e} px, "
              f"conf max {cmp['conf_max']:.2e}")
        assert cmp["count_expected"] > 100, name  # real matches, not an empty comparison
        assert cmp["within_1px"] >= FP16_MIN_WITHIN_1PX, (name, cmp)
        assert cmp["count_diff"] <= FP16_MAX_COUNT_DIFF, (name, cmp)


def test_the_matcher_runs_it_with_precision_fp16_and_refuses_fp32(fp16_export: tuple) -> None:
    """Through the Matcher (as the node runs it): the export's precision is the run's, said in MatcherInfo."""
    folder = fp16_export[0].parent
    _, im0, im1 = _fixture_pairs_512()[1]
    params = {"device": "cpu", "threshold": 0.1}
    with Matcher(MatcherConfig.from_params({**params, "backend": "onnxruntime", "precision": "fp16",
                                            "model_file_path": str(folder)})) as m, \
            Matcher(MatcherConfig.from_params({**params, "backend": "torch"})) as ref_m:
        assert m.info["precision"] == "fp16" and m.info["engine_file"].startswith("product=")
        got, ref = m.match(im0, im1), ref_m.match(im0, im1)
    got_ij = list(zip(got.extras["coarse_i_ids"].tolist(), got.extras["coarse_j_ids"].tolist()))
    ref_ij = list(zip(ref.extras["coarse_i_ids"].tolist(), ref.extras["coarse_j_ids"].tolist()))
    assert got.extras["graph"] == "product" and len(ref) > 100
    assert abs(len(got) - len(ref)) <= FP16_MAX_COUNT_DIFF * len(ref)
    ref_at = {ij: k for k, ij in enumerate(ref_ij)}
    common = [(k, ref_at[ij]) for k, ij in enumerate(got_ij) if ij in ref_at]
    err = np.array([max(np.abs(got.keypoints0[a] - ref.keypoints0[b]).max(),
                        np.abs(got.keypoints1[a] - ref.keypoints1[b]).max()) for a, b in common])
    assert len(common) >= 0.95 * len(ref) and (err <= 1.0).mean() >= FP16_MIN_WITHIN_1PX
    with pytest.raises(ConfigError, match="is an fp16 export, and precision 'fp32' was asked for"):
        Matcher(MatcherConfig.from_params({**params, "backend": "onnxruntime", "model_file_path": str(folder)}))


def test_the_graph_has_fp16_weights_and_fp32_islands_where_said(fp16_export: tuple) -> None:
    model = onnx.load(str(fp16_export[0]))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["matchanything.precision"] == "fp16"
    assert sum(t.data_type == FLOAT16 for t in model.graph.initializer) >= 20  # the conv/linear weights
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info, *inferred.input, *inferred.output]}
    types.update({t.name: t.data_type for t in inferred.initializer})
    casts = {a.i for n in inferred.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"}
    assert {FLOAT, FLOAT16} <= casts  # explicit casts into and out of the fp32 islands

    def data_type(node: onnx.NodeProto) -> int:
        return types.get(node.input[0], 0)

    convs = [n for n in inferred.node if n.op_type == "Conv"]
    island = ("/layer0/", "/layer1/", "/layer2/", "/fine_preprocess/")  # FP32_ISLANDS["fpn_backbone12"]
    for node in convs:
        want = FLOAT if any(part in node.name for part in island) else FLOAT16
        assert data_type(node) == want and types[node.input[1]] == want, node.name
    assert {data_type(n) for n in convs} == {FLOAT, FLOAT16}
    transformer = [n for n in inferred.node if "/loftr_coarse/" in n.name and n.op_type in ("MatMul", "Einsum")]
    assert transformer and all(data_type(n) == FLOAT16 for n in transformer)
    # fp32 as on torch (autocast): layer norms; the matching head (dual softmax), top-k and the fine level
    assert all(data_type(n) == FLOAT for n in inferred.node if n.op_type == "LayerNormalization")
    head = [n for n in inferred.node if n.op_type in ("Softmax", "TopK", "Einsum") and "/loftr_coarse/" not in n.name]
    assert any("/fine/" in n.name for n in head) and any(n.op_type == "TopK" for n in head)
    assert all(data_type(n) == FLOAT for n in head), [(n.name, data_type(n)) for n in head]
    assert inferred.output[0].type.tensor_type.elem_type == FLOAT


def test_the_engine_build_takes_it_strongly_typed_on_tensorrt_10_and_11(fp16_export: tuple) -> None:
    precision = onnx_precision(onnx.load(str(fp16_export[0]), load_external_data=False))
    assert precision == "fp16"
    for version in ("10.3.0.30", "10.13.0.35", "11.4.0"):  # JetPack 6's TensorRT, the last 10, TensorRT 11
        assert network_typing(version, "fp16", precision).strongly_typed, version
    with pytest.raises(ConfigError, match="build it with --precision fp16"):
        network_typing("10.3.0.30", "fp32", precision)


def test_fp16_is_refused_where_it_is_not_exported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--free-size", "--precision", "fp16", "--model-file-path", str(tmp_path)]) != 0
    assert "--precision fp16 exports the one-graph product model only" in capsys.readouterr().err
    assert main(["export", "--variant", "roma", "--precision", "fp16", "--model-file-path", str(tmp_path)]) != 0
    assert "RoMa exports in fp32 only" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before anything was written
