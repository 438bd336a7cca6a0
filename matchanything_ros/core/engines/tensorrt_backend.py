"""TensorRT backend (10 and 11): serialized engines on a dedicated CUDA stream. Imports tensorrt, pycuda, numpy only.

No torch on this path, so a Jetson needs no PyTorch. All CUDA work happens on one worker thread
(`CudaWorker`: primary context retained and pushed per task, one non-blocking stream, pinned +
device buffers allocated once per shape and reused), whatever thread calls `run` — a ROS
callback, an executor thread or the main thread. I/O is name-based (`set_input_shape`,
`set_tensor_address`, `execute_async_v3`) with async copies on that stream.

Engines are checked against their JSON sidecar before deserialisation (TensorRT version, GPU,
precision, ONNX hash, package version); a mismatch is refused with the exact rebuild command.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendUnavailableError, ConfigError, MatchAnythingError
from .cache import check_sidecar, expected_sidecar_fields, read_sidecar, sha256_file
from .cuda_context import CudaWorker


try:
    import tensorrt as trt
except (ImportError, OSError):  # not installed, or its CUDA libraries are missing
    trt = None  # type: ignore[assignment]


def import_tensorrt() -> Any:
    """The `tensorrt` module (10.x or 11.x), or a BackendUnavailableError saying how to install it."""
    # a directory with only type stubs (tensorrt-stubs) imports as an empty namespace package
    if trt is None or not hasattr(trt, "Runtime"):
        raise BackendUnavailableError(
            "TensorRT's Python package is not installed (Jetson: it comes with JetPack, "
            "`sudo apt install python3-libnvinfer`; x86: NVIDIA's TensorRT install guide)")
    if int(str(trt.__version__).split(".")[0]) < 10:
        raise BackendUnavailableError(f"TensorRT {trt.__version__} found; TensorRT 10 or newer is required")
    return trt


def _dims(d: trt.Dims) -> tuple[int, ...]:
    return tuple(d[i] for i in range(len(d)))


@dataclass
class _TensorInfo:
    name: str
    is_input: bool
    dtype: np.dtype
    profile: list[tuple[int, ...]] | None  # inputs: [min, opt, max] of profile 0


@dataclass(frozen=True)
class DeviceTensor:
    """An output left on the device for the next graph (ELoFTR's fine maps): never copied to the host.

    Valid until the graph that produced it runs again (`generation` says which run wrote it)."""

    buffer: str
    shape: tuple[int, ...]
    dtype: np.dtype
    pointer: int
    generation: int


@dataclass
class _Graph:
    engine: trt.ICudaEngine | None
    context: trt.IExecutionContext | None
    tensors: list[_TensorInfo]
    sidecar: dict[str, Any]


class TensorRTBackend:
    """Runs each named graph with its engine. `engine_paths`: {graph: path to <graph>.engine}."""

    name = "tensorrt"

    def __init__(self, engine_paths: dict[str, str | Path], device: str = "cuda", precision: str = "fp32", *,
                 variant: str | None = None, onnx_paths: dict[str, str | Path] | None = None,
                 device_index: int = 0, warmup: bool = True, keep_on_device: Iterable[str] = ()) -> None:
        if device not in ("cuda", "auto") and not device.startswith("cuda"):
            raise ConfigError(f"the TensorRT backend runs on CUDA devices only, not {device!r}")
        if device.startswith("cuda:"):
            device_index = int(device.split(":", 1)[1])
        self.precision = precision
        import_tensorrt()
        self._graphs: dict[str, _Graph] = {}
        self._runtime: trt.Runtime | None = None
        self._lock = threading.Lock()  # run() from several threads: one graph execution at a time
        self._closed = False
        self._keep = frozenset(keep_on_device)  # outputs handed back as DeviceTensor (see `run`)
        self._generation: dict[str, int] = {}  # device-kept buffer -> the run that last wrote it
        self.files = {graph: str(Path(path).resolve()) for graph, path in engine_paths.items()}  # MatcherInfo
        for graph, path in engine_paths.items():
            if not Path(path).is_file():
                raise ConfigError(f"TensorRT engine for graph {graph!r} not found: {path} "
                                  "(build it with `matchanything build-engine`)")
        self._worker = CudaWorker(device_index, thread_name="matchanything-trt")
        self.device = f"cuda:{device_index} ({self._worker.device_name}, TensorRT {trt.__version__})"
        try:
            onnx_paths = onnx_paths or {}
            for graph, path in engine_paths.items():
                # without an explicit ONNX path, check the one the engine was built from (if still there):
                # an engine left behind after a re-export is stale
                onnx_path = onnx_paths.get(graph) or read_sidecar(path).get("onnx_path")
                onnx_sha = sha256_file(onnx_path) if onnx_path and Path(onnx_path).is_file() else None
                cc = "{}.{}".format(*self._worker.compute_capability)
                sidecar = check_sidecar(path, expected_sidecar_fields(
                    variant, graph, precision, onnx_sha, self._worker.device_name, cc, str(trt.__version__)))
                self._graphs[graph] = self._load_on_worker(Path(path).read_bytes(), sidecar)
            if warmup:
                self.warmup()
        except BaseException:
            self.close()
            raise

    # --- worker-thread parts -------------------------------------------------------------------------
    def _load_on_worker(self, data: bytes, sidecar: dict[str, Any]) -> _Graph:
        def load(w: CudaWorker) -> _Graph:
            return self._load(data, sidecar)

        return self._worker.call(load)

    def _load(self, data: bytes, sidecar: dict[str, Any]) -> _Graph:
        if self._runtime is None:
            self._logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise MatchAnythingError("TensorRT could not deserialize the engine (see the TensorRT log above)")
        context = engine.create_execution_context()
        if context is None:
            raise MatchAnythingError("TensorRT could not create an execution context (out of GPU memory?)")
        tensors = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            profile = [_dims(d) for d in engine.get_tensor_profile_shape(name, 0)] if is_input else None
            tensors.append(_TensorInfo(name, is_input, dtype, profile))
        return _Graph(engine, context, tensors, sidecar)

    def _execute(self, graph_name: str, inputs: dict[str, Any], w: CudaWorker) -> dict[str, Any]:
        g = self._graphs[graph_name]
        ctx = g.context
        assert ctx is not None
        for t in g.tensors:
            if not t.is_input:
                continue
            value = inputs[t.name]
            arr: np.ndarray | None = None
            if isinstance(value, DeviceTensor):  # an earlier graph's output, still on the device
                if self._generation.get(value.buffer) != value.generation:
                    raise MatchAnythingError(f"{graph_name}.{t.name}: its device data ({value.buffer}) was "
                                             "overwritten by a later run of the graph that produced it")
                if value.dtype != t.dtype:
                    raise ConfigError(f"{graph_name}.{t.name}: device tensor of {value.dtype}, the engine takes "
                                      f"{t.dtype}")
                shape = value.shape
            else:
                arr = np.ascontiguousarray(value, dtype=t.dtype)
                shape = tuple(arr.shape)
            assert t.profile is not None
            lo, hi = t.profile[0], t.profile[2]
            if len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi, strict=True)):
                if "image_shapes" in json.dumps(g.sidecar.get("onnx_metadata") or {}):  # fixed-shape product
                    raise ConfigError(
                        f"{graph_name}.{t.name}: shape {shape}, the engine takes {tuple(lo)} only (its "
                        "export is for one camera size): export for yours with `matchanything export "
                        "--image-size WxH`, then `matchanything build-engine`")
                raise ConfigError(
                    f"{graph_name}.{t.name}: shape {shape} is outside the engine's optimisation profile "
                    f"{tuple(lo)}..{tuple(hi)}; rebuild with `matchanything build-engine` and wider "
                    "--engine-min-size/--engine-max-size/--engine-max-matches")
            if not ctx.set_input_shape(t.name, shape):
                raise MatchAnythingError(f"TensorRT rejected shape {shape} for {graph_name}.{t.name}")
            pointer = value.pointer if arr is None else w.upload(f"{graph_name}/{t.name}", arr)
            ctx.set_tensor_address(t.name, pointer)
        missing = ctx.infer_shapes()
        if missing:
            raise MatchAnythingError(f"{graph_name}: TensorRT cannot infer shapes of {missing}")
        out_shapes = {}
        kept: dict[str, int] = {}  # outputs left on the device -> their pointers
        for t in g.tensors:
            if t.is_input:
                continue
            shape = _dims(ctx.get_tensor_shape(t.name))
            if any(d < 0 for d in shape):
                raise MatchAnythingError(f"{graph_name}.{t.name}: data-dependent output shape {shape} "
                                         "(graphs must have shapes fixed by their inputs)")
            out_shapes[t.name] = shape
            buffer = f"{graph_name}/{t.name}"
            if t.name in self._keep:
                kept[t.name] = w.buffers.get_device(buffer, shape, t.dtype)
                ctx.set_tensor_address(t.name, kept[t.name])
            else:
                ctx.set_tensor_address(t.name, w.device_buffer(buffer, shape, t.dtype))
        if not ctx.execute_async_v3(w.stream.handle):
            raise MatchAnythingError(f"TensorRT failed to enqueue graph {graph_name!r}")
        views = {t.name: w.download(f"{graph_name}/{t.name}", out_shapes[t.name], t.dtype)
                 for t in g.tensors if not t.is_input and t.name not in kept}
        w.synchronize()
        out: dict[str, Any] = {k: v.copy() for k, v in views.items()}  # pinned buffers are reused by the next call
        for t in g.tensors:
            if t.name in kept:
                buffer = f"{graph_name}/{t.name}"
                self._generation[buffer] = self._generation.get(buffer, 0) + 1
                out[t.name] = DeviceTensor(buffer, out_shapes[t.name], t.dtype, kept[t.name],
                                           self._generation[buffer])
        return out

    def _release(self, w: CudaWorker) -> None:
        # TensorRT objects must die while the context is current: contexts before engines before the runtime
        for g in self._graphs.values():
            g.context = None
        for g in self._graphs.values():
            g.engine = None
        self._graphs.clear()
        self._runtime = None

    # --- public --------------------------------------------------------------------------------------
    @property
    def graphs(self) -> tuple[str, ...]:
        return tuple(self._graphs)

    def sidecar(self, graph: str) -> dict[str, Any]:
        return dict(self._graphs[graph].sidecar)

    def metadata(self, graph: str) -> dict[str, Any]:
        """The constants of the export the engine was built from (ELoFTR's product model: threshold, cap,
        image shapes), as the sidecar repeats them; keys and JSON decoding as OnnxRuntimeBackend.metadata."""
        out: dict[str, Any] = {}
        for k, v in dict(self._graphs[graph].sidecar.get("onnx_metadata") or {}).items():
            try:
                out[k] = json.loads(v)
            except (TypeError, ValueError):
                out[k] = v
        return out

    def run(self, graph: str, inputs: dict[str, Any]) -> dict[str, Any]:
        """Run one graph: numpy arrays (or an earlier graph's DeviceTensor) in, numpy arrays out, except the
        `keep_on_device` outputs, which stay on the device as DeviceTensor."""
        if self._closed:
            raise MatchAnythingError("TensorRT backend is closed")
        if graph not in self._graphs:
            raise ConfigError(f"no engine for graph {graph!r} (have: {', '.join(self._graphs)})")

        def execute(w: CudaWorker) -> dict[str, Any]:
            return self._execute(graph, inputs, w)

        with self._lock:
            return self._worker.call(execute)

    def warmup(self, runs: int = 2) -> None:
        """Run each graph on zeros at its profile's opt shape: first-run tactic/lazy init cost lands here,
        and the buffers for that shape are allocated now."""
        for name, g in self._graphs.items():
            # masks all valid (an empty valid region would be a degenerate, zero-size crop), the rest zeros
            feed = {t.name: (np.ones if t.dtype == np.bool_ else np.zeros)(t.profile[1], t.dtype)
                    for t in g.tensors if t.is_input and t.profile}
            for _ in range(runs):
                self.run(name, feed)

    @property
    def device_bytes_allocated(self) -> int:
        """Bytes of I/O buffers this backend holds on the device (engine weights/activations not included)."""
        return self._worker.buffers.bytes_allocated

    def device_memory_info(self) -> tuple[int, int]:
        return self._worker.call(CudaWorker.memory_info)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        worker = getattr(self, "_worker", None)
        if worker is not None:
            try:
                worker.call(self._release)
            finally:
                worker.close()

    def __del__(self) -> None:  # best effort; call close() explicitly
        try:
            self.close()
        except Exception:
            pass
