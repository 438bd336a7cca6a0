"""`matchanything build-engine`: ONNX -> TensorRT 10 engine (Python API only), with a sidecar.

Follows the TensorRT 10 Python API: Builder -> NetworkDefinition (networks are always explicit
batch in TensorRT 10) -> OnnxParser -> BuilderConfig with one optimisation profile whose
min/opt/max come from parameters, FP16 with the numerically sensitive layers pinned to FP32
(`layer.precision` + output types + OBEY_PRECISION_CONSTRAINTS, so the builder fails rather than
silently running them in FP16), a workspace limit, a timing cache file and an IProgressMonitor
progress bar. A loud line says the build takes minutes, so nobody kills a "hung" build.

TensorRT is imported inside the functions: the rest of the package (and its tests) import this
module on machines without TensorRT.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

import onnx

from .engine_cache import (
    ENGINE_SUFFIX,
    EXPORT_MANIFEST,
    ONNX_SUFFIX,
    cache_root,
    check_sidecar,
    expected_sidecar_fields,
    default_engine_dir,
    engine_cache_key,
    model_dir,
    sha256_file,
    shapes_tag,
    slug,
    write_sidecar,
)
from .backends.tensorrt_backend import import_tensorrt, trt
from .errors import ConfigError, EngineMismatchError, MatchAnythingError

# ONNX metadata_props written by core/export.py (read here without torch)
META_PREFIX = "matchanything."
META_DYNAMIC_DIMS = META_PREFIX + "dynamic_dims"  # JSON {dim_name: {"canvas_div": k} | {"matches": true}}
META_FP32_PATTERNS = META_PREFIX + "fp32_layer_patterns"  # JSON [regex, ...] of node names kept in FP32

# Always kept in FP32 under --precision fp16: softmax and the products that feed it
# (activation x activation matmuls = similarity / attention; see _sensitive), reductions,
# normalisation and top-k (the coarse candidate selection must rank exactly as in fp32).
DEFAULT_FP32_LAYER_TYPES = ("SOFTMAX", "TOPK", "NORMALIZATION", "REDUCE")

BUILD_WARNING = ("*** Building TensorRT engines: this can take minutes (up to ~20 on small GPUs such as Jetson). "
                 "It is NOT hung; progress is shown below. The result is cached. ***")


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    return _metadata(onnx.load(str(path), load_external_data=False))


def _metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def _onnx_inputs(model: onnx.ModelProto) -> list[tuple[str, list[int | str]]]:
    """Graph inputs (initializers excluded) as (name, [int | symbolic dim name])."""
    inits = {i.name for i in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims: list[int | str] = []
        for d in vi.type.tensor_type.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else d.dim_param)
        out.append((vi.name, dims))
    return out


def check_size_range(min_size: int, opt_size: int, max_size: int, multiple: int = 32) -> None:
    for name, v in (("engine_min_size", min_size), ("engine_opt_size", opt_size), ("engine_max_size", max_size)):
        if v % multiple:
            raise ConfigError(f"{name} = {v} is not a multiple of {multiple}")
    if not min_size <= opt_size <= max_size:
        raise ConfigError(f"need engine_min_size <= engine_opt_size <= engine_max_size, got "
                          f"{min_size}, {opt_size}, {max_size}")


def profile_shapes(onnx_path: str | Path, sizes: tuple[int, int, int], matches: tuple[int, int, int]
                   ) -> dict[str, list[list[int]]]:
    """{input: [min, opt, max] shape} for one graph, from its symbolic dims and the export's dim rules.

    sizes: canvas side (min, opt, max); matches: fine-graph M (min, opt, max). Static graphs
    (RoMa) get min = opt = max.
    """
    model = onnx.load(str(onnx_path), load_external_data=False)  # once: a RoMa export is ~1.7 GB inline
    rules: dict[str, dict[str, Any]] = json.loads(_metadata(model).get(META_DYNAMIC_DIMS, "{}"))
    profile: dict[str, list[list[int]]] = {}
    for name, dims in _onnx_inputs(model):
        shapes: list[list[int]] = [[], [], []]
        for d in dims:
            for k in range(3):
                if isinstance(d, int) and d > 0:
                    shapes[k].append(d)
                    continue
                rule = rules.get(str(d))
                if rule is None:
                    raise ConfigError(f"{onnx_path}: input {name!r} has dynamic dim {d!r} with no rule in the "
                                      "export metadata; re-export with `matchanything export`")
                if "canvas_div" in rule:
                    div = int(rule["canvas_div"])
                    if sizes[k] % div:
                        raise ConfigError(f"canvas side {sizes[k]} is not a multiple of {div} (input {name!r})")
                    shapes[k].append(sizes[k] // div)
                elif rule.get("matches"):
                    shapes[k].append(matches[k])
                else:
                    raise ConfigError(f"{onnx_path}: unknown dim rule {rule!r} for {d!r}")
        profile[name] = shapes
    return profile


def _sensitive(layer: trt.ILayer, producers: dict[str, trt.LayerType], patterns: list[re.Pattern[str]]) -> bool:
    """Whether a layer must stay in FP32 under an FP16 build."""
    if any(p.search(layer.name) for p in patterns):
        return True
    lt = layer.type
    if lt in tuple(getattr(trt.LayerType, n) for n in DEFAULT_FP32_LAYER_TYPES):
        return True
    if lt in (trt.LayerType.MATRIX_MULTIPLY, trt.LayerType.EINSUM):
        # a product of two activations (no weight operand) is a similarity/attention matrix
        inputs = [layer.get_input(i) for i in range(layer.num_inputs)]
        return all(t is not None and producers.get(t.name) != trt.LayerType.CONSTANT for t in inputs)
    return False


def keep_sensitive_layers_fp32(network: trt.INetworkDefinition, patterns: list[str]) -> list[str]:
    """Pin sensitive layers (and their float outputs) to FP32; returns their names."""
    compiled = [re.compile(p) for p in patterns]
    producers: dict[str, trt.LayerType] = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            producers[layer.get_output(j).name] = layer.type
    pinned = []
    float_types = (trt.float32, trt.float16)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if not _sensitive(layer, producers, compiled):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype in float_types:
                layer.set_output_type(j, trt.float32)
        pinned.append(layer.name)
    return pinned


class _Progress:
    """Text progress bar for TensorRT build phases (thread-safe; TensorRT calls from its threads)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._phases: dict[str, tuple[int, int, float]] = {}  # name -> (depth, num_steps, start)
        self._parents: dict[str, str | None] = {}

    def start(self, phase: str, parent: str | None, num_steps: int) -> None:
        with self._lock:
            depth = 0 if parent is None or parent not in self._phases else self._phases[parent][0] + 1
            self._phases[phase] = (depth, num_steps, time.monotonic())
            self._parents[phase] = parent
            if depth <= 1:
                self._stream.write(f"\n{'  ' * depth}> {phase} ({num_steps} steps)\n")
                self._stream.flush()

    def step(self, phase: str, step: int) -> bool:
        with self._lock:
            depth, n, t0 = self._phases.get(phase, (0, 1, time.monotonic()))
            if depth <= 1:
                done = min(step + 1, n)
                width = 30
                filled = int(width * done / max(n, 1))
                self._stream.write(f"\r{'  ' * depth}  [{'#' * filled}{'.' * (width - filled)}] {done}/{n} "
                                   f"{time.monotonic() - t0:6.1f}s {phase[:40]}")
                self._stream.flush()
        return True  # never cancel

    def finish(self, phase: str) -> None:
        with self._lock:
            depth, _n, t0 = self._phases.pop(phase, (0, 1, time.monotonic()))
            if depth <= 1:
                self._stream.write(f"\n{'  ' * depth}< {phase} done in {time.monotonic() - t0:.1f}s\n")
                self._stream.flush()


