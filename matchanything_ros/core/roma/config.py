"""RoMa settings: the user-facing ones come from `core/params.py`; the rest are the model's constants."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..params import HF_SPACE_FORCE_RESIZE_WH, PARAMS_BY_NAME, default

# Constants of the released model (MatchAnything `default.py` / RoMa `roma_outdoor.py`), not settings.
DINOV2_PATCH = 14
DINOV2_DIM = 1024
SAMPLE_THRESH = 0.05  # SAMPLE.THRESH: certainties above it count as 1 in the balanced sampler
KDE_STD = 0.1
BALANCED_EXPANSION = 4  # stage 1 draws 4 x num_samples candidates
WEBUI_RESIZE_MAX = 832  # web UI `resize_max` applied before the 640x480 force-resize
WEBUI_SIZE_WH = HF_SPACE_FORCE_RESIZE_WH


@dataclass(frozen=True)
class RomaConfig:
    coarse_res: int = default("coarse_res")
    upsample_res: int = default("upsample_res")
    sample_mode: str = default("sample_mode")
    sample_seed: int = default("sample_seed")
    num_samples: int = default("num_samples")
    webui_resize: bool = default("roma_webui_resize")

    def __post_init__(self) -> None:
        for name, value in (("coarse_res", self.coarse_res), ("upsample_res", self.upsample_res),
                            ("sample_mode", self.sample_mode), ("sample_seed", self.sample_seed),
                            ("num_samples", self.num_samples)):
            PARAMS_BY_NAME[name].validate(value)
        # DINOv2's patch embedding needs multiples of 14, the VGG pyramid multiples of 8
        if self.coarse_res % DINOV2_PATCH or self.coarse_res % 8:
            raise ConfigError(f"coarse_res: {self.coarse_res} must be a multiple of 14 and of 8 (e.g. 560)")
        if self.upsample_res % 8:
            raise ConfigError(f"upsample_res: {self.upsample_res} must be a multiple of 8 (e.g. 864)")

    @classmethod
    def from_params(cls, values: dict[str, Any]) -> "RomaConfig":
        """Build from a `core.params` mapping (unrelated keys are ignored)."""
        return cls(
            coarse_res=int(values.get("coarse_res", default("coarse_res"))),
            upsample_res=int(values.get("upsample_res", default("upsample_res"))),
            sample_mode=str(values.get("sample_mode", default("sample_mode"))),
            sample_seed=int(values.get("sample_seed", default("sample_seed"))),
            num_samples=int(values.get("num_samples", default("num_samples"))),
            webui_resize=bool(values.get("roma_webui_resize", default("roma_webui_resize"))),
        )
