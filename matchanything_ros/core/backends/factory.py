"""Choose and build the inference backend for a pipeline.

`backend=auto` tries, in order: TensorRT (if `tensorrt` and `pycuda` import, the device is not `cpu`
and the engines exist with sidecars that match this GPU, TensorRT version, export and precision),
ONNX Runtime (if the ONNX files exist), then PyTorch (CUDA when available, else CPU). The chosen
backend is logged and returned; its `name`/`device`/`precision` say what really runs. When `auto`
does not take TensorRT it says why, in the log (a warning) and in `BackendChoice.tensorrt_skipped`
(Matcher.info): no runtime, no engine at the expected path (with the command that builds it), or a
stale engine (with the command that rebuilds it). `force_engine_update` builds the engines first.

Per-graph file paths come from `model_file_path` / `engine_file_path`: a path containing
`{graph}` is formatted per graph; a single-graph variant uses the path as is; otherwise
`<stem>.<graph><suffix>` beside it. With an empty path, the default location is derived
(`engines.cache.default_model_paths`; TensorRT: `engines.build.find_engines`, the cache-key directory).
The runtimes that run exported files (ONNX Runtime, TensorRT) live in core/engines/ and are imported
only when chosen.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailableError, ConfigError, EngineMismatchError, MatchAnythingError
from ..device_wait import DEFAULT_HOST_WAIT
from .base import Backend

log = logging.getLogger(__name__)


def _onnx_files(params: dict[str, Any], pipeline: Any) -> dict[str, Path] | None:
    """{graph: ONNX file} of `model_file_path` (default: the checkpoint's export); None unless all exist."""
    from ..engines.cache import ONNX_SUFFIX, default_model_paths, export_graphs, graph_paths

    base = params.get("model_file_path", "")
    paths: dict[str, Path] | None
    if base and Path(base).expanduser().is_dir():  # an export directory: <dir>/<graph>.onnx
        folder = Path(base).expanduser()
        paths = {g: folder / f"{g}{ONNX_SUFFIX}" for g in export_graphs(folder, pipeline)}
    elif base:
        paths = graph_paths(base, pipeline.graphs)
    else:
        try:
            paths = default_model_paths(params, pipeline)
        except MatchAnythingError as exc:  # e.g. no checkpoint to derive the default export directory from
            log.debug("no default ONNX paths: %s", exc)
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


def torch_device_problem(device: str) -> str | None:
    """Why torch cannot run on `device` here, naming the fix (None: it can). One line: the CLI prints it as its
    error and the node as its ERROR diagnostic."""
    if not device.startswith("cuda"):
        return None
    import torch

    if torch.version.cuda is None:
        return (f"CUDA is not available here (torch {torch.__version__} is built without CUDA); "
                "use --device cpu or auto")
    if not torch.cuda.is_available():
        return (f"CUDA is not available here (torch {torch.__version__} finds no CUDA GPU: no GPU, no driver, or "
                "CUDA_VISIBLE_DEVICES hides it); use --device cpu or auto")
    count = torch.cuda.device_count()
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    if index >= count:
        return f"{device} does not exist here (torch sees {count} CUDA GPU(s)); use --device cuda (= cuda:0) or auto"
    return None


def _import_backend(module: str, cls: str) -> Any:
    """A runtime class from core/engines/ (imported only when asked for: onnxruntime, tensorrt)."""
    try:
        return getattr(importlib.import_module(f"matchanything_ros.core.engines.{module}"), cls)
    except ImportError as exc:
        raise BackendUnavailableError(f"backend module {module} cannot be imported: {exc}") from exc
    except AttributeError as exc:
        raise BackendUnavailableError(f"backend module {module} has no {cls}") from exc


def tensorrt_runtime_problem() -> str | None:
    """Why TensorRT cannot run in this process (None: `tensorrt` >= 10 and `pycuda` import)."""
    from ..engines.cuda_context import import_pycuda
    from ..engines.tensorrt_backend import import_tensorrt

    try:
        import_tensorrt()
        import_pycuda()
    except BackendUnavailableError as exc:
        return f"no TensorRT runtime: {exc}"
    return None


def _tensorrt_backend(params: dict[str, Any], pipeline: Any, device: str, precision: str
                      ) -> tuple[Backend | None, str]:
    """(the TensorRT backend, "") or (None, why not) for `params`."""
    from ..engines.build import build_engine_set, engine_settings, find_engines, this_system
    from ..engines.cache import resolve_onnx_dir

    problem = tensorrt_runtime_problem()
    if problem is not None:
        return None, problem
    device_index = int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0
    try:
        system = this_system(device_index)
    except BackendUnavailableError as exc:  # e.g. no GPU or no driver
        return None, str(exc)
    if params.get("force_engine_update"):  # asked for explicitly: a failed build is an error, not a fallback
        onnx_dir = resolve_onnx_dir({**params, "variant": pipeline.name})
        log.warning("force_engine_update: building the TensorRT engines of %s (minutes; not hung)", onnx_dir)
        build_engine_set(onnx_dir, force=True, device_index=device_index, system=system, **engine_settings(params))
    try:
        found = find_engines(params, pipeline, system)
    except MatchAnythingError as exc:  # an unreadable export, sizes the export cannot take, ...
        return None, f"cannot look up the TensorRT engines: {exc}"
    if found.problem is not None:
        return None, found.problem
    # TensorRT runs on CUDA only: device auto means cuda here (resolve_device needs torch, which a
    # TensorRT-only install such as a Jetson may not have)
    trt_device = "cuda" if device == "auto" else device
    cls = _import_backend("tensorrt_backend", "TensorRTBackend")
    try:
        backend = cls(found.engines, trt_device, precision, variant=pipeline.name,
                      onnx_paths=found.onnx_paths or None, device_index=device_index,
                      keep_on_device=pipeline.device_outputs)
    except EngineMismatchError as exc:  # the backend checks again, on the device it opened
        return None, f"stale TensorRT engine: {exc}"
    _bind_single_graph(pipeline, backend, found.engines)
    return backend, ""


def _bind_single_graph(pipeline: Any, backend: Any, models: dict[str, Path]) -> None:
    """A one-graph export (ELoFTR's product model) runs with the threshold and cap it was exported for:
    the pipeline checks them against its own and switches to that graph (closing the backend if not)."""
    from ..engines.cache import META_PREFIX

    single = pipeline.product_graph
    if single is None or single not in backend.graphs:
        return
    meta = backend.metadata(single)
    try:
        pipeline.bind_product_model(meta.get(META_PREFIX + "threshold"), meta.get(META_PREFIX + "max_matches"),
                                    str(models[single]))
    except ConfigError:
        backend.close()
        raise


@dataclass
class BackendChoice:
    backend: Backend
    tensorrt_skipped: str  # why backend=auto did not take TensorRT ("" when it did, or was not asked)


def create_backend(params: dict[str, Any], pipeline: Any) -> Backend:
    """Build the backend `params["backend"]` asks for (see module doc for `auto`)."""
    return choose_backend(params, pipeline).backend


def create_torch_backend(params: dict[str, Any], pipeline: Any, device: str) -> Backend:
    from .torch_backend import TorchBackend

    problem = torch_device_problem(device)
    if problem is not None:  # before the weights move to the device, which fails deep inside torch
        raise BackendUnavailableError(problem)
    state = pipeline.load_weights(params)
    precision = params.get("precision", "fp32")
    graphs = pipeline.torch_graphs(state, device, precision=precision)
    pipeline.bind_graphs(graphs)  # its preprocessing feeds the graphs built here
    # the variant's speed choices (EloftrOptions, RomaOptions) that the backend runs
    options = pipeline.options
    return TorchBackend(graphs, device, precision, keep_on_device=pipeline.device_outputs,
                        row_buckets=getattr(options, "row_buckets", True),
                        predict_rows=getattr(options, "predict_rows", True),
                        host_wait=getattr(options, "host_wait", DEFAULT_HOST_WAIT),
                        pinned_upload=options.pinned_upload)  # both variants' options have it


def choose_backend(params: dict[str, Any], pipeline: Any) -> BackendChoice:
    """The backend `params["backend"]` asks for, and why `auto` did not take TensorRT."""
    choice = params.get("backend", "auto")
    asked_device = params.get("device", "auto")
    precision = params.get("precision", "fp32")
    if choice not in ("auto", "tensorrt", "onnxruntime", "torch"):
        raise ConfigError(f"unknown backend {choice!r}")
    backend: Backend | None
    skipped = fallback_note = ""
    if choice == "tensorrt" and asked_device == "cpu":
        raise BackendUnavailableError("TensorRT runs on CUDA GPUs only, not on device cpu; use --device cuda or "
                                      "auto, or --backend onnxruntime or torch on the CPU")
    if choice in ("auto", "tensorrt"):
        if choice == "auto" and asked_device == "cpu":
            skipped = "device is cpu (TensorRT runs on CUDA GPUs only)"
            log.info("backend auto: not TensorRT: %s", skipped)
        else:
            backend, skipped = _tensorrt_backend(params, pipeline, asked_device, precision)
            if backend is not None:
                log.info("backend: tensorrt (%s)", ", ".join(map(str, getattr(backend, "files", {}).values())))
                return BackendChoice(backend, "")
            if choice == "tensorrt":
                raise BackendUnavailableError(f"TensorRT backend unavailable: {skipped}")
            # said once the fallback runs: when it cannot either, its error alone is the one line the user reads
            fallback_note = skipped
    device = resolve_device(asked_device)
    if choice in ("auto", "onnxruntime"):
        models = _onnx_files(params, pipeline)
        if models is not None:
            backend = _import_backend("onnxruntime_backend", "OnnxRuntimeBackend")(
                models, device, precision, keep_on_device=pipeline.device_outputs)
            _bind_single_graph(pipeline, backend, models)
            _note_tensorrt_fallback(fallback_note)
            log.info("backend: onnxruntime on %s (%s)", backend.device, ", ".join(map(str, models.values())))
            return BackendChoice(backend, skipped)
        if choice == "onnxruntime":
            how = ("`matchanything export --image-size WxH` for your camera, --free-size for any image size"
                   if pipeline.name == "eloftr" else f"`matchanything export --variant {pipeline.name}`")
            raise BackendUnavailableError("ONNX Runtime backend unavailable: no ONNX files for "
                                          f"{pipeline.name} (export them with {how})")
    backend = create_torch_backend(params, pipeline, device)
    _note_tensorrt_fallback(fallback_note)
    log.info("backend: torch on %s, %s", backend.device, backend.precision)
    return BackendChoice(backend, skipped)


def _note_tensorrt_fallback(why: str) -> None:
    """The warning of backend=auto that did not take TensorRT (Python logging: the CLI prints it, the node
    logs it through its ROS logger)."""
    if why:
        log.warning("backend auto: not using TensorRT: %s", why)
