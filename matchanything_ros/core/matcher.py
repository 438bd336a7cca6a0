"""The library facade: `Matcher(MatcherConfig(...)).match(image0, image1) -> MatchResult`.

Images are numpy arrays as `images.to_rgb_u8` accepts them; keypoints come back in original-image
pixels. The same object is what the ROS node and the CLI use.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
# the bundled model's names, also importable from here (the library's public names)
from .bundled import DATA_DIR, DEMO_MODEL_NOTICE, resolve_eloftr_checkpoint  # noqa: F401
from .errors import CheckpointError, ConfigError
from .images import to_rgb_u8
from .params import MATCHER_PARAM_NAMES, PARAMS_BY_NAME, default
from .result import MatchResult
from .variants import pipeline_class

# settings of the geometric verification, which runs on the matches after the graphs (changed in place)
GEOMETRY_PARAM_NAMES = frozenset({"geometry", "geometry_threshold_px", "geometry_confidence",
                                  "geometry_max_iterations", "geometry_usac_matches",
                                  "publish_inliers_only"})


@dataclass(frozen=True)
class MatcherConfig:
    """Every `matcher`/`engine` parameter of core/params.py (defaults from there), validated."""

    variant: str = default("variant")
    checkpoint_path: str = default("checkpoint_path")
    dinov2_path: str = default("dinov2_path")
    backend: str = default("backend")
    device: str = default("device")
    precision: str = default("precision")
    threshold: float = default("threshold")
    preset: str = default("preset")
    resize_max: int = default("resize_max")
    force_resize_width: int = default("force_resize_width")
    force_resize_height: int = default("force_resize_height")
    coarse_res: int = default("coarse_res")
    upsample_res: int = default("upsample_res")
    sample_mode: str = default("sample_mode")
    sample_seed: int = default("sample_seed")
    num_samples: int = default("num_samples")
    roma_webui_resize: bool = default("roma_webui_resize")
    geometry: str = default("geometry")
    geometry_threshold_px: float = default("geometry_threshold_px")
    geometry_confidence: float = default("geometry_confidence")
    geometry_max_iterations: int = default("geometry_max_iterations")
    geometry_usac_matches: int = default("geometry_usac_matches")
    publish_inliers_only: bool = default("publish_inliers_only")
    model_file_path: str = default("model_file_path")
    engine_file_path: str = default("engine_file_path")
    force_engine_update: bool = default("force_engine_update")
    max_workspace_size: int = default("max_workspace_size")
    engine_min_size: int = default("engine_min_size")
    engine_opt_size: int = default("engine_opt_size")
    engine_max_size: int = default("engine_max_size")
    engine_max_matches: int = default("engine_max_matches")
    timing_cache_path: str = default("timing_cache_path")
    # how the variant runs (eloftr.options.EloftrOptions, roma.options.RomaOptions; None: its defaults): speed
    # forms, not a parameter
    options: Any = dataclasses.field(default=None, compare=True)

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name in PARAMS_BY_NAME:
                object.__setattr__(self, f.name, PARAMS_BY_NAME[f.name].validate(getattr(self, f.name)))
        if (self.force_resize_width == 0) != (self.force_resize_height == 0):
            raise ConfigError("force_resize_width and force_resize_height must both be set (or both 0)")
        if self.options is not None:
            expected = options_type(self.variant)
            if not isinstance(self.options, expected):
                raise ConfigError(f"options for variant {self.variant} must be {expected.__name__} (or None), "
                                  f"got {type(self.options).__name__}")

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "MatcherConfig":
        """From a parameter mapping; node-only parameters are ignored, unknown names are an error."""
        names = {f.name for f in fields(cls)}
        for k in params:
            if k not in PARAMS_BY_NAME:
                raise ConfigError(f"unknown parameter {k!r}")
        return cls(**{k: v for k, v in params.items() if k in names})

    def to_params(self) -> dict[str, Any]:
        """The parameter values (core/params.py names; not `options`)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in PARAMS_BY_NAME}


def options_type(variant: str) -> type:
    """The options class of `variant` (MatcherConfig.options)."""
    if variant == "eloftr":
        from .eloftr.options import EloftrOptions

        return EloftrOptions
    from .roma.options import RomaOptions

    return RomaOptions


def matcher_param_names() -> set[str]:
    """Names of the parameters MatcherConfig must hold (test/test_cli_match.py checks they agree)."""
    return set(MATCHER_PARAM_NAMES)


def run_pipeline(pipeline: Any, backend: Any, image0: np.ndarray, image1: np.ndarray) -> MatchResult:
    """Images -> preprocess -> the backend's graphs -> postprocess, with per-stage timings (ms)."""
    t0 = time.perf_counter()
    inputs, meta = pipeline.preprocess(to_rgb_u8(image0), to_rgb_u8(image1))
    t1 = time.perf_counter()
    outputs = pipeline.infer(backend, inputs, meta)
    t2 = time.perf_counter()
    result = pipeline.postprocess(outputs, meta)
    t3 = time.perf_counter()
    result.timings_ms = {"preprocess": (t1 - t0) * 1e3, "inference": (t2 - t1) * 1e3, "postprocess": (t3 - t2) * 1e3}
    return result


