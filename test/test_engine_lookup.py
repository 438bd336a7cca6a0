"""The TensorRT build path as far as it runs without TensorRT (issue 15's defects): every engine
parameter reaches the lookup and the build, `auto` says why it did not take TensorRT, sidecars,
the precision plan and the typing decision as data, atomic timing caches, remembered file hashes.

The engine lookup runs on a real export (test_export_onnx's seeded ELoFTR) with a stated GPU and
TensorRT version (`TensorRTSystem`): on a machine with TensorRT the same code reads them from the
device; nothing else differs.
"""
from __future__ import annotations

import logging
import os
import shlex
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_export_onnx import exported_eloftr

from matchanything_ros.cli import build_parser, param_values
from matchanything_ros.cli.build_engine import BUILD_PARAMS
from matchanything_ros.core.engines import build as engine_build
from matchanything_ros.core.eloftr.pipeline import EloftrPipeline
from matchanything_ros.core.engines.build import (
    LayerFacts,
    TensorRTSystem,
    engine_settings,
    existing_engine_problem,
    find_engines,
    fp32_layer_plan,
    network_typing,
    onnx_precision,
    plan_engine_set,
    save_timing_cache,
)
from matchanything_ros.core.engines.cache import (
    expected_sidecar_fields,
    sha256_file,
    write_sidecar,
)
from matchanything_ros.core.errors import BackendUnavailableError, ConfigError, MatchAnythingError
from matchanything_ros.core.matcher import Matcher, MatcherConfig

ORIN = TensorRTSystem("Orin", "8.7", "10.3.0.30")
PIPELINE = EloftrPipeline({})


@pytest.fixture(autouse=True)
def _own_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATCHANYTHING_CACHE_DIR", str(tmp_path / "cache"))


def _cli_plan(argv: str, system: TensorRTSystem = ORIN) -> engine_build.EnginePlan:
    """The engine set `matchanything build-engine <argv>` builds on `system`."""
    args = build_parser().parse_args(["build-engine", *shlex.split(argv)])
    params = param_values(args, BUILD_PARAMS)
    return plan_engine_set(params["model_file_path"], system=system, **engine_settings(params))


def test_every_engine_parameter_reaches_the_lookup_as_the_cli_builds_it() -> None:
    """Defect: MatcherConfig lacked engine_min/opt/max_size, engine_max_matches and timing_cache_path,
    so the Matcher (node, CLI match/validate) looked for default-profile engines and never found one
    built with other flags."""
    export = exported_eloftr()
    flags = f"--model-file-path {export} --engine-min-size 320 --engine-opt-size 640 --engine-max-size 1280 " \
            "--engine-max-matches 5000 --precision fp16"
    built = _cli_plan(flags)
    config = MatcherConfig(model_file_path=str(export), engine_min_size=320, engine_opt_size=640,
                           engine_max_size=1280, engine_max_matches=5000, precision="fp16",
                           timing_cache_path="/tmp/tc", max_workspace_size=1 << 30)
    params = config.to_params()
    assert engine_settings(params)["timing_cache_path"] == "/tmp/tc"
    assert engine_settings(params)["workspace_bytes"] == 1 << 30
    found = find_engines(params, PIPELINE, ORIN)
    assert found.engines == built.engines
    assert built.profiles["coarse"]["image0"] == [[1, 1, 320, 320], [1, 1, 640, 640], [1, 1, 1280, 1280]]
    assert built.profiles["fine"]["i_ids"] == [[1], [2048], [5000]]
    # and another profile is another engine set
    default = find_engines(MatcherConfig(model_file_path=str(export)).to_params(), PIPELINE, ORIN)
    assert default.engines["coarse"].parent != built.engine_dir


def test_missing_engine_names_the_path_and_the_exact_build_command() -> None:
    export = exported_eloftr()
    params = MatcherConfig(model_file_path=str(export), engine_opt_size=640).to_params()
    found = find_engines(params, PIPELINE, ORIN)
    assert found.problem is not None
    assert f"no TensorRT engine at {found.engines['coarse']}" in found.problem
    command = found.problem.splitlines()[-1].strip()
    assert command == found.command and command.startswith("matchanything build-engine ")
    assert "--force-engine-update" not in command
    # the printed command builds exactly the engines the lookup expects
    assert _cli_plan(command.split(" ", 2)[2]).engines == found.engines


