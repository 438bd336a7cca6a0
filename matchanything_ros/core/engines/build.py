"""`matchanything build-engine`: ONNX -> TensorRT engine (Python API only), with a sidecar.

Follows the TensorRT 10 and 11 Python APIs: Builder -> NetworkDefinition -> OnnxParser ->
BuilderConfig with one optimisation profile whose min/opt/max come from parameters, a workspace
limit, a timing cache file and an IProgressMonitor progress bar. A loud line says the build takes
minutes, so nobody kills a "hung" build.

Precision: `network_typing` decides, in one place, from the TensorRT version, the precision asked
for and the precision the ONNX model carries. A network whose export already has the asked
precision is built strongly typed (TensorRT 11 knows nothing else). fp16 from an fp32 export needs
weak typing (`BuilderFlag.FP16` + numerically sensitive layers pinned to FP32 with
OBEY_PRECISION_CONSTRAINTS), which only TensorRT 10 has (deprecated since 10.12). The sidecar
records the choice.

What does not need TensorRT is plain data and runs in the tests: the typing decision, the FP32
layer plan (from layer facts), profiles, cache keys, the engine lookup and sidecar checks.
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
from typing import Any, TextIO

import onnx

from ..errors import ConfigError, EngineMismatchError, MatchAnythingError
from .cache import (
    ENGINE_SUFFIX,
    EXPORT_MANIFEST,
    META_DYNAMIC_DIMS,
    META_FP32_PATTERNS,
    META_GRAPH_CONSTANTS,
    META_PRECISION,
    ONNX_SUFFIX,
    build_command,
    cache_root,
    check_sidecar,
    default_engine_dir,
    engine_cache_key,
    expected_sidecar_fields,
    graph_paths,
    model_dir,
    resolve_onnx_dir,
    sha256_file,
    shapes_tag,
    slug,
    write_atomic,
    write_sidecar,
)
from .tensorrt_backend import import_tensorrt, trt

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


def tf32_allowed(precision: str, fp32_layer_patterns: list[str] | None) -> bool:
    """Whether an engine may run its FP32 matrix products on TF32 tensor cores (operands with 10 mantissa bits).

    Not in an fp32 engine: fp32 means fp32. Nor in one whose export pins layers to FP32 (RoMa's GP): TF32 is one
    flag per engine, and the GP's Newton-Schulz products with TF32 operands land 100-500x further from a float64
    solve than in fp32 and diverge on near-duplicate features (docs/parity.md, "TF32 in fp16 TensorRT engines")."""
    return precision != "fp32" and not fp32_layer_patterns


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


@dataclass(frozen=True)
class NetworkTyping:
    """How a network is built (see `network_typing`)."""

    strongly_typed: bool
    why: str
    check_fast_fp16: bool = False  # ask builder.platform_has_fast_fp16 (deprecated since 10.5, gone in 11)

    @property
    def name(self) -> str:
        return "strong" if self.strongly_typed else "weak"


def version_tuple(version: str) -> tuple[int, int]:
    """'10.13.0.35' -> (10, 13)."""
    parts = re.findall(r"\d+", version)
    if not parts:
        raise ConfigError(f"cannot read the TensorRT version {version!r}")
    return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0


def network_typing(tensorrt_version: str, precision: str, onnx_precision: str) -> NetworkTyping:
    """The one place where the TensorRT version decides how a network is typed.

    * the export carries the asked precision (an fp32 export for fp32, an fp16 export with fp32
      islands for fp16): strongly typed, on every version; TensorRT builds exactly the export's types;
    * fp16 from an fp32 export: weak typing, TensorRT 10 only (deprecated since 10.12, removed in 11);
    * fp32 from an fp16 export: refused (the engine would not be fp32).
    """
    if precision not in ("fp32", "fp16") or onnx_precision not in ("fp32", "fp16"):
        raise ConfigError(f"precision must be fp32 or fp16, got {precision!r} (export: {onnx_precision!r})")
    major, minor = version_tuple(tensorrt_version)
    if major < 10:
        raise ConfigError(f"TensorRT {tensorrt_version}: TensorRT 10 or newer is required")
    if precision == onnx_precision:
        return NetworkTyping(True, f"the export is {onnx_precision}: strongly typed, built as exported")
    if precision == "fp32":
        raise ConfigError("this export is fp16: build it with --precision fp16 (an fp32 engine needs an fp32 export, "
                          "`matchanything export` without --precision fp16)")
    if major >= 11:
        raise ConfigError(
            f"TensorRT {tensorrt_version} builds strongly typed networks only, so an fp16 engine needs an fp16 "
            "export with fp32 islands, and this export is fp32. Build --precision fp32, or use TensorRT 10 "
            "(JetPack ships TensorRT 10)")
    return NetworkTyping(False, f"fp16 from an fp32 export: weak typing (TensorRT {major}.{minor}; deprecated "
                                "since 10.12, removed in 11) with sensitive layers pinned to FP32",
                         check_fast_fp16=(major, minor) < (10, 5))


def onnx_precision(model: onnx.ModelProto) -> str:
    """'fp16' for an export in half precision (metadata, else any fp16 weight), else 'fp32'."""
    declared = _metadata(model).get(META_PRECISION)
    if declared:
        return declared
    half = onnx.TensorProto.FLOAT16
    return "fp16" if any(t.data_type == half for t in model.graph.initializer) else "fp32"


@dataclass(frozen=True)
class LayerFacts:
    """What the FP32 plan needs of one network layer (read from TensorRT, or written by a test)."""

    name: str
    kind: str  # TensorRT LayerType name: "SOFTMAX", "REDUCE", "MATRIX_MULTIPLY", ...
    float_inputs: tuple[bool, ...]  # per input: a floating-point tensor?
    constant_inputs: tuple[bool, ...]  # per input: produced by a CONSTANT layer (weights)?


# the kinds whose float results feed rankings and probabilities (see DEFAULT_FP32_LAYER_TYPES)
_ALWAYS_FP32 = frozenset(DEFAULT_FP32_LAYER_TYPES)
_PRODUCTS = frozenset({"MATRIX_MULTIPLY", "EINSUM"})


def fp32_layer_plan(layers: list[LayerFacts], patterns: list[str]) -> list[str]:
    """Names of the layers a weakly typed fp16 build pins to FP32 (see `needs_fp32`)."""
    compiled = [re.compile(p) for p in patterns]
    return [layer.name for layer in layers if needs_fp32(layer, compiled)]


def needs_fp32(layer: LayerFacts, patterns: list[re.Pattern[str]]) -> bool:
    """Whether a weakly typed fp16 build pins this layer to FP32.

    Only layers that compute on floating-point data: a reduction, top-k or product over integer or
    boolean tensors (the coarse graph has some) has no FP32 implementation to pin to, and with
    OBEY_PRECISION_CONSTRAINTS asking for one fails the build. Products count when both operands
    are activations (similarity/attention), not weights.
    """
    if not layer.float_inputs or not layer.float_inputs[0]:
        return False  # integer/bool data (or no input): nothing to pin
    if any(p.search(layer.name) for p in patterns) or layer.kind in _ALWAYS_FP32:
        return True
    return (layer.kind in _PRODUCTS and len(layer.float_inputs) >= 2 and all(layer.float_inputs)
            and not any(layer.constant_inputs))


def _layer_facts(network: trt.INetworkDefinition) -> list[LayerFacts]:
    kinds = {getattr(trt.LayerType, k): k for k in dir(trt.LayerType) if k.isupper()}
    float_types = {trt.float32, trt.float16}
    producers: dict[str, Any] = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            producers[layer.get_output(j).name] = layer.type
    facts = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        inputs = [layer.get_input(k) for k in range(layer.num_inputs)]
        facts.append(LayerFacts(
            layer.name, kinds.get(layer.type, "?"),
            tuple(t is not None and t.dtype in float_types for t in inputs),
            tuple(t is not None and producers.get(t.name) == trt.LayerType.CONSTANT for t in inputs)))
    return facts


def keep_sensitive_layers_fp32(network: trt.INetworkDefinition, patterns: list[str]) -> list[str]:
    """Weak typing: pin the planned layers (and their float outputs) to FP32; returns their names."""
    compiled = [re.compile(p) for p in patterns]
    float_types = (trt.float32, trt.float16)
    pinned = []
    for i, facts in enumerate(_layer_facts(network)):  # by index: layer names need not be unique
        if not needs_fp32(facts, compiled):
            continue
        layer = network.get_layer(i)
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


def add_profile(builder: trt.Builder, config: trt.IBuilderConfig, network: trt.INetworkDefinition,
                profile: dict[str, list[list[int]]], onnx_path: str | Path) -> None:
    """One optimisation profile with a [min, opt, max] shape per network input."""
    opt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in profile:
            raise ConfigError(f"{onnx_path}: no profile shape for input {name!r}")
        mn, op, mx = (trt.Dims(list(s)) for s in profile[name])
        opt_profile.set_shape(name, mn, op, mx)
    # TensorRT returns -1 (and only logs why) for a profile it rejects, e.g. min > opt
    if config.add_optimization_profile(opt_profile) < 0:
        raise MatchAnythingError(f"TensorRT rejected the optimisation profile for {onnx_path}: "
                                 + "; ".join(f"{k}: {v}" for k, v in profile.items()) + " (see the log above)")


def build_engine(onnx_path: str | Path, engine_path: str | Path, profile: dict[str, list[list[int]]], *,
                 precision: str, workspace_bytes: int, timing_cache_path: str | Path,
                 fp32_layer_patterns: list[str] | None = None, log: TextIO = sys.stderr) -> dict[str, Any]:
    """Build one engine; returns the facts for its sidecar (typing, pinned layers, build time)."""
    import_tensorrt()
    typing = network_typing(str(trt.__version__), precision,
                            onnx_precision(onnx.load(str(onnx_path), load_external_data=False)))
    print(f"network typing: {typing.why}", file=log)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # explicit batch is the only mode since TensorRT 10; STRONGLY_TYPED is accepted (and implied) by 11
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if typing.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external-data files relative to the ONNX file
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise MatchAnythingError(f"TensorRT could not parse {onnx_path}:\n  {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    add_profile(builder, config, network, profile, onnx_path)

    pinned: list[str] = []
    if not typing.strongly_typed:  # fp16 from an fp32 export, TensorRT 10 only (see network_typing)
        if typing.check_fast_fp16 and not builder.platform_has_fast_fp16:
            raise ConfigError("this GPU has no fast FP16; build with --precision fp32")
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = keep_sensitive_layers_fp32(network, list(fp32_layer_patterns or []))
        print(f"fp16: {len(pinned)} numerically sensitive layers kept in FP32 (softmax, similarity/attention "
              "products, float reductions, normalisation, top-k, export-marked layers)", file=log)
    if not tf32_allowed(precision, fp32_layer_patterns) and hasattr(trt.BuilderFlag, "TF32"):
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
                                 "weak typing a layer pinned to FP32 may have no FP32 implementation)")
    engine_path = Path(engine_path)
    write_atomic(engine_path, bytes(memoryview(serialized)))  # type: ignore[arg-type]
    # other builds (another graph, another process) share this file: replace it whole, never truncate it
    save_timing_cache(cache_file, bytes(config.get_timing_cache().serialize()))
    print(f"\nengine written: {engine_path} ({engine_path.stat().st_size / 1e6:.1f} MB, {seconds:.0f} s)", file=log)
    return {"build_seconds": round(seconds, 1), "fp32_layers": len(pinned), "network_typing": typing.name,
            "tensorrt_version": str(trt.__version__)}


def save_timing_cache(path: str | Path, data: bytes) -> Path:
    """Write a timing cache atomically (a crash or a concurrent build never leaves a truncated cache,
    which `set_timing_cache(ignore_mismatch=False)` would reject at the next build)."""
    return write_atomic(path, data)


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


@dataclass(frozen=True)
class TensorRTSystem:
    """What an engine is bound to: the GPU and the TensorRT version that build and run it."""

    gpu_name: str
    compute_capability: str  # "major.minor"
    tensorrt_version: str


def this_system(device_index: int = 0) -> TensorRTSystem:
    """This machine's TensorRT version and GPU (BackendUnavailableError without TensorRT/pycuda/GPU)."""
    import_tensorrt()
    from .cuda_context import gpu_identity

    gpu_name, cc = gpu_identity(device_index)
    return TensorRTSystem(gpu_name, cc, str(trt.__version__))


def engine_settings(params: dict[str, Any]) -> dict[str, Any]:
    """plan_engine_set/build_engine_set keyword arguments from parameter values (defaults from
    core/params.py): the one mapping the CLI, the library and the node share."""
    from ..params import PARAMS_BY_NAME

    def p(name: str) -> Any:
        return params.get(name, PARAMS_BY_NAME[name].default)

    return {"precision": p("precision"), "engine_dir": p("engine_file_path") or None,
            "sizes": (p("engine_min_size"), p("engine_opt_size"), p("engine_max_size")),
            "max_matches": p("engine_max_matches"), "workspace_bytes": p("max_workspace_size"),
            "timing_cache_path": p("timing_cache_path") or None}


@dataclass
class EnginePlan:
    """Everything needed to build or find the engines of one export on one system."""

    variant: str
    graphs: list[str]
    onnx_dir: Path
    engine_dir: Path
    cache_key: str
    profiles: dict[str, dict[str, list[list[int]]]]
    onnx_hashes: dict[str, str]
    system: TensorRTSystem
    checkpoint_sha256: str
    build_params: dict[str, Any]
    timing_cache_path: Path

    @property
    def engines(self) -> dict[str, Path]:
        return {g: self.engine_dir / f"{g}{ENGINE_SUFFIX}" for g in self.graphs}

    def expected(self, graph: str, precision: str) -> dict[str, Any]:
        s = self.system
        return expected_sidecar_fields(self.variant, graph, precision, self.onnx_hashes[graph], s.gpu_name,
                                       s.compute_capability, s.tensorrt_version)


def plan_engine_set(onnx_dir: str | Path, *, precision: str, engine_dir: str | Path | None = None,
                    sizes: tuple[int, int, int] = (416, 832, 1664), max_matches: int = 20000,
                    workspace_bytes: int = 4 << 30, timing_cache_path: str | Path | None = None,
                    system: TensorRTSystem | None = None, device_index: int = 0) -> EnginePlan:
    """Profiles, cache key and engine paths for an export on a system (default: this machine's GPU
    and TensorRT). Builds nothing."""
    if system is None:
        system = this_system(device_index)
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
    key = engine_cache_key(variant, system.gpu_name, system.compute_capability, system.tensorrt_version,
                           shape_summary, precision, combined_hash)
    out_dir = Path(engine_dir).expanduser() if engine_dir else default_engine_dir(key)
    timing = Path(timing_cache_path).expanduser() if timing_cache_path else (
        cache_root() / "timing" / f"{slug(system.gpu_name)}-trt{slug(system.tensorrt_version)}.cache")
    build_params = {
        "variant": variant, "model_file_path": str(onnx_dir), "engine_file_path": str(out_dir),
        "precision": precision, "engine_min_size": sizes[0], "engine_opt_size": sizes[1],
        "engine_max_size": sizes[2], "engine_max_matches": max_matches, "max_workspace_size": workspace_bytes,
        "timing_cache_path": str(timing_cache_path or ""),
    }
    return EnginePlan(variant, graphs, onnx_dir, out_dir, key, profiles, onnx_hashes, system,
                      str(manifest.get("checkpoint_sha256", "")), build_params, timing)


def existing_engine_problem(engine: Path, expected: dict[str, Any], profile: dict[str, list[list[int]]]
                            ) -> str | None:
    """Why an existing engine cannot be reused (None: it can): no/unreadable sidecar, built for another
    system/model/precision, replaced after the build, or another optimisation profile."""
    try:
        record = check_sidecar(engine, expected)
    except EngineMismatchError as exc:
        lines = str(exc).splitlines()
        # check_sidecar lists its problems one per line after a header; read_sidecar says it in one line
        details = [ln.strip().lstrip("- ") for ln in lines[1:] if ln.strip().startswith("- ")]
        return "; ".join(details) if details else lines[0]
    if record.get("profile") != profile:
        return f"built for another optimisation profile ({record.get('profile')} here: {profile})"
    return None


def build_engine_set(onnx_dir: str | Path, *, precision: str, engine_dir: str | Path | None = None,
                     sizes: tuple[int, int, int] = (416, 832, 1664), max_matches: int = 20000,
                     workspace_bytes: int = 4 << 30, timing_cache_path: str | Path | None = None,
                     force: bool = False, device_index: int = 0, log: TextIO = sys.stderr,
                     system: TensorRTSystem | None = None) -> dict[str, Path]:
    """Build (or reuse) the engines of every graph of an export; returns {graph: engine path}.

    An existing engine set whose sidecars match this system and profile is reused unless `force`.
    """
    plan = plan_engine_set(onnx_dir, precision=precision, engine_dir=engine_dir, sizes=sizes,
                           max_matches=max_matches, workspace_bytes=workspace_bytes,
                           timing_cache_path=timing_cache_path, system=system, device_index=device_index)
    print(f"engine set {plan.cache_key} -> {plan.engine_dir}", file=log)
    engines = plan.engines
    for graph in plan.graphs:
        expected = plan.expected(graph, precision)
        onnx_path = plan.onnx_dir / f"{graph}{ONNX_SUFFIX}"
        if engines[graph].is_file() and not force:
            problem = existing_engine_problem(engines[graph], expected, plan.profiles[graph])
            if problem is None:
                print(f"{graph}: engine up to date: {engines[graph]}", file=log)
                continue
            print(f"{graph}: existing engine unusable, rebuilding ({problem})", file=log)
        print(f"\n=== {plan.variant}/{graph}: {onnx_path} -> {engines[graph]} ({precision})", file=log)
        for name, (mn, op, mx) in plan.profiles[graph].items():
            print(f"  profile {name}: min {mn} opt {op} max {mx}", file=log)
        meta = read_onnx_metadata(onnx_path)
        facts = build_engine(onnx_path, engines[graph], plan.profiles[graph], precision=precision,
                             workspace_bytes=workspace_bytes, timing_cache_path=plan.timing_cache_path,
                             fp32_layer_patterns=json.loads(meta.get(META_FP32_PATTERNS, "[]")), log=log)
        record = dict(expected)
        record.update(facts)
        record.update({"profile": plan.profiles[graph], "onnx_path": str(onnx_path),
                       "checkpoint_sha256": plan.checkpoint_sha256, "cache_key": plan.cache_key,
                       "workspace_bytes": workspace_bytes, "build_params": plan.build_params,
                       "onnx_metadata": {k: v for k, v in meta.items() if k in META_GRAPH_CONSTANTS},
                       "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        write_sidecar(engines[graph], record)
    return engines


@dataclass
class EngineLookup:
    """Where the TensorRT backend's engines are and whether they run here; `problem` says why not."""

    engines: dict[str, Path]  # {graph: engine path}, existing or expected
    onnx_paths: dict[str, Path]  # {graph: the ONNX file the engine must come from}, where known
    problem: str | None  # None: every engine exists and its sidecar matches this system
    command: str  # the `matchanything build-engine` command that builds these engines


def find_engines(params: dict[str, Any], pipeline: Any, system: TensorRTSystem) -> EngineLookup:
    """The engines `params` ask for on `system`, checked against their sidecars (builds nothing).

    With `engine_file_path` empty, the cache-key directory of the export at `model_file_path`
    (default: the checkpoint's export) with the engine profile of `params`; otherwise that path:
    a directory of `<graph>.engine`, a path with `{graph}`, or the engine of a single-graph variant.
    """
    settings = engine_settings(params)
    precision = settings["precision"]
    variant = pipeline.name
    try:
        onnx_dir: Path | None = model_dir(resolve_onnx_dir({**params, "variant": variant}))
    except ConfigError:
        onnx_dir = None
    have_export = onnx_dir is not None and (onnx_dir / EXPORT_MANIFEST).is_file()
    given = str(params.get("engine_file_path") or "")
    plan = None
    if have_export:
        assert onnx_dir is not None
        plan = plan_engine_set(onnx_dir, system=system, **settings)
    graphs = list(plan.graphs) if plan is not None else list(pipeline.graphs)  # the export's, where known
    single = pipeline.product_graph
    if given:
        base = Path(given).expanduser()
        if plan is None and single and (base / f"{single}{ENGINE_SUFFIX}").is_file():
            graphs = [single]  # an engine directory of a one-graph export
        engines = ({g: base / f"{g}{ENGINE_SUFFIX}" for g in graphs} if base.is_dir()
                   else graph_paths(str(base), tuple(graphs)))
    elif plan is not None:
        engines = plan.engines
    else:
        export_hint = f" at {onnx_dir}" if onnx_dir is not None else ""
        return EngineLookup({}, {}, f"no ONNX export{export_hint} to build an engine from, and no "
                            "engine_file_path: export first (`matchanything export --image-size WxH` for your "
                            "camera; --free-size for any image size), then build (`matchanything build-engine`)",
                            "matchanything build-engine")
    build_params = dict(plan.build_params) if plan is not None else {
        "variant": variant, "precision": precision, "model_file_path": str(onnx_dir or "")}
    build_params["engine_file_path"] = str(next(iter(engines.values())).parent) if given else build_params.get(
        "engine_file_path", "")
    command = build_command(build_params, force=False)
    onnx_paths = ({g: onnx_dir / f"{g}{ONNX_SUFFIX}" for g in graphs} if have_export and onnx_dir
                  else {})
    missing = [str(path) for path in engines.values() if not path.is_file()]
    if missing:
        return EngineLookup(engines, onnx_paths, f"no TensorRT engine at {', '.join(missing)}; build it with:\n  "
                            + command, command)
    problems = []
    for graph, path in engines.items():
        onnx_sha = plan.onnx_hashes.get(graph) if plan is not None else None
        expected = expected_sidecar_fields(variant, graph, precision, onnx_sha, system.gpu_name,
                                           system.compute_capability, system.tensorrt_version)
        try:
            check_sidecar(path, expected)
        except EngineMismatchError as exc:
            problems.append(str(exc))
    if problems:
        return EngineLookup(engines, onnx_paths, "stale TensorRT engine: " + "\n".join(problems), command)
    return EngineLookup(engines, onnx_paths, None, command)