class Matcher:
    def __init__(self, config: MatcherConfig | None = None) -> None:
        from .backends.factory import choose_backend

        self.config = config or MatcherConfig()
        params = self.config.to_params()
        self.is_demo_model = False
        cls = pipeline_class(self.config.variant)
        if self.config.variant == "eloftr":
            path, model_config, self.is_demo_model = resolve_eloftr_checkpoint(self.config.checkpoint_path)
            params["checkpoint_path"] = str(path)
            self.pipeline = cls(params, model_config, options=self.config.options)
        else:
            if not self.config.checkpoint_path:
                raise CheckpointError(f"variant {self.config.variant} needs checkpoint_path (no bundled demo model)")
            self.pipeline = cls(params, options=self.config.options)
        self.checkpoint = params["checkpoint_path"]
        if not Path(self.checkpoint).is_file():
            raise CheckpointError(f"checkpoint file not found: {self.checkpoint}")
        self._sha256: str | None = None
        self._torch_verifier: Any = None  # geometry_torch.TorchVerifier, made on first use (CUDA + torch only)
        choice = choose_backend(params, self.pipeline)
        self.backend = choice.backend
        self.tensorrt_skipped = choice.tensorrt_skipped  # why backend=auto did not take TensorRT

    def match(self, image0: np.ndarray, image1: np.ndarray, K0: np.ndarray | None = None,
              K1: np.ndarray | None = None) -> MatchResult:
        """Match the pair; with `geometry` set, verify the matches too (K0/K1: 3x3 intrinsics of image0/image1,
        needed by `essential` only; without them the result says so, with no model)."""
        result = run_pipeline(self.pipeline, self.backend, image0, image1)
        if self.config.geometry != "none":
            result = self.verify(result, K0, K1)
        return result

    def verify(self, result: MatchResult, K0: np.ndarray | None = None, K1: np.ndarray | None = None) -> MatchResult:
        """Geometric verification of `result` (result.geometry, timings_ms["verify"]); with publish_inliers_only,
        the result keeps only the inliers. On CUDA with the torch backend the batched torch verifier runs on
        the device; elsewhere OpenCV's USAC MAGSAC on the host."""
        from .geometry import GeometryOptions, verify

        c = self.config
        options = GeometryOptions(c.geometry, c.geometry_threshold_px, c.geometry_confidence,
                                  c.geometry_max_iterations, c.geometry_usac_matches, K0=K0, K1=K1)
        t0 = time.perf_counter()
        if self.backend.name == "torch" and str(self.backend.device).startswith("cuda"):
            if self._torch_verifier is None:
                from .geometry_torch import TorchVerifier, hypotheses_for

                self._torch_verifier = TorchVerifier(self.backend.device, hypotheses_for(c.geometry_max_iterations))
            result.geometry = self._torch_verifier.verify(result.keypoints0, result.keypoints1, options)
        else:
            result.geometry = verify(result.keypoints0, result.keypoints1, options)
        result.timings_ms["verify"] = (time.perf_counter() - t0) * 1e3
        return result.only_inliers() if c.publish_inliers_only else result

    def update(self, config: MatcherConfig) -> bool:
        """Take `config` in place when it differs from this matcher's only in settings the running graphs take
        as inputs (today: the ELoFTR threshold; no recompile, no re-capture, no reload) -> True. False: a
        matcher must be built for it (the caller does; this one is unchanged)."""
        if config.options != self.config.options:
            return False  # other forms of the network
        changed = {k for k, v in config.to_params().items() if getattr(self.config, k) != v}
        if not changed:
            return True
        if changed <= GEOMETRY_PARAM_NAMES:  # verification runs after the graphs: nothing to rebuild
            if "geometry_max_iterations" in changed:  # the verifier's batch size; the rest are inputs of its fits
                self._torch_verifier = None
            self.config = config
            return True
        if changed != {"threshold"}:
            return False
        if not self.pipeline.set_threshold(config.threshold, getattr(self.backend, "graphs", {})):
            return False
        self.config = config
        return True

    @property
    def info(self) -> dict[str, Any]:
        from .engines.cache import sha256_file

        if self._sha256 is None:
            self._sha256 = sha256_file(self.checkpoint)
        c = self.config
        # the ONNX models / TensorRT engines in use, one per graph (the torch backend runs no file)
        engine_file = ", ".join(f"{graph}={path}" for graph, path in getattr(self.backend, "files", {}).items())
        return {
            "variant": c.variant, "backend": self.backend.name, "device": self.backend.device,
            "precision": self.backend.precision, "checkpoint": self.checkpoint, "checkpoint_sha256": self._sha256,
            "engine_file": engine_file, "is_demo_model": self.is_demo_model,
            "preset": c.preset, "resize_max": c.resize_max, "force_resize_width": c.force_resize_width,
            "force_resize_height": c.force_resize_height, "coarse_res": c.coarse_res,
            "upsample_res": c.upsample_res, "threshold": c.threshold, "package_version": __version__,
            "tensorrt_skipped": self.tensorrt_skipped,
            # torch.compile parts that run uncompiled (slower: a compiler failure or its recompile limit)
            "compile_fallbacks": "; ".join(self._compile_fallbacks()),
        }

    def _compile_fallbacks(self) -> list[str]:
        from .compiled import compile_fallbacks  # torch backend only: other backends hold no modules

        graphs = getattr(self.backend, "graphs", None)
        fallbacks = [f for g in graphs.values() for f in compile_fallbacks(g)] if isinstance(graphs, dict) else []
        verifier_fallback = getattr(self._torch_verifier, "compile_fallback", "")  # the CUDA geometric verifier
        return fallbacks + ([verifier_fallback] if verifier_fallback else [])

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Matcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