def _fake_engine(plan: engine_build.EnginePlan, graph: str, built_on: TensorRTSystem, variant: str = "eloftr",
                 profile: dict | None = None) -> Path:
    """An engine file + sidecar as build_engine_set writes them, built on `built_on`."""
    path = plan.engines[graph]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"serialized engine " + graph.encode())
    record = expected_sidecar_fields(variant, graph, "fp32", plan.onnx_hashes[graph], built_on.gpu_name,
                                     built_on.compute_capability, built_on.tensorrt_version)
    record.update({"profile": profile or plan.profiles[graph], "build_params": plan.build_params})
    write_sidecar(path, record)
    return path


def test_lookup_takes_matching_engines_and_refuses_stale_ones(tmp_path: Path) -> None:
    export = exported_eloftr()
    engines = tmp_path / "engines"
    params = MatcherConfig(model_file_path=str(export), engine_file_path=str(engines)).to_params()
    plan = plan_engine_set(export, system=ORIN, **engine_settings(params))
    for graph in plan.graphs:
        _fake_engine(plan, graph, ORIN)
    assert find_engines(params, PIPELINE, ORIN).problem is None

    upgraded = TensorRTSystem("Orin", "8.7", "10.7.0.23")  # JetPack upgrade: the engines are stale
    stale = find_engines(params, PIPELINE, upgraded).problem
    assert stale is not None and stale.startswith("stale TensorRT engine")
    assert "TensorRT version" in stale and "'10.3.0.30'" in stale and "--force-engine-update" in stale


def test_the_variant_is_checked() -> None:
    """Defect: factory.py did not pass the variant, so an engine of another variant was not refused."""
    export = exported_eloftr()
    params = MatcherConfig(model_file_path=str(export)).to_params()
    plan = plan_engine_set(export, system=ORIN, **engine_settings(params))
    for graph in plan.graphs:
        _fake_engine(plan, graph, ORIN, variant="roma")
    problem = find_engines(params, PIPELINE, ORIN).problem
    assert problem is not None and "variant: engine built for 'roma', this system has 'eloftr'" in problem


def test_an_engine_without_sidecar_is_rebuilt_with_the_reason(tmp_path: Path) -> None:
    """Defect: build_engine_set indexed line 2 of a one-line message (IndexError) for an engine whose
    sidecar is missing or unreadable."""
    export = exported_eloftr()
    plan = plan_engine_set(export, engine_dir=tmp_path, precision="fp32", system=ORIN)
    engine = plan.engines["coarse"]
    engine.write_bytes(b"an engine from elsewhere")
    problem = existing_engine_problem(engine, plan.expected("coarse", "fp32"), plan.profiles["coarse"])
    assert problem is not None and "has no sidecar" in problem
    engine.with_name("coarse.engine.json").write_text("{not json")
    problem = existing_engine_problem(engine, plan.expected("coarse", "fp32"), plan.profiles["coarse"])
    assert problem is not None and "unreadable" in problem
    # an up-to-date one is reused, one of another profile is not
    _fake_engine(plan, "fine", ORIN)
    assert existing_engine_problem(plan.engines["fine"], plan.expected("fine", "fp32"), plan.profiles["fine"]) is None
    other = plan_engine_set(export, engine_dir=tmp_path, precision="fp32", sizes=(416, 640, 832), system=ORIN)
    problem = existing_engine_problem(plan.engines["fine"], other.expected("fine", "fp32"), other.profiles["fine"])
    assert problem is not None and "another optimisation profile" in problem


