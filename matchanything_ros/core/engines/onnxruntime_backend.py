"""ONNX Runtime backend: runs the exported graphs on CPU, or on the CUDA execution provider where present.

It never falls back silently. ONNX Runtime quietly drops to the CPU provider when the CUDA
provider fails to load (missing cuDNN, wrong CUDA), and assigns unsupported nodes to the CPU
one by one; peers' users then measure "GPU" latencies on the CPU. Here a CUDA session is created
with the CPU-fallback switch off, and the provider that actually runs is read back from the
session and reported in `device`; anything else than what was asked for is an error.
"""
from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import numpy as np

from ..errors import BackendUnavailableError, ConfigError
from .cache import META_PRECISION

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(uint8)": np.uint8,
}


def _import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendUnavailableError(f"onnxruntime is not installed: {exc}") from exc
    return ort


def choose_provider(device: str, available: list[str]) -> tuple[str, int]:
    """(provider, device id) for a requested device ("cpu", "cuda", "cuda:N", "auto")."""
    if device == "cpu":
        return CPU, 0
    if device == "auto":
        return (CUDA, 0) if CUDA in available else (CPU, 0)
    if device == "cuda" or device.startswith("cuda:"):
        if CUDA not in available:
            raise BackendUnavailableError(
                f"device {device!r} asked for, but this onnxruntime has no CUDA execution provider "
                f"(available: {', '.join(available)}); install onnxruntime-gpu or use --device cpu")
        return CUDA, int(device.split(":", 1)[1]) if ":" in device else 0
    raise ConfigError(f"unknown device {device!r} for the onnxruntime backend")


def _shape(value: Any) -> tuple[int, ...]:
    """Shape of a numpy array or of an OrtValue (kept on its device between graphs)."""
    shape = getattr(value, "shape", None)
    return tuple(int(d) for d in (shape() if callable(shape) else np.shape(value)))


