"""ONNX export of RoMa: one static "dense" graph per (coarse_res, upsample_res) with the export-ready
(Newton-Schulz) GP, checked like ELoFTR's, run in real ONNX Runtime CPU sessions.

The export is made once per module through the real CLI (`matchanything export --variant roma`) from
the seeded weights written as the two files a user passes (test/roma_util.py), at the sizes of the
quickest fixture pair, preferring one without a weight override (read from the fixture; a pair with one is
exported from a checkpoint that carries it). Its ONNX Runtime output is compared with torch (same GP solver)
and with the fixture (at the strides the fixture stores its dense arrays), at
the tolerances of the RoMa Newton-Schulz parity test (flows 1e-3 normalised, certainty 1e-2 / 4).
About 2.5 min and ~9 GB peak on 2 cores: the torch model is freed before ONNX Runtime loads the graph.
"""
from __future__ import annotations

import gc
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import parity_rules as pr
import roma_util as ru
from matchanything_ros import __version__
from matchanything_ros.cli import main as cli_main
from matchanything_ros.core.engines.onnxruntime_backend import OnnxRuntimeBackend
from matchanything_ros.core.engines.cache import sha256_file
from matchanything_ros.core.engines.build import profile_shapes, read_onnx_metadata
from matchanything_ros.core.errors import ConfigError
from matchanything_ros.core.engines.export import check_onnx_file, needs_external_data, save_model, trt_unsupported_ops

FLOW_TOL = 1e-3
CERT_TOL = 1e-2 / 4  # the exporter's own check on random images (an intermediate tolerance)