def _make_monitor(progress: _Progress) -> trt.IProgressMonitor:
    class ProgressMonitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            progress.start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return progress.step(phase_name, step)

        def phase_finish(self, phase_name: str) -> None:
            progress.finish(phase_name)

    return ProgressMonitor()


def build_engine(onnx_path: str | Path, engine_path: str | Path, profile: dict[str, list[list[int]]], *,
                 precision: str, workspace_bytes: int, timing_cache_path: str | Path,
                 fp32_layer_patterns: list[str] | None = None, log: TextIO = sys.stderr) -> dict[str, Any]:
    """Build one engine; returns the facts for its sidecar (shapes, pinned layers, build time)."""
    import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external-data files relative to the ONNX file
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise MatchAnythingError(f"TensorRT could not parse {onnx_path}:\n  {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    opt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in profile:
            raise ConfigError(f"{onnx_path}: no profile shape for input {name!r}")
        mn, op, mx = (trt.Dims(list(s)) for s in profile[name])
        opt_profile.set_shape(name, mn, op, mx)
    config.add_optimization_profile(opt_profile)

    pinned: list[str] = []
    if precision == "fp16":
        if not builder.platform_has_fast_fp16:
            raise ConfigError("this GPU has no fast FP16; build with --precision fp32")
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = keep_sensitive_layers_fp32(network, list(fp32_layer_patterns or []))
        print(f"fp16: {len(pinned)} numerically sensitive layers kept in FP32 (softmax, similarity/attention "
              "products, reductions, normalisation, top-k, export-marked layers)", file=log)
    elif precision != "fp32":
        raise ConfigError(f"precision must be fp32 or fp16, got {precision!r}")
    else:
        # TF32 would change fp32 results (10-bit mantissa in matmuls); fp32 means fp32
        config.clear_flag(trt.BuilderFlag.TF32)

    cache_file = Path(timing_cache_path)
    cache_bytes = cache_file.read_bytes() if cache_file.is_file() else b""
    timing_cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(timing_cache, ignore_mismatch=False)

    progress = _Progress(log)
    monitor = _make_monitor(progress)  # must outlive the build
    config.progress_monitor = monitor

    print(BUILD_WARNING, file=log, flush=True)
    t0 = time.monotonic()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.monotonic() - t0
    if serialized is None:
        raise MatchAnythingError(f"TensorRT failed to build an engine from {onnx_path} (see the log above; with "
                                 "--precision fp16 a layer pinned to FP32 may have no FP32 implementation)")
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = engine_path.with_name(engine_path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(memoryview(serialized))  # type: ignore[arg-type]
    tmp.replace(engine_path)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_bytes(bytes(config.get_timing_cache().serialize()))
    print(f"\nengine written: {engine_path} ({engine_path.stat().st_size / 1e6:.1f} MB, {seconds:.0f} s)", file=log)
    return {"build_seconds": round(seconds, 1), "fp32_layers": len(pinned),
            "tensorrt_version": str(trt.__version__)}


def read_export_manifest(onnx_dir: str | Path) -> dict[str, Any]:
    path = model_dir(onnx_dir) / EXPORT_MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: point --model-file-path at a `matchanything export` output "
                          "directory") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict) or "graphs" not in data:
        raise ConfigError(f"{path} is not an export manifest")
    return data


