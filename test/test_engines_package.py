"""core/engines/: the files that work on exports (export, build, cache, the ONNX Runtime and TensorRT runtimes)
import without a circle, and a TensorRT-only machine (a Jetson without PyTorch) can build and run engines
without loading the export code or torch."""
from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

ENGINES = Path(__file__).resolve().parent.parent / "matchanything_ros" / "core" / "engines"


def _imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at module level or inside functions, as written (relative names kept)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            found.add(base)
            joiner = "" if base.endswith(".") else "."
            found.update(base + joiner + a.name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_export_and_build_never_import_each_other() -> None:
    export_imports = _imported_modules(ENGINES / "export.py")
    build_imports = _imported_modules(ENGINES / "build.py")
    assert not {m for m in export_imports if m.endswith("build") or "engines.build" in m}, export_imports
    assert not {m for m in build_imports if m.endswith("export") or "engines.export" in m}, build_imports


def test_engine_modules_load_without_torch_or_the_export_code() -> None:
    code = ("import sys\n"
            "import matchanything_ros.core.engines.build, matchanything_ros.core.engines.tensorrt_backend\n"
            "import matchanything_ros.core.engines.onnxruntime_backend, matchanything_ros.core.engines.cache\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.endswith('engines.export')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_no_engine_module_imports_the_matcher() -> None:
    """The engines sit below the matcher (it chooses among them): none imports it back, not even inside a
    function, where a circle would only show when that code first runs."""
    for path in sorted(ENGINES.glob("*.py")):
        assert not {m for m in _imported_modules(path) if m.endswith("matcher")}, path.name
    assert not {m for m in _imported_modules(ENGINES.parent / "bundled.py") if "matcher" in m or "engines" in m}


def test_the_old_module_paths_are_gone() -> None:
    for old in ("matchanything_ros.core.export", "matchanything_ros.core.engine_build",
                "matchanything_ros.core.engine_cache", "matchanything_ros.core.backends.tensorrt_backend",
                "matchanything_ros.core.backends.onnxruntime_backend", "matchanything_ros.core.backends.cuda_context"):
        assert importlib.util.find_spec(old) is None, f"{old} still exists: the engine files live in core/engines/"
