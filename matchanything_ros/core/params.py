"""Every user-facing setting, defined once.

The ROS node declares its parameters from `PARAMS`, the CLI builds its flags from `PARAMS`,
and the library's `MatcherConfig` takes its defaults from `PARAMS`. Change a default or a
range here and all three follow.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

VARIANTS = ("eloftr", "roma")
BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "fp16")
PRESETS = ("robot", "hf_space")
SAMPLE_MODES = ("balanced", "topk")
SYNC_MODES = ("stereo", "sequential")
IMAGE_TRANSPORTS = ("raw", "compressed")
GEOMETRY_MODELS = ("none", "homography", "fundamental", "essential")


@dataclass(frozen=True)
class ParamSpec:
    name: str  # ROS parameter name (snake_case); CLI flag is --name-with-dashes
    default: Any
    description: str
    choices: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None
    # the minimum itself is refused (a range (min, max]); `why_not_min` says what that value would cost
    min_exclusive: bool = False
    why_not_min: str = ""
    # "matcher" (library+CLI+node) | "node" (ROS only) | "engine" (which files run) | "build" (the engine
    # profile and builder settings: they key the engine lookup too, so a Matcher takes them as well)
    group: str = "matcher"

    @property
    def type(self) -> type:
        return type(self.default)

    @property
    def cli_flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def validate(self, value: Any) -> Any:
        """Return `value` coerced to this parameter's type, or raise ConfigError saying why."""
        t = self.type
        if t is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
                value = value.lower() in ("true", "1")
            if not isinstance(value, bool):
                raise ConfigError(f"{self.name}: expected true/false, got {value!r}")
        elif t is int:
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ConfigError(f"{self.name}: expected an integer, got {value!r}")
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(f"{self.name}: expected an integer, got {value!r}") from None
        elif t is float:
            if isinstance(value, bool):
                raise ConfigError(f"{self.name}: expected a number, got {value!r}")
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{self.name}: expected a number, got {value!r}") from None
            if value != value:
                raise ConfigError(f"{self.name}: NaN is not a valid value")
        elif t is str:
            if not isinstance(value, str):
                raise ConfigError(f"{self.name}: expected a string, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{self.name}: {value!r} is not one of {', '.join(map(str, self.choices))}")
        if self.min is not None and (value <= self.min if self.min_exclusive else value < self.min):
            if self.min_exclusive:
                raise ConfigError(f"{self.name}: {value} is not allowed, it must be above {self.min:g}"
                                  + (f" ({self.why_not_min})" if self.why_not_min else ""))
            raise ConfigError(f"{self.name}: {value} is below the minimum {self.min}")
        if self.max is not None and value > self.max:
            raise ConfigError(f"{self.name}: {value} is above the maximum {self.max}")
        return value