def test_auto_says_why_it_did_not_take_tensorrt(caplog: pytest.LogCaptureFixture) -> None:
    """This machine has no TensorRT runtime (only its type stubs): auto says so, in the log and in
    Matcher.info; backend=tensorrt fails with the same reason."""
    with caplog.at_level(logging.WARNING, logger="matchanything_ros.core.backends.factory"):
        with Matcher(MatcherConfig(backend="auto", device="auto")) as m:
            reason = m.info["tensorrt_skipped"]
            assert m.backend.name != "tensorrt"
    assert reason.startswith("no TensorRT runtime: TensorRT's Python package is not installed")
    assert any(reason in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    with pytest.raises(BackendUnavailableError, match="TensorRT backend unavailable: no TensorRT runtime"):
        Matcher(MatcherConfig(backend="tensorrt"))
    with Matcher(MatcherConfig(backend="auto", device="cpu")) as m:
        assert m.info["tensorrt_skipped"].startswith("device is cpu")
    with Matcher(MatcherConfig(backend="torch", device="cpu")) as m:
        assert m.info["tensorrt_skipped"] == ""


def _layer(name: str, kind: str, floats: tuple[bool, ...], constants: tuple[bool, ...] | None = None) -> LayerFacts:
    return LayerFacts(name, kind, floats, constants or tuple(False for _ in floats))


def test_fp32_plan_pins_float_computations_only() -> None:
    """Defect: every REDUCE/TOPK layer was pinned to FP32 whatever its input type; the coarse graph
    reduces booleans (masks) and integers, which have no FP32 implementation."""
    layers = [
        _layer("/mask/ReduceMax", "REDUCE", (False,)),  # bool/int reduction: not pinned
        _layer("/topk_int", "TOPK", (False,)),
        _layer("/coarse/ReduceSum", "REDUCE", (True,)),
        _layer("/coarse/TopK", "TOPK", (True,)),
        _layer("/attn/Softmax", "SOFTMAX", (True,)),
        _layer("/norm/LayerNorm", "NORMALIZATION", (True, True, True), (False, True, True)),
        _layer("/attn/QK", "MATRIX_MULTIPLY", (True, True)),  # activation x activation
        _layer("/proj/MatMul", "MATRIX_MULTIPLY", (True, True), (False, True)),  # x weights: fp16 is fine
        _layer("/gps.16/Mul", "ELEMENTWISE", (True, True)),  # export-marked (RoMa's GP)
        _layer("/gps.16/Cast", "CAST", (False,)),  # export-marked, but no float data
        _layer("/conv", "CONVOLUTION", (True,)),
    ]
    assert fp32_layer_plan(layers, [r"/gps\.16/"]) == [
        "/coarse/ReduceSum", "/coarse/TopK", "/attn/Softmax", "/norm/LayerNorm", "/attn/QK", "/gps.16/Mul"]


@pytest.mark.parametrize("version,precision,exported,strong,fast_fp16_query", [
    ("10.3.0.30", "fp16", "fp32", False, True),  # JetPack 6: weak typing, platform_has_fast_fp16 still current
    ("10.13.0.35", "fp16", "fp32", False, False),  # weak typing (deprecated), fast-fp16 query deprecated
    ("10.3.0.30", "fp32", "fp32", True, False),
    ("10.13.0.35", "fp16", "fp16", True, False),  # an fp16 export: strongly typed
    ("11.4.0.10", "fp32", "fp32", True, False),
    ("11.4.0.10", "fp16", "fp16", True, False),
])
def test_the_tensorrt_version_decides_the_network_typing(version: str, precision: str, exported: str,
                                                          strong: bool, fast_fp16_query: bool) -> None:
    typing = network_typing(version, precision, exported)
    assert (typing.strongly_typed, typing.check_fast_fp16) == (strong, fast_fp16_query)
    assert typing.name == ("strong" if strong else "weak")


def test_typing_refusals_say_what_to_do() -> None:
    with pytest.raises(ConfigError, match="strongly typed networks only.*fp16 export.*--precision fp32"):
        network_typing("11.4.0.10", "fp16", "fp32")  # TensorRT 11 has no weak typing
    with pytest.raises(ConfigError, match="an fp32 engine needs an fp32 export"):
        network_typing("10.13.0.35", "fp32", "fp16")
    with pytest.raises(ConfigError, match="TensorRT 10 or newer"):
        network_typing("8.6.1", "fp32", "fp32")


def test_the_export_precision_is_read_from_the_model(tmp_path: Path) -> None:
    model = onnx.load(str(exported_eloftr() / "fine.onnx"), load_external_data=False)
    assert onnx_precision(model) == "fp32"
    half = onnx.load(str(exported_eloftr() / "coarse.onnx"))
    weights = next(i for i in half.graph.initializer if i.data_type == onnx.TensorProto.FLOAT)
    weights.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weights).astype(np.float16), weights.name))
    assert onnx_precision(half) == "fp16"


def test_timing_cache_is_replaced_whole(tmp_path: Path) -> None:
    """Defect: the timing cache was rewritten in place; a build reading it meanwhile (or after a crash
    mid-write) saw a truncated cache."""
    cache = tmp_path / "timing" / "orin.cache"
    save_timing_cache(cache, b"old" * 1000)
    with open(cache, "rb") as reader:
        save_timing_cache(cache, b"new")
        assert reader.read() == b"old" * 1000  # the open file is still the whole old cache
    assert cache.read_bytes() == b"new"
    assert sorted(p.name for p in cache.parent.iterdir()) == ["orin.cache"]  # no temporary left