class OnnxRuntimeBackend:
    """`model_paths`: {graph: path to <graph>.onnx}. `device`: cpu, cuda[:N] or auto.

    `keep_on_device`: output names handed back as OrtValues where the session ran (ELoFTR's fine feature
    maps, the next graph's inputs), never copied to the host. `io_binding` (default: on a device provider)
    runs through IOBinding: host inputs copied in once, kept outputs left where they are, the others copied
    out once; on the CPU without it, a plain run.
    """

    name = "onnxruntime"

    def __init__(self, model_paths: dict[str, str | Path], device: str = "cpu", precision: str = "fp32", *,
                 intra_op_threads: int = 0, keep_on_device: Iterable[str] = (), io_binding: bool | None = None
                 ) -> None:
        if precision not in ("fp32", "fp16"):
            raise ConfigError(f"precision must be fp32 or fp16, got {precision!r}")
        self.precision = precision  # the export's own: checked against each model's metadata below
        ort = _import_ort()
        provider, device_id = choose_provider(device, list(ort.get_available_providers()))
        self._sessions: dict[str, Any] = {}
        self._input_types: dict[str, dict[str, Any]] = {}
        self._output_names: dict[str, list[str]] = {}
        self._metadata: dict[str, dict[str, str]] = {}
        self._shared_dims: dict[str, dict[str, list[tuple[str, int]]]] = {}  # symbolic dim -> inputs using it
        self._fixed_dims: dict[str, dict[str, list[int | None]]] = {}  # input -> dims fixed by the export (or None)
        self.files = {graph: str(Path(path).resolve()) for graph, path in model_paths.items()}  # MatcherInfo
        for graph, path in model_paths.items():
            if not Path(path).is_file():
                raise ConfigError(f"ONNX model for graph {graph!r} not found: {path} (create it with "
                                  "`matchanything export`)")
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = intra_op_threads
            opts.log_severity_level = 3
            if provider == CUDA:
                # fail at load time instead of running unsupported nodes on the CPU behind the user's back
                opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
                providers: list[Any] = [(CUDA, {"device_id": device_id})]
            else:
                providers = [CPU]
            try:
                sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
            except Exception as exc:  # onnxruntime raises its own exception types
                raise BackendUnavailableError(f"onnxruntime could not load {path} on {provider}: {exc}") from exc
            running = sess.get_providers()
            if not running or running[0] != provider:
                raise BackendUnavailableError(
                    f"onnxruntime runs {path} on {running} instead of {provider}; refusing a silent fallback")
            self._sessions[graph] = sess
            self._input_types[graph] = {i.name: _ORT_TYPES.get(i.type) for i in sess.get_inputs()}
            shared: dict[str, list[tuple[str, int]]] = {}
            for i in sess.get_inputs():
                for axis, d in enumerate(i.shape):
                    if isinstance(d, str):
                        shared.setdefault(d, []).append((i.name, axis))
            self._shared_dims[graph] = {d: uses for d, uses in shared.items() if len(uses) > 1}
            self._fixed_dims[graph] = {i.name: [d if isinstance(d, int) else None for d in i.shape]
                                       for i in sess.get_inputs()}
            self._output_names[graph] = [o.name for o in sess.get_outputs()]
            self._metadata[graph] = dict(sess.get_modelmeta().custom_metadata_map)
            exported = self._metadata[graph].get(META_PRECISION, "fp32")
            if exported != precision:  # ONNX Runtime runs a model in the types it was exported with
                raise ConfigError(
                    f"{path} is an {exported} export, and precision {precision!r} was asked for: ONNX Runtime runs "
                    "an export in its own precision. " + (
                        "For fp16: `matchanything export --image-size WxH --precision fp16` (the product model), or "
                        "--backend tensorrt --precision fp16" if precision == "fp16" else
                        "Run it with precision fp16, or export without --precision fp16 for fp32"))
        self.provider = provider
        self.device = provider if provider == CPU else f"{provider}:{device_id}"
        self.io_binding = provider != CPU if io_binding is None else bool(io_binding)
        self._keep = frozenset(keep_on_device) if self.io_binding else frozenset()
        self._ort_device = ("cpu" if provider == CPU else "cuda", device_id)

    @property
    def graphs(self) -> tuple[str, ...]:
        return tuple(self._sessions)

    def metadata(self, graph: str) -> dict[str, Any]:
        """The export's metadata of a graph, JSON values decoded."""
        out: dict[str, Any] = {}
        for k, v in self._metadata[graph].items():
            try:
                out[k] = json.loads(v)
            except ValueError:
                out[k] = v
        return out

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            sess = self._sessions[graph]
        except KeyError:
            raise ConfigError(f"no ONNX model for graph {graph!r} (have: {', '.join(self._sessions)})") from None
        types = self._input_types[graph]
        missing = sorted(set(types) - set(inputs))
        if missing:
            raise ConfigError(f"graph {graph!r} needs inputs {missing}")
        for dim, uses in self._shared_dims[graph].items():
            sizes = {f"{n}[{a}]": _shape(inputs[n])[a] for n, a in uses if a < len(_shape(inputs[n]))}
            if len(set(sizes.values())) > 1:
                raise ConfigError(f"graph {graph!r}: inputs must agree on dimension {dim!r}, got {sizes}"
                                  + (" (exported ELoFTR graphs need both images on the same canvas size: give "
                                     "images of the same size or use a force-resize)" if dim == "canvas" else ""))
        self._check_fixed_dims(graph, inputs)
        if self.io_binding:
            return self._run_bound(sess, graph, inputs)
        feeds = {n: np.ascontiguousarray(inputs[n], dtype=t) if t is not None else inputs[n] for n, t in types.items()}
        outs = sess.run(self._output_names[graph], feeds)
        return dict(zip(self._output_names[graph], outs, strict=True))

    def _run_bound(self, sess: Any, graph: str, inputs: dict[str, Any]) -> dict[str, Any]:
        ort = _import_ort()
        binding = sess.io_binding()
        for name, dtype in self._input_types[graph].items():
            value = inputs[name]
            if isinstance(value, ort.OrtValue):  # an earlier graph's output, still where it was computed
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value, dtype=dtype))
        kind, index = self._ort_device
        for name in self._output_names[graph]:
            binding.bind_output(name, kind, index)
        sess.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return {name: value if name in self._keep else value.numpy()
                for name, value in zip(self._output_names[graph], outs, strict=True)}

    def _check_fixed_dims(self, graph: str, inputs: dict[str, np.ndarray]) -> None:
        """Static exports (RoMa: one per coarse_res/upsample_res) take exactly their shapes; say which."""
        for name, dims in self._fixed_dims[graph].items():
            got = _shape(inputs[name])
            if len(got) == len(dims) and all(d is None or d == g for d, g in zip(dims, got, strict=True)):
                continue
            want = [d if d is not None else "*" for d in dims]
            hint = ""
            shapes = self.metadata(graph).get("matchanything.image_shapes")  # ELoFTR's product model
            if isinstance(shapes, list):
                hint = (f"; this export is for images (after the resize_max/force-resize step) of shapes {shapes}: "
                        "export for your camera size with `matchanything export --image-size WxH`")
            sizes = self.metadata(graph).get("matchanything.static_shapes")
            if isinstance(sizes, dict):
                hint = (f"; this export is for {', '.join(f'{k} {v}' for k, v in sizes.items())}: set those, or "
                        "export for yours with `matchanything export --variant roma --coarse-res N --upsample-res M`")
            raise ConfigError(f"graph {graph!r}: input {name!r} has shape {list(got)}, the ONNX model takes "
                              f"{want}{hint}")

    def close(self) -> None:
        self._sessions.clear()