_P = ParamSpec
PARAMS: tuple[ParamSpec, ...] = (
    # --- model -----------------------------------------------------------------------------
    _P("variant", "eloftr", "MatchAnything variant", choices=VARIANTS),
    _P("checkpoint_path", "", "Model checkpoint (.ckpt Lightning, .pth state dict or .safetensors); "
       "empty = the bundled demo model (ELoFTR only)"),
    _P("dinov2_path", "", "RoMa only: Meta's dinov2_vitl14_pretrain.pth (not inside the RoMa checkpoint)"),
    _P("backend", "auto", "Inference backend; auto = tensorrt -> onnxruntime -> torch", choices=BACKENDS),
    _P("device", "auto", "cpu, cuda, or auto (cuda when available)", choices=DEVICES),
    _P("precision", "fp32", "Network precision; fp16 keeps softmax/similarity/GP in fp32", choices=PRECISIONS),
    _P("threshold", 0.1, "Match confidence threshold (ELoFTR: dual-softmax coarse confidence; "
       "RoMa: unused, as in the web UI; its sampler keeps the original fixed 0.05). 0.1 is the HF web UI default; "
       "a frame with more than engine_max_matches passing keeps the most confident ones",
       min=0.0, max=1.0, min_exclusive=True,
       why_not_min="at 0 every pair of coarse cells passes: millions of matches and gigabytes a frame"),
    # --- ELoFTR preprocessing ----------------------------------------------------------------
    _P("preset", "robot", "Preprocessing preset: robot (aspect kept, longest side <= resize_max) or "
       "hf_space (force 640x480, the web UI, bit-exact)", choices=PRESETS),
    _P("resize_max", 832, "Longest image side after stage-1 shrinking (0 = never shrink)", min=0, max=8192),
    _P("force_resize_width", 0, "Force-resize width in pixels (0 = off; hf_space sets 640)", min=0, max=8192),
    _P("force_resize_height", 0, "Force-resize height in pixels (0 = off; hf_space sets 480)", min=0, max=8192),
    # --- RoMa ----------------------------------------------------------------------------------
    _P("coarse_res", 560, "RoMa coarse resolution (square side, multiple of 14)", min=14, max=2240),
    _P("upsample_res", 864, "RoMa upsample resolution (square side, multiple of 8)", min=16, max=4096),
    _P("sample_mode", "balanced", "RoMa sparse sampling: balanced (the original threshold-balanced "
       "sampler with KDE) or topk (deterministic highest certainty)", choices=SAMPLE_MODES),
    _P("sample_seed", -1, "RoMa balanced sampler seed (-1 = unseeded, as the original)", min=-1, max=2**31 - 1),
    _P("num_samples", 5000, "RoMa number of sparse matches", min=1, max=100000),
    _P("roma_webui_resize", True, "RoMa: apply the web UI's 640x480 stage before the model "
       "(false = feed original images, as the fixtures do)"),
    # --- geometric verification -----------------------------------------------------------------
    _P("geometry", "none", "Robust model fitted to each pair's matches, whose inliers are flagged: none (off: the "
       "matches as before), homography (planar scene or pure rotation), fundamental (uncalibrated epipolar "
       "geometry) or essential (calibrated; needs both cameras' intrinsics: the node's camera_info0/1, the CLI's "
       "--intrinsics). OpenCV USAC MAGSAC on the CPU, a batched verifier on the GPU with the torch backend",
       choices=GEOMETRY_MODELS),
    _P("geometry_threshold_px", 1.0, "Inlier threshold in pixels: transfer error (homography) or Sampson distance "
       "(fundamental, essential)", min=0.0, max=100.0, min_exclusive=True,
       why_not_min="no match is ever within 0 px of a model"),
    _P("geometry_confidence", 0.999, "Probability that the robust fit finds the model (sets how long it samples)",
       min=0.0, max=1.0, min_exclusive=True, why_not_min="a fit that need not succeed samples nothing"),
    _P("geometry_max_iterations", 10000, "Most minimal samples the robust fit tries (OpenCV; the GPU verifier "
       "solves min(this, 8192) in one batch)", min=1, max=1_000_000),
    _P("geometry_usac_matches", 4000, "CPU verification (OpenCV USAC, whose time grows with the matches it scores): "
       "fit on at most this many, a seeded subset spread over image0, then classify every match against the model "
       "with OpenCV's own error. At or above the match count: plain OpenCV on all matches. The GPU verifier scores "
       "every match", min=500, max=1 << 22),
    _P("publish_inliers_only", False, "Keep only the inliers of the fitted model in the output (messages, JSON, "
       "drawings); a pair where no model is found then has no matches. No effect with geometry none"),
    # --- engines -------------------------------------------------------------------------------
    _P("model_file_path", "", "ONNX model for onnxruntime/tensorrt (empty = derived from the cache key)",
       group="engine"),
    _P("engine_file_path", "", "TensorRT engine (empty = derived from the cache key)", group="engine"),
    _P("force_engine_update", False, "Rebuild the TensorRT engine even if one exists", group="engine"),
    _P("max_workspace_size", 4 << 30, "TensorRT builder workspace limit in bytes", min=1 << 20,
       max=1 << 40, group="engine"),
    _P("engine_min_size", 416, "ELoFTR engine/export: smallest canvas side the optimisation profile accepts "
       "(multiple of 32)", min=32, max=8192, group="build"),
    _P("engine_opt_size", 832, "ELoFTR engine: canvas side TensorRT tunes for (multiple of 32)", min=32, max=8192,
       group="build"),
    _P("engine_max_size", 1664, "ELoFTR engine/export: largest canvas side the optimisation profile accepts "
       "(multiple of 32)", min=32, max=8192, group="build"),
    _P("engine_max_matches", 20000, "ELoFTR engine: most coarse matches the fine graph accepts per pair "
       "(the profile's M range is 1..this)", min=1, max=1 << 22, group="build"),
    _P("timing_cache_path", "", "TensorRT timing cache file (empty = one per GPU and TensorRT version in the cache "
       "dir); makes rebuilds much faster", group="build"),
    # --- node only -----------------------------------------------------------------------------
    _P("mode", "stereo", "stereo: pair image0 with image1 by stamp; sequential: pair each image0 frame "
       "with the previous one (visual odometry)", choices=SYNC_MODES, group="node"),
    _P("approximate_sync", False, "Pair images whose stamps differ (ApproximateTime) instead of "
       "requiring equal stamps", group="node"),
    _P("approximate_sync_tolerance_seconds", 0.0, "Largest stamp difference approximate sync accepts "
       "(0 = no limit beyond the queue)", min=0.0, max=10.0, group="node"),
    _P("queue_size", 5, "Messages per input kept while waiting for a partner", min=1, max=1000, group="node"),
    _P("max_input_age", 5.0, "Drop pairs whose newest stamp is older than this many seconds when they are "
       "complete (node clock, so sim time works; 0 = never). 5 s covers transport, a CPU inference backlog and "
       "camera clocks that are not synchronised to the millisecond; a bag replayed without sim time is far older",
       min=0.0, max=3600.0, group="node"),
    _P("image_transport", "raw", "raw: subscribe sensor_msgs/Image on image0/image1; compressed: "
       "sensor_msgs/CompressedImage (jpeg/png) on image0/compressed and image1/compressed, as image_transport "
       "names them", choices=IMAGE_TRANSPORTS, group="node"),
)

PARAMS_BY_NAME: dict[str, ParamSpec] = {p.name: p for p in PARAMS}

# The hf_space preset is the web UI's stage-1 behaviour: force-resize to 640x480.
HF_SPACE_FORCE_RESIZE_WH = (640, 480)


def default(name: str) -> Any:
    """The default of one parameter (for dataclass fields that mirror PARAMS)."""
    return PARAMS_BY_NAME[name].default


def names(*groups: str) -> tuple[str, ...]:
    """The parameter names of these groups, in PARAMS order."""
    return tuple(p.name for p in PARAMS if p.group in groups)


# What a Matcher is built from (the library, every CLI command that matches, the node's rebuild trigger).
MATCHER_PARAM_NAMES = names("matcher", "engine", "build")


def defaults(group: str | None = None) -> dict[str, Any]:
    return {p.name: p.default for p in PARAMS if group is None or p.group == group}


def validate(values: dict[str, Any]) -> dict[str, Any]:
    """Validate a mapping of parameter values (unknown names are an error)."""
    out = {}
    for k, v in values.items():
        if k not in PARAMS_BY_NAME:
            raise ConfigError(f"unknown parameter {k!r}")
        out[k] = PARAMS_BY_NAME[k].validate(v)
    return out