@dataclass
class EnginePlan:
    """Everything needed to build or find the engines of one export on this machine."""

    variant: str
    graphs: list[str]
    onnx_dir: Path
    engine_dir: Path
    cache_key: str
    profiles: dict[str, dict[str, list[list[int]]]]
    onnx_hashes: dict[str, str]
    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    checkpoint_sha256: str
    build_params: dict[str, Any]

    @property
    def engines(self) -> dict[str, Path]:
        return {g: self.engine_dir / f"{g}{ENGINE_SUFFIX}" for g in self.graphs}

    def expected(self, graph: str, precision: str) -> dict[str, Any]:
        return expected_sidecar_fields(self.variant, graph, precision, self.onnx_hashes[graph], self.gpu_name,
                                       self.compute_capability, self.tensorrt_version)


def plan_engine_set(onnx_dir: str | Path, *, precision: str, engine_dir: str | Path | None = None,
                    sizes: tuple[int, int, int] = (416, 832, 1664), max_matches: int = 20000,
                    workspace_bytes: int = 4 << 30, device_index: int = 0,
                    gpu: Callable[[int], tuple[str, str]] | None = None) -> EnginePlan:
    """Profiles, cache key and engine paths for an export on this GPU + TensorRT (builds nothing)."""
    import_tensorrt()
    if gpu is None:
        from .backends.cuda_context import gpu_identity
        gpu = gpu_identity
    gpu_name, cc = gpu(device_index)
    onnx_dir = model_dir(onnx_dir)
    manifest = read_export_manifest(onnx_dir)
    variant = str(manifest["variant"])
    graphs = list(manifest["graphs"])
    if manifest.get("dynamic"):
        check_size_range(*sizes)
    matches = (1, min(2048, max_matches), max_matches)
    profiles = {g: profile_shapes(onnx_dir / f"{g}{ONNX_SUFFIX}", sizes, matches) for g in graphs}
    onnx_hashes = {g: sha256_file(onnx_dir / f"{g}{ONNX_SUFFIX}") for g in graphs}
    combined_hash = hashlib.sha256("".join(onnx_hashes[g] for g in graphs).encode()).hexdigest()
    shape_summary = (f"s{sizes[0]}-{sizes[1]}-{sizes[2]}-m{max_matches}" if manifest.get("dynamic")
                     else "static-" + shapes_tag(profiles))
    trt_version = str(trt.__version__)
    key = engine_cache_key(variant, gpu_name, cc, trt_version, shape_summary, precision, combined_hash)
    out_dir = Path(engine_dir).expanduser() if engine_dir else default_engine_dir(key)
    build_params = {
        "variant": variant, "model_file_path": str(onnx_dir), "engine_file_path": str(out_dir),
        "precision": precision, "engine_min_size": sizes[0], "engine_opt_size": sizes[1],
        "engine_max_size": sizes[2], "engine_max_matches": max_matches, "max_workspace_size": workspace_bytes,
    }
    return EnginePlan(variant, graphs, onnx_dir, out_dir, key, profiles, onnx_hashes, gpu_name, cc, trt_version,
                      str(manifest.get("checkpoint_sha256", "")), build_params)


