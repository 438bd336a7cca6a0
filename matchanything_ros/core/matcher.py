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
from .errors import CheckpointError, ConfigError
from .images import to_rgb_u8
from .params import MATCHER_PARAM_NAMES, PARAMS_BY_NAME, default
from .result import MatchResult
from .variants import pipeline_class

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEMO_ELOFTR_WEIGHTS = DATA_DIR / "demo_eloftr.safetensors"
DEMO_ELOFTR_CONFIG = DATA_DIR / "demo_eloftr.json"
# said by every output (CLI, PNG, node log, debug image) made with the bundled demo model
DEMO_MODEL_NOTICE = "demo model (not MatchAnything's weights)"


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
    model_file_path: str = default("model_file_path")
    engine_file_path: str = default("engine_file_path")
    force_engine_update: bool = default("force_engine_update")
    max_workspace_size: int = default("max_workspace_size")
    engine_min_size: int = default("engine_min_size")
    engine_opt_size: int = default("engine_opt_size")
    engine_max_size: int = default("engine_max_size")
    engine_max_matches: int = default("engine_max_matches")
    timing_cache_path: str = default("timing_cache_path")

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, PARAMS_BY_NAME[f.name].validate(getattr(self, f.name)))
        if (self.force_resize_width == 0) != (self.force_resize_height == 0):
            raise ConfigError("force_resize_width and force_resize_height must both be set (or both 0)")

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "MatcherConfig":
        """From a parameter mapping; node-only parameters are ignored, unknown names are an error."""
        names = {f.name for f in fields(cls)}
        for k in params:
            if k not in PARAMS_BY_NAME:
                raise ConfigError(f"unknown parameter {k!r}")
        return cls(**{k: v for k, v in params.items() if k in names})

    def to_params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def matcher_param_names() -> set[str]:
    """Names of the parameters MatcherConfig must hold (test/test_cli_match.py checks they agree)."""
    return set(MATCHER_PARAM_NAMES)


def resolve_eloftr_checkpoint(checkpoint_path: str) -> tuple[Path, Any, bool]:
    """-> (weights path, EloftrConfig, is_demo). Empty path = the bundled demo model.

    A `<name>.json` beside the weights holds EloftrConfig fields (a reduced model); without it the
    released model's configuration is used.
    """
    from .eloftr.config import EloftrConfig

    if not checkpoint_path:
        if not DEMO_ELOFTR_WEIGHTS.is_file() or not DEMO_ELOFTR_CONFIG.is_file():
            raise CheckpointError(
                f"no checkpoint_path given and the bundled demo model is missing ({DEMO_ELOFTR_WEIGHTS}, "
                f"{DEMO_ELOFTR_CONFIG.name}); pass the released matchanything_eloftr.ckpt"
            )
        return DEMO_ELOFTR_WEIGHTS, EloftrConfig.from_json(DEMO_ELOFTR_CONFIG), True
    path = Path(checkpoint_path).expanduser()
    sidecar = path.with_suffix(".json")
    cfg = EloftrConfig.from_json(sidecar) if sidecar.is_file() else EloftrConfig()
    is_demo = path.resolve() == DEMO_ELOFTR_WEIGHTS.resolve()
    return path, cfg, is_demo


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
            self.pipeline = cls(params, model_config)
        else:
            if not self.config.checkpoint_path:
                raise CheckpointError(f"variant {self.config.variant} needs checkpoint_path (no bundled demo model)")
            self.pipeline = cls(params)
        self.checkpoint = params["checkpoint_path"]
        if not Path(self.checkpoint).is_file():
            raise CheckpointError(f"checkpoint file not found: {self.checkpoint}")
        self._sha256: str | None = None
        choice = choose_backend(params, self.pipeline)
        self.backend = choice.backend
        self.tensorrt_skipped = choice.tensorrt_skipped  # why backend=auto did not take TensorRT

    def match(self, image0: np.ndarray, image1: np.ndarray) -> MatchResult:
        return run_pipeline(self.pipeline, self.backend, image0, image1)

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
        }

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Matcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