def _errors_against_fixture(name: str, warp: np.ndarray, cert: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """|ours - fixture| of the final warp (largest over its coordinates) and of the certainty, [u, 2u] each where
    the fixture stores them at full resolution, else at the strides it stores them (the flow halves)."""
    strides = ru.pair_meta(name).get("strides", {})
    if all(strides.get(k, 1) == 1 for k in ("final_warp_A_to_B", "final_warp_B_to_A", "final_certainty")):
        fix_warp, fix_cert = ru.stored_dense(name)
        return np.abs(warp - fix_warp).max(-1), np.abs(cert - fix_cert)
    z, u = ru.npz(name), warp.shape[0]
    halves = [np.abs(ru.subsample(name, key, warp[:, side * u:(side + 1) * u, cols].transpose(2, 0, 1)) - z[key]).max(0)
              for side, key, cols in ((0, "final_warp_A_to_B", slice(2, 4)), (1, "final_warp_B_to_A", slice(0, 2)))]
    return np.concatenate(halves, axis=1), np.abs(ru.subsample(name, "final_certainty", cert) - z["final_certainty"])


def _sizes(name: str) -> tuple[int, int]:
    z = ru.npz(name)
    return int(z["coarse_res"][0]), int(z["upsample_res"][0])


@pytest.fixture(scope="module")
def roma_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    name = ru.quickest_pair()
    coarse, upsample = _sizes(name)
    ckpt, dino = ru.weight_files_for(name)
    out = tmp_path_factory.mktemp("roma_export")
    grad = torch.is_grad_enabled()
    try:
        rc = cli_main(["export", "--variant", "roma", "--checkpoint", str(ckpt), "--dinov2", str(dino),
                       "--coarse-res", str(coarse), "--upsample-res", str(upsample), "--model-file-path", str(out)])
    finally:
        torch.set_grad_enabled(grad)  # the CLI switches autograd off for the process
        gc.collect()
    assert rc == 0
    return out, name


@pytest.mark.parity
@pytest.mark.slow
def test_roma_export_is_static_checked_and_carries_metadata(roma_export: tuple[Path, str]) -> None:
    out, name = roma_export
    c, u = _sizes(name)
    path = out / "dense.onnx"
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["variant"] == "roma" and manifest["graphs"] == ["dense"] and manifest["dynamic"] is False
    assert manifest["static_shapes"] == {"coarse_res": c, "upsample_res": u}
    facts = manifest["files"]["dense"]
    # DINOv2-L + RoMa in fp32 (~1.7 GB) fits one protobuf: weights stay inline, no .data file
    assert 1e9 < facts["proto_bytes"] < 2**31 and facts["external_data"] is False
    assert not (out / "dense.onnx.data").exists()
    # the exporter's own ORT-vs-torch check (seeded random images) passed within the parity tolerances
    verify = manifest["verification"][0]
    assert verify["warp"] <= FLOW_TOL and verify["certainty"] <= CERT_TOL, verify

    checked = check_onnx_file(path)  # onnx.checker + strict shape inference + TensorRT op list, by path
    ops = checked["op_counts"]
    assert "Inverse" not in ops and not {"Loop", "If", "NonZero"} & set(ops), sorted(ops)
    model = onnx.load(str(path), load_external_data=False)
    assert trt_unsupported_ops(model) == []
    dims = {v.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
            for v in [*model.graph.input, *model.graph.output]}
    assert dims == {"image0_coarse": [1, 3, c, c], "image1_coarse": [1, 3, c, c], "image0_fine": [1, 3, u, u],
                    "image1_fine": [1, 3, u, u], "warp": [1, u, 2 * u, 4], "certainty": [1, u, 2 * u]}

    ckpt, dino = ru.weight_files_for(name)
    meta = {k.removeprefix("matchanything."): v for k, v in read_onnx_metadata(path).items()}
    assert meta["variant"] == "roma" and meta["graph"] == "dense"
    assert meta["package_version"] == __version__
    assert meta["checkpoint_sha256"] == sha256_file(ckpt) and meta["dinov2_sha256"] == sha256_file(dino)
    assert json.loads(meta["static_shapes"]) == {"coarse_res": c, "upsample_res": u}
    cfg = json.loads(meta["config"])
    assert (cfg["coarse_res"], cfg["upsample_res"]) == (c, u)
    gp = json.loads(meta["gp"])
    assert gp["solver"] == "newton_schulz" and gp["tokens"] == (c // 14) ** 2 and gp["iterations"] > 0
    assert json.loads(meta["dynamic_dims"]) == {}
    # the fp16 engine build keeps the GP in FP32 by these patterns: they must name the GP's matrix products
    patterns = [re.compile(p) for p in json.loads(meta["fp32_layer_patterns"])]
    gp_matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul" and any(p.search(n.name) for p in patterns)]
    assert len(gp_matmuls) >= 2 * gp["iterations"], gp_matmuls
    # build-engine turns the static graph into min = opt = max profiles
    profile = profile_shapes(path, (416, 832, 1664), (1, 2048, 20000))
    assert profile["image0_coarse"] == [[1, 3, c, c]] * 3 and profile["image1_fine"] == [[1, 3, u, u]] * 3


@pytest.mark.parity
@pytest.mark.slow
def test_onnxruntime_runs_roma_export_like_torch_and_the_fixture(roma_export: tuple[Path, str]) -> None:
    from matchanything_ros.core.roma.pipeline import RomaPipeline

    out, name = roma_export
    c, u = _sizes(name)
    z = ru.npz(name)
    pipe = RomaPipeline({"coarse_res": c, "upsample_res": u, "roma_webui_resize": False,
                         "sample_seed": int(z["sample_seed"]), "num_samples": len(z["sample_stage2_idx"])})
    backend = OnnxRuntimeBackend({"dense": out / "dense.onnx"}, "cpu", "fp32", intra_op_threads=2)
    try:
        assert backend.device == "CPUExecutionProvider"
        assert backend.metadata("dense")["matchanything.variant"] == "roma"
        inputs, meta = pipe.preprocess(z["img0_uint8"], z["img1_uint8"])
        outputs = pipe.infer(backend, inputs, meta)
        # an image size other than the export's is refused with the export's sizes and the fix
        wrong = dict(inputs, image0_coarse=np.zeros((1, 3, c + 14, c + 14), np.float32))
        with pytest.raises(ConfigError, match=rf"coarse_res {c}.*--coarse-res"):
            backend.run("dense", wrong)
    finally:
        backend.close()
        del backend
        gc.collect()
    warp, cert = outputs["warp"][0], outputs["certainty"][0]
    assert warp.shape == (u, 2 * u, 4) and cert.shape == (u, 2 * u)

    ref = ru.forward(name, "newton_schulz")  # torch, same GP solver
    # the parity rules: beyond the tolerance only around anchor-classification near-ties (torch's logits)
    margin = pr.absolute_margin(ref["pass1_s16_gm_cls"], axis=1)
    errors, excused = {}, []
    for against, (warp_err, cert_err) in (
            ("torch newton-schulz", (np.abs(warp - ref["warp"]).max(-1), np.abs(cert - ref["certainty"]))),
            ("fixture", _errors_against_fixture(name, warp, cert))):
        keep_w, ex_w = pr.dense_errors_at_anchor_ties(warp_err, FLOW_TOL, margin, f"{name} warp vs {against}")
        # the final certainty is the matches' confidence: the promise's 1e-4 (measured 5e-6)
        keep_c, ex_c = pr.dense_errors_at_anchor_ties(cert_err, pr.CONF_ATOL, margin,
                                                      f"{name} certainty vs {against}")
        errors[against] = (float(warp_err[keep_w].max()), float(cert_err[keep_c].max()))
        excused += [ex_w, ex_c]
    print(f"{name} ({c}/{u}) ONNX Runtime vs torch newton-schulz: warp {errors['torch newton-schulz'][0]:.2e}, "
          f"certainty {errors['torch newton-schulz'][1]:.2e}; vs fixture: warp {errors['fixture'][0]:.2e}, "
          f"certainty {errors['fixture'][1]:.2e}")
    pr.report(*excused)

    # the rest of the pipeline takes the ONNX output as it takes torch's: matches in original pixels
    result = pipe.postprocess(outputs, meta)
    h0, w0 = z["img0_uint8"].shape[:2]
    assert len(result) > 0.5 * len(z["mkpts0_f"])
    assert np.all((result.keypoints0 >= -0.5) & (result.keypoints0 <= [w0 - 0.5, h0 - 0.5]))


def test_graph_past_2gb_goes_to_external_data_and_still_checks_and_runs(tmp_path: Path) -> None:
    """The >2 GB path, on a small graph forced to it: one `.data` file beside the graph, checked by path
    (checker + shape inference + op list), loaded by ONNX Runtime. The size decision itself reads the
    serialized size (a >2 GB model cannot even be sized by protobuf: that counts as external)."""
    weight = np.arange(4096, dtype=np.float32)
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4096])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4096])],
                              initializer=[onnx.numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert not needs_external_data(model)
    path = tmp_path / "g.onnx"
    assert save_model(model, path, external=True) is True
    assert (tmp_path / "g.onnx.data").stat().st_size == weight.nbytes
    stored = onnx.load(str(path), load_external_data=False)
    assert [e.value for e in stored.graph.initializer[0].external_data if e.key == "location"] == ["g.onnx.data"]
    assert check_onnx_file(path)["op_counts"] == {"Add": 1}
    backend = OnnxRuntimeBackend({"g": path}, "cpu")
    try:
        np.testing.assert_array_equal(backend.run("g", {"x": np.ones(4096, np.float32)})["y"], weight + 1)
    finally:
        backend.close()
    # saving again inline removes the stale .data file
    assert save_model(onnx.load(str(path)), path) is False and not (tmp_path / "g.onnx.data").exists()


def test_roma_export_cli_refuses_bad_sizes_and_missing_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    base = ["export", "--variant", "roma", "--model-file-path", str(tmp_path / "out")]
    assert cli_main([*base, "--checkpoint", str(tmp_path / "roma.ckpt"), "--coarse-res", "230"]) == 1
    assert "coarse_res: 230 must be a multiple of 14" in capsys.readouterr().err
    assert cli_main([*base, "--coarse-res", "224"]) == 1
    assert "set checkpoint_path" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_build_engine_looks_for_the_export_of_its_own_sizes() -> None:
    """RoMa's graph is static: without --model-file-path, build-engine must find the export made for the
    --coarse-res/--upsample-res it is given, as `export` wrote it, not the default sizes' one."""
    from matchanything_ros.cli.build_engine import BUILD_PARAMS
    from matchanything_ros.core.engines.cache import resolve_onnx_dir, roma_static_tag

    ckpt, _ = ru.weight_files()
    params = {"variant": "roma", "checkpoint_path": str(ckpt), "coarse_res": 280, "upsample_res": 432}
    assert {"coarse_res", "upsample_res"} <= set(BUILD_PARAMS)  # the flags exist
    assert resolve_onnx_dir(params).name.endswith(roma_static_tag(280, 432))
    assert resolve_onnx_dir({**params, "model_file_path": "/exports/roma"}) == Path("/exports/roma")