def build_engine_set(onnx_dir: str | Path, *, precision: str, engine_dir: str | Path | None = None,
                     sizes: tuple[int, int, int] = (416, 832, 1664), max_matches: int = 20000,
                     workspace_bytes: int = 4 << 30, timing_cache_path: str | Path | None = None,
                     force: bool = False, device_index: int = 0, log: TextIO = sys.stderr,
                     gpu: Callable[[int], tuple[str, str]] | None = None) -> dict[str, Path]:
    """Build (or reuse) the engines of every graph of an export; returns {graph: engine path}.

    An existing engine set whose sidecars match this system and profile is reused unless `force`.
    """
    plan = plan_engine_set(onnx_dir, precision=precision, engine_dir=engine_dir, sizes=sizes,
                           max_matches=max_matches, workspace_bytes=workspace_bytes, device_index=device_index,
                           gpu=gpu)
    if timing_cache_path is None or str(timing_cache_path) == "":
        timing_cache_path = cache_root() / "timing" / f"{slug(plan.gpu_name)}-trt{slug(plan.tensorrt_version)}.cache"
    print(f"engine set {plan.cache_key} -> {plan.engine_dir}", file=log)
    engines = plan.engines
    for graph in plan.graphs:
        expected = plan.expected(graph, precision)
        onnx_path = plan.onnx_dir / f"{graph}{ONNX_SUFFIX}"
        if engines[graph].is_file() and not force:
            try:
                record = check_sidecar(engines[graph], expected)
                if record.get("profile") == plan.profiles[graph]:
                    print(f"{graph}: engine up to date: {engines[graph]}", file=log)
                    continue
                print(f"{graph}: existing engine has another optimisation profile, rebuilding", file=log)
            except EngineMismatchError as exc:
                print(f"{graph}: existing engine unusable, rebuilding ({exc.args[0].splitlines()[1].strip()})",
                      file=log)
        print(f"\n=== {plan.variant}/{graph}: {onnx_path} -> {engines[graph]} ({precision})", file=log)
        for name, (mn, op, mx) in plan.profiles[graph].items():
            print(f"  profile {name}: min {mn} opt {op} max {mx}", file=log)
        meta = read_onnx_metadata(onnx_path)
        facts = build_engine(onnx_path, engines[graph], plan.profiles[graph], precision=precision,
                             workspace_bytes=workspace_bytes, timing_cache_path=timing_cache_path,
                             fp32_layer_patterns=json.loads(meta.get(META_FP32_PATTERNS, "[]")), log=log)
        record = dict(expected)
        record.update(facts)
        record.update({"profile": plan.profiles[graph], "onnx_path": str(onnx_path),
                       "checkpoint_sha256": plan.checkpoint_sha256, "cache_key": plan.cache_key,
                       "workspace_bytes": workspace_bytes, "build_params": plan.build_params,
                       "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        write_sidecar(engines[graph], record)
    return engines


def default_engine_paths(params: dict[str, Any], pipeline: Any) -> dict[str, Path]:
    """{graph: default engine path} for core/backends/factory.py: the cache-key directory of this
    export on this GPU + TensorRT. Raises BackendUnavailableError without TensorRT/pycuda/GPU."""
    from .export import default_model_dir
    from .params import PARAMS_BY_NAME

    def p(name: str) -> Any:
        return params.get(name, PARAMS_BY_NAME[name].default)

    onnx_dir = p("model_file_path") or default_model_dir(params, pipeline.name)
    plan = plan_engine_set(onnx_dir, precision=p("precision"),
                           sizes=(p("engine_min_size"), p("engine_opt_size"), p("engine_max_size")),
                           max_matches=p("engine_max_matches"), workspace_bytes=p("max_workspace_size"))
    return plan.engines
