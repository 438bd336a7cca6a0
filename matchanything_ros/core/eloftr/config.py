"""ELoFTR model configuration: every size the network uses, with the released model as default.

The defaults are the configuration the official HF-space code builds for `matchanything_eloftr`
(docs/eloftr.md, "Model configuration in effect"). A reduced model (e.g. the bundled demo) is the same code with other
values; nothing in `model.py` hardcodes a size.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class EloftrConfig:
    # --- RepVGG backbone (training-time multi-branch form as released) --------------------
    block_dims: tuple[int, int, int] = (64, 128, 256)  # channels of layer1 (1/2), layer2 (1/4), layer3 (1/8)
    layer_depths: tuple[int, int, int] = (2, 4, 14)  # RepVGG blocks in layer1, layer2, layer3 (layer0 is 1 block)
    # --- coarse transformer ------------------------------------------------------------------
    d_model: int = 256  # must equal block_dims[2]
    nhead: int = 8
    layer_names: tuple[str, ...] = ("self", "cross") * 4
    agg_size0: int = 4  # depth-wise conv aggregation of queries (kernel = stride)
    agg_size1: int = 4  # max-pool of keys/values
    mlp_leaky_slope: float = 0.01
    rope: bool = True  # RoPE on self layers only
    rope_max_grid: int = 256  # pooled (1/32) grid cells per side the RoPE table covers (8192 px)
    rope_fp16_tables: bool = True  # the original rounds its sin/cos tables to float16
    npe: tuple[int, int, int, int] = (832, 832, 832, 832)  # train_H, train_W, test_H, test_W (RoPE scaling)
    # --- coarse matching -----------------------------------------------------------------------
    coarse_stride: int = 8  # pixels per coarse cell (canvas / coarse grid)
    dsmax_temperature: float = 0.1
    border_rm: int = 2
    candidates_per_cell: int = 9  # K of the static top-K coarse graph; exact for thresholds >= 1/(K+1)
    # --- fine level ------------------------------------------------------------------------------
    fine_d_model: int = 64  # must equal block_dims[0]
    fine_window_size: int = 8  # image0 window (= coarse_stride); image1 gets a 1-px ring (10x10)
    fine_regress_dim: int = 8  # last channels used for sub-pixel regression (the 56/8 split)
    fine_regress_temperature: float = 10.0
    fpn_leaky_slope: float = 0.01
    bn_eps: float = 1e-5
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # free-form notes (e.g. demo training info)

    def __post_init__(self) -> None:
        if self.d_model != self.block_dims[2]:
            raise ConfigError(f"d_model ({self.d_model}) must equal block_dims[2] ({self.block_dims[2]})")
        if self.fine_d_model != self.block_dims[0]:
            raise ConfigError(f"fine_d_model ({self.fine_d_model}) must equal block_dims[0] ({self.block_dims[0]})")
        if self.d_model % self.nhead:
            raise ConfigError(f"d_model ({self.d_model}) is not divisible by nhead ({self.nhead})")
        if self.rope and self.d_model % 4:
            raise ConfigError("RoPE needs d_model divisible by 4")
        if not 0 < self.fine_regress_dim < self.fine_d_model:
            raise ConfigError("fine_regress_dim must be between 1 and fine_d_model - 1")
        if self.fine_window_size != self.coarse_stride:
            raise ConfigError("fine_window_size must equal coarse_stride (inner-window fine matching)")
        if any(n not in ("self", "cross") for n in self.layer_names):
            raise ConfigError(f"layer_names may only hold 'self'/'cross', got {self.layer_names}")
        if self.candidates_per_cell < 1:
            raise ConfigError("candidates_per_cell must be >= 1")

    @property
    def canvas_multiple(self) -> int:
        """Canvas sides must be multiples of this (coarse stride x aggregation size)."""
        return self.coarse_stride * max(self.agg_size0, self.agg_size1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "EloftrConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown EloftrConfig fields: {', '.join(unknown)}")
        kw: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()}
        return cls(**kw)

    @classmethod
    def from_json(cls, path: str | Path) -> "EloftrConfig":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read ELoFTR config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"ELoFTR config {path} must hold a JSON object")
        return cls.from_dict(data)
