"""What of the TensorRT path runs without TensorRT: sidecar + cache key, refusal with the exact rebuild
command, profiles from a real export, the import boundary (no torch), and a mypy check of the
TensorRT code against `tensorrt-stubs` (TensorRT 10 API)."""
from __future__ import annotations

import ast
import keyword
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from test_export_onnx import exported_eloftr

from matchanything_ros import __version__
from matchanything_ros.cli import build_parser
from matchanything_ros.core.engines.build import profile_shapes, read_export_manifest
from matchanything_ros.core.engines.cache import (
    check_sidecar,
    engine_cache_key,
    expected_sidecar_fields,
    read_sidecar,
    rebuild_command,
    sidecar_path,
    write_sidecar,
)
from matchanything_ros.core.errors import BackendUnavailableError, EngineMismatchError

REPO = Path(__file__).resolve().parents[1]
BUILD = {"variant": "eloftr", "model_file_path": "/data/export", "engine_file_path": "/data/engines",
         "precision": "fp16", "engine_min_size": 416, "engine_opt_size": 832, "engine_max_size": 1664,
         "engine_max_matches": 20000, "max_workspace_size": 4 << 30}
HERE = {"gpu": "NVIDIA H100 80GB HBM3", "cc": "9.0", "trt": "10.13.0.35"}


def _engine(tmp_path: Path, trt_version: str = HERE["trt"], precision: str = "fp16") -> Path:
    engine = tmp_path / "coarse.engine"
    engine.write_bytes(b"serialized-engine-bytes")
    record = expected_sidecar_fields("eloftr", "coarse", precision, "11" * 32, HERE["gpu"], HERE["cc"], trt_version)
    record.update({"build_params": BUILD, "profile": {"image0": [[1, 1, 416, 416]] * 3}})
    write_sidecar(engine, record)
    return engine


def _expected(**over: str) -> dict:
    e = expected_sidecar_fields("eloftr", "coarse", "fp16", "11" * 32, HERE["gpu"], HERE["cc"], HERE["trt"])
    e.update(over)
    return e