def test_a_rejected_optimisation_profile_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defect: add_optimization_profile's return (-1 when TensorRT rejects the profile) was unchecked.
    TensorRT cannot run here: a stand-in of the three objects add_profile touches."""
    shapes: list = []
    stand_in = types.SimpleNamespace(Dims=tuple)
    monkeypatch.setattr(engine_build, "trt", stand_in)
    profile = types.SimpleNamespace(set_shape=lambda name, mn, op, mx: shapes.append((name, mn, op, mx)))
    builder = types.SimpleNamespace(create_optimization_profile=lambda: profile)
    network = types.SimpleNamespace(num_inputs=1, get_input=lambda i: types.SimpleNamespace(name="i_ids"))
    rejecting = types.SimpleNamespace(add_optimization_profile=lambda p: -1)
    with pytest.raises(MatchAnythingError, match="rejected the optimisation profile.*i_ids"):
        engine_build.add_profile(builder, rejecting, network, {"i_ids": [[1], [2048], [20000]]}, "fine.onnx")
    assert shapes == [("i_ids", (1,), (2048,), (20000,))]
    accepting = types.SimpleNamespace(add_optimization_profile=lambda p: 0)
    engine_build.add_profile(builder, accepting, network, {"i_ids": [[1], [2048], [20000]]}, "fine.onnx")


def test_file_hashes_are_remembered_by_path_size_and_mtime(tmp_path: Path) -> None:
    """Defect: engines and ONNX files (1.7 GB for RoMa) were re-hashed at every load."""
    f = tmp_path / "model.onnx"
    f.write_bytes(b"a" * 1000)
    first = sha256_file(f)
    stat = f.stat()
    f.write_bytes(b"b" * 1000)  # same size; put the old mtime back: the remembered hash is used
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert sha256_file(f) == first
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a rewrite moves the mtime: hashed again
    assert sha256_file(f) != first


def test_validate_tensorrt_prints_the_checklist_to_report_back(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`matchanything validate --backend tensorrt` on a machine without TensorRT: the checklist says
    which step failed and why, the later steps did not run, and the facts to paste are there."""
    import cv2

    from matchanything_ros.cli import main
    from matchanything_ros.core.validate import REPORT_BACK_BEGIN, REPORT_BACK_END

    images = []
    for i in range(2):
        images.append(tmp_path / f"im{i}.png")
        cv2.imwrite(str(images[-1]), np.full((64, 64, 3), 40 * i, np.uint8))
    code = main(["validate", "--backend", "tensorrt", "--pair", str(images[0]), str(images[1]),
                 "--report", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 4
    block = out[out.index(REPORT_BACK_BEGIN):out.index(REPORT_BACK_END)].splitlines()
    assert block[1].startswith("[FAIL] TensorRT runtime (tensorrt >= 10 and pycuda import): no TensorRT runtime: "
                               "TensorRT's Python package is not installed")
    assert [line[:6] for line in block[2:5]] == ["[----]"] * 3
    assert any(line.startswith("l4t: ") for line in block) and any(line.startswith("matchanything_ros: ")
                                                                     for line in block)
    assert block[-1] == "result: FAILED"


def test_benchmark_checklist_reports_each_configuration() -> None:
    """The block `benchmark --backend tensorrt` ends with (wiring in cli/benchmark.py: see docs/engines.md),
    on a real benchmark run of the demo model (torch CPU) and a configuration that could not start."""
    from matchanything_ros.cli.benchmark import _demo_pairs
    from matchanything_ros.core.benchmark import benchmark_config
    from matchanything_ros.core.validate import REPORT_BACK_BEGIN, REPORT_BACK_END, benchmark_checklist

    with Matcher(MatcherConfig(backend="torch", device="cpu", resize_max=416)) as m:
        config = benchmark_config(m.pipeline, m.backend, _demo_pairs(), warmup=0, runs=2, label="torch cpu fp32 @416")
    text = benchmark_checklist([config], [("tensorrt cuda fp16 @832", "no TensorRT runtime: ...")])
    lines = text.splitlines()
    assert lines[0] == REPORT_BACK_BEGIN and lines[-1] == REPORT_BACK_END
    assert lines[1] == "[FAIL] benchmark tensorrt cuda fp16 @832: no TensorRT runtime: ..."
    assert lines[2].startswith("[PASS] benchmark torch cpu fp32 @416: canvas ")
    assert f"total median {config['stages_ms']['total']['median']:.1f} ms" in lines[2]
    assert "peak device n/a" in lines[2] and "(2 runs)" in lines[2]
    assert lines[-2] == "result: FAILED"
    assert benchmark_checklist([config]).splitlines()[-2] == "result: ALL PASS"
