"""Choose and build the inference backend for a pipeline.

`backend=auto` tries, in order: TensorRT (if `tensorrt` and `pycuda` import, the device is not `cpu`
and engine files exist),
ONNX Runtime (if the ONNX files exist), then PyTorch (CUDA when available, else CPU). The chosen
backend is logged and returned; its `name`/`device`/`precision` say what really runs.

Per-graph file paths come from `model_file_path` / `engine_file_path`: a path containing
`{graph}` is formatted per graph; a single-graph variant uses the path as is; otherwise
`<stem>.<graph><suffix>` beside it. With an empty path, the engines module's default location is
asked (`export.default_model_paths` / `engine_build.default_engine_paths`, if present).
"""
from __future__ import annotations

import importlib
import inspect
import logging
from pathlib import Path
from typing import Any, Callable

from ..errors import BackendUnavailableError, ConfigError, MatchAnythingError
from .base import Backend

log = logging.getLogger(__name__)


def graph_paths(base: str, graphs: tuple[str, ...]) -> dict[str, Path]:
    """One file path per graph from a user-given path (see module doc)."""
    if "{graph}" in base:
        return {g: Path(base.format(graph=g)) for g in graphs}
    p = Path(base)
    if len(graphs) == 1:
        return {graphs[0]: p}
    return {g: p.with_name(f"{p.stem}.{g}{p.suffix}") for g in graphs}


def _default_paths(module: str, func: str, params: dict[str, Any], pipeline: Any) -> dict[str, Path] | None:
    try:
        mod = importlib.import_module(f"matchanything_ros.core.{module}")
    except ImportError:
        return None
    fn: Callable[..., Any] | None = getattr(mod, func, None)
    if fn is None:
        return None
    try:
        return {g: Path(p) for g, p in fn(params, pipeline).items()}
    except MatchAnythingError as exc:  # e.g. no GPU/TensorRT to derive the engine cache key: not available
        log.debug("no default %s paths: %s", module, exc)
        return None


def _files(params: dict[str, Any], pipeline: Any, key: str, module: str, func: str) -> dict[str, Path] | None:
    base = params.get(key, "")
    paths: dict[str, Path] | None
    if base and Path(base).expanduser().is_dir():  # an export / engine directory: <dir>/<graph>.onnx|.engine
        suffix = ".onnx" if key == "model_file_path" else ".engine"
        paths = {g: Path(base).expanduser() / f"{g}{suffix}" for g in pipeline.graphs}
    else:
        paths = graph_paths(base, pipeline.graphs) if base else _default_paths(module, func, params, pipeline)
    if paths is None:
        return None
    return paths if all(p.is_file() for p in paths.values()) else None


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def _import_backend(module: str, cls: str) -> Any:
    try:
        return getattr(importlib.import_module(f"matchanything_ros.core.backends.{module}"), cls)
    except ImportError as exc:
        raise BackendUnavailableError(f"backend module {module} cannot be imported: {exc}") from exc
    except AttributeError as exc:
        raise BackendUnavailableError(f"backend module {module} has no {cls}") from exc


def _tensorrt_importable() -> bool:
    try:
        trt = importlib.import_module("tensorrt")
        importlib.import_module("pycuda")
    except ImportError:
        return False
    # type stubs (tensorrt-stubs) make `import tensorrt` succeed as an empty namespace package
    return hasattr(trt, "Runtime")


def create_torch_backend(params: dict[str, Any], pipeline: Any, device: str) -> Backend:
    from ..checkpoint import load_state_dict
    from .torch_backend import TorchBackend

    if hasattr(pipeline, "load_weights"):  # a variant with more than one weights file (RoMa + DINOv2)
        state = pipeline.load_weights(params)
    else:
        state = load_state_dict(params["checkpoint_path"], pipeline.name)
    precision = params.get("precision", "fp32")
    if "precision" in inspect.signature(pipeline.torch_graphs).parameters:
        graphs = pipeline.torch_graphs(state, device, precision=precision)
    else:
        graphs = pipeline.torch_graphs(state, device)
    return TorchBackend(graphs, device, precision, keep_on_device=getattr(pipeline, "device_outputs", ()))


def create_backend(params: dict[str, Any], pipeline: Any) -> Backend:
    """Build the backend `params["backend"]` asks for (see module doc for `auto`)."""
    choice = params.get("backend", "auto")
    device = resolve_device(params.get("device", "auto"))
    precision = params.get("precision", "fp32")
    if choice not in ("auto", "tensorrt", "onnxruntime", "torch"):
        raise ConfigError(f"unknown backend {choice!r}")
    backend: Backend
    if choice in ("auto", "tensorrt"):
        trt_importable = _tensorrt_importable()
        # auto tries TensorRT only where it can run: importable, and not on a device asked to be the CPU
        # (looking up the default engines hashes the checkpoint: not for nothing)
        tried = choice == "tensorrt" or (trt_importable and params.get("device", "auto") != "cpu")
        engines = (_files(params, pipeline, "engine_file_path", "engine_build", "default_engine_paths")
                   if tried else None)
        if engines is not None and trt_importable:
            # TensorRT runs on CUDA only: device auto means cuda here (resolve_device needs torch, which a
            # TensorRT-only install such as a Jetson may not have)
            trt_device = "cuda" if params.get("device", "auto") == "auto" else device
            backend = _import_backend("tensorrt_backend", "TensorRTBackend")(engines, trt_device, precision)
            log.info("backend: tensorrt (%s)", ", ".join(map(str, engines.values())))
            return backend
        if choice == "tensorrt":
            why = "no engine file" if engines is None else "tensorrt/pycuda not importable"
            raise BackendUnavailableError(
                f"TensorRT backend unavailable: {why} (build an engine with `matchanything build-engine`)")
    if choice in ("auto", "onnxruntime"):
        models = _files(params, pipeline, "model_file_path", "export", "default_model_paths")
        if models is not None:
            backend = _import_backend("onnxruntime_backend", "OnnxRuntimeBackend")(models, device, precision)
            log.info("backend: onnxruntime on %s (%s)", backend.device, ", ".join(map(str, models.values())))
            return backend
        if choice == "onnxruntime":
            raise BackendUnavailableError("ONNX Runtime backend unavailable: no ONNX files for "
                                          f"{pipeline.name} (export them with `matchanything export`)")
    backend = create_torch_backend(params, pipeline, device)
    log.info("backend: torch on %s, %s", backend.device, backend.precision)
    return backend