def test_sidecar_round_trip(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    assert sidecar_path(engine).name == "coarse.engine.json"
    record = check_sidecar(engine, _expected())
    assert record["tensorrt_version"] == HERE["trt"] and record["package_version"] == __version__
    assert record["gpu_name"] == HERE["gpu"] and record["compute_capability"] == "9.0"
    assert len(record["engine_sha256"]) == 64


@pytest.mark.parametrize("field,value,words", [
    ("tensorrt_version", "10.3.0", "TensorRT version"),
    ("gpu_name", "Orin", "GPU model"),
    ("compute_capability", "8.7", "compute capability"),
    ("precision", "fp32", "precision"),
    ("onnx_sha256", "22" * 32, "ONNX model"),
    ("package_version", "9.9.9", "matchanything_ros version"),
])
def test_mismatch_is_refused_with_the_exact_rebuild_command(tmp_path: Path, field: str, value: str,
                                                            words: str) -> None:
    engine = _engine(tmp_path)
    with pytest.raises(EngineMismatchError) as err:
        check_sidecar(engine, _expected(**{field: value}))
    msg = str(err.value)
    assert words in msg and repr(value) in msg
    command = msg.splitlines()[-1].strip()
    assert command == rebuild_command(BUILD)
    assert command == ("matchanything build-engine --engine-file-path /data/engines --engine-max-matches 20000 "
                       "--engine-max-size 1664 --engine-min-size 416 --engine-opt-size 832 --max-workspace-size "
                       "4294967296 --model-file-path /data/export --precision fp16 --variant eloftr "
                       "--force-engine-update")


def test_rebuild_command_is_accepted_by_the_cli(tmp_path: Path) -> None:
    args = build_parser().parse_args(shlex.split(rebuild_command(BUILD))[1:])
    assert args.command == "build-engine"
    for name, value in BUILD.items():
        assert getattr(args, name) == value, name
    assert args.force_engine_update is True


def test_replaced_engine_and_missing_sidecar_are_refused(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    engine.write_bytes(b"another engine")
    with pytest.raises(EngineMismatchError, match="does not match its sidecar"):
        check_sidecar(engine, _expected())
    sidecar_path(engine).unlink()
    with pytest.raises(EngineMismatchError, match="has no sidecar.*build-engine"):
        read_sidecar(engine)


def test_cache_key_changes_with_every_field() -> None:
    base = ("eloftr", HERE["gpu"], HERE["cc"], HERE["trt"], "s416-832-1664-m20000", "fp16", "ab" * 32)
    key = engine_cache_key(*base)
    assert key == "eloftr-nvidia-h100-80gb-hbm3-sm90-trt10.13.0.35-s416-832-1664-m20000-fp16-abababababab"
    for i, other in enumerate(("roma", "Jetson AGX Orin", "8.7", "10.3.0", "s416-640-832-m20000", "fp32",
                               "cd" * 32)):
        changed = list(base)
        changed[i] = other
        assert engine_cache_key(*changed) != key, i


def test_profiles_come_from_the_exports_dim_rules() -> None:
    d = exported_eloftr()
    assert read_export_manifest(d)["graphs"] == ["coarse", "fine"]
    coarse = profile_shapes(d / "coarse.onnx", (416, 832, 1664), (1, 2048, 20000))
    assert coarse["image0"] == [[1, 1, 416, 416], [1, 1, 832, 832], [1, 1, 1664, 1664]]
    assert coarse["mask1"] == [[1, 52, 52], [1, 104, 104], [1, 208, 208]]
    fine = profile_shapes(d / "fine.onnx", (416, 832, 1664), (1, 2048, 20000))
    assert fine["i_ids"] == [[1], [2048], [20000]]
    assert fine["feat_f0"] == [[1, 64, 416, 416], [1, 64, 832, 832], [1, 64, 1664, 1664]]


def _tensorrt_runtime_installed() -> bool:
    """Whether real TensorRT bindings are installed (tensorrt-stubs alone give a code-less namespace package)."""
    import importlib.util

    spec = importlib.util.find_spec("tensorrt")
    return spec is not None and spec.origin is not None and spec.origin.endswith(".py")


def test_tensorrt_backend_imports_no_torch_and_reports_missing_tensorrt(tmp_path: Path) -> None:
    code = ("import sys; import matchanything_ros.core.engines.tensorrt_backend as t; "
            "bad = [m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules]; "
            "assert not bad, bad; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
    from matchanything_ros.core.engines.tensorrt_backend import TensorRTBackend, import_tensorrt
    from matchanything_ros.core.errors import ConfigError

    missing = tmp_path / "coarse.engine"
    if not _tensorrt_runtime_installed():  # this machine: only the type stubs are installed
        with pytest.raises(BackendUnavailableError, match="TensorRT's Python package is not installed.*JetPack"):
            import_tensorrt()
        with pytest.raises(BackendUnavailableError, match="not installed"):
            TensorRTBackend({"coarse": missing}, "cuda")
    else:  # a machine with TensorRT: 10 or newer, and a missing engine is named
        assert int(str(import_tensorrt().__version__).split(".")[0]) >= 10
        with pytest.raises(ConfigError, match=f"not found: {missing}"):
            TensorRTBackend({"coarse": missing}, "cuda")


def _repaired_stubs(dest: Path, site: Path | None = None) -> Path:
    """Copy tensorrt-stubs' .pyi files (installed, or unpacked under `site`) into `dest`, fixing what does
    not parse (parameters named after keywords such as `in`, a non-default parameter after defaults) so
    mypy can read them. (`site` lets another stubs version be checked by hand: unpack its wheel there.)"""
    if site is None:
        import tensorrt_stubs  # the distribution whose files we repair

        site = Path(tensorrt_stubs.__file__).resolve().parents[1]
    kw = "|".join(keyword.kwlist)
    for rel in ("tensorrt/__init__.pyi", "tensorrt_bindings/__init__.pyi", "tensorrt_bindings/tensorrt.pyi"):
        text = (site / rel).read_text()
        text = re.sub(rf"(?<=[(,] )({kw})(?=: )", r"\1_", text)
        text = re.sub(rf"(?<=\()({kw})(?=: )", r"\1_", text)
        lines = text.splitlines()
        for _ in range(100):
            try:
                ast.parse("\n".join(lines))
                break
            except SyntaxError as exc:
                i = (exc.lineno or 1) - 1
                fixed = re.sub(r" = [^,)]+(?=[,)])", "", lines[i])
                assert fixed != lines[i], f"cannot repair {rel}:{exc.lineno}: {exc.msg}"
                lines[i] = fixed
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_text("\n".join(lines) + "\n")
    return dest


def test_tensorrt_code_type_checks_against_tensorrt_stubs(tmp_path: Path) -> None:
    stubs = _repaired_stubs(tmp_path / "stubs")
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\npython_version = 3.11\ncheck_untyped_defs = True\ndisallow_incomplete_defs = True\n"
                      "no_implicit_optional = True\nwarn_redundant_casts = True\nshow_error_codes = True\n"
                      "follow_imports = silent\n"
                      "[mypy-tensorrt,tensorrt.*,tensorrt_bindings,tensorrt_bindings.*]\nignore_errors = True\n"
                      "[mypy-tensorrt_libs,tensorrt_libs.*,pycuda,pycuda.*,onnxruntime,onnxruntime.*]\n"
                      "ignore_missing_imports = True\n")
    files = ["matchanything_ros/core/engines/tensorrt_backend.py", "matchanything_ros/core/engines/build.py",
             "matchanything_ros/core/engines/cuda_context.py", "matchanything_ros/core/engines/cache.py",
             "matchanything_ros/core/backends/factory.py"]
    env = {"MYPYPATH": str(stubs), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(config), "--cache-dir",
                          str(tmp_path / "cache"), *files], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    # and the check has teeth: a TensorRT 8 call (removed in 10) is caught
    bad = tmp_path / "trt8.py"
    bad.write_text("import tensorrt as trt\n\n\ndef f(ctx: trt.IExecutionContext) -> None:\n"
                   "    ctx.execute_async_v2([], 0)\n")
    out = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(config), "--cache-dir",
                          str(tmp_path / "cache"), str(bad)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 1 and "execute_async_v2" in out.stdout, out.stdout
