"""Variant registry: the name a user gives (`eloftr`, `roma`) -> the pipeline that implements it.

A pipeline owns what is specific to a variant and shared by every backend: preprocessing,
the order of its network graphs and the host-side selection between them, post-processing
to original-image pixels, and (for the torch backend and ONNX export) the torch modules of
its graphs. Backends only run graphs.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .errors import ConfigError
from .result import MatchResult

if TYPE_CHECKING:
    from .backends.base import Backend

# variant name -> "module:class" of its pipeline (imported lazily: torch is optional)
PIPELINES = {
    "eloftr": "matchanything_ros.core.eloftr.pipeline:EloftrPipeline",
    "roma": "matchanything_ros.core.roma.pipeline:RomaPipeline",
}


class VariantPipeline(Protocol):
    name: str
    graphs: tuple[str, ...]  # graph names in execution order
    options: Any  # the variant's speed forms (EloftrOptions, RomaOptions): data, never a parameter
    product_graph: str | None  # a one-graph export that runs instead of `graphs` (bound by the backend factory)

    def load_weights(self, params: dict[str, Any]) -> dict[str, Any]:
        """The state dict of the files `params` names (checkpoint_path; RoMa also dinov2_path)."""
        ...

    def torch_graphs(self, state_dict: dict[str, Any], device: str = "cpu", *, precision: str = "fp32"
                     ) -> dict[str, Any]:
        """The torch modules of the graphs on `device` (the torch backend runs them)."""
        ...

    def bind_graphs(self, graphs: dict[str, Any]) -> None:
        """Fix, once, which inputs preprocess makes: those of the torch graphs the backend was built with."""
        ...

    def set_threshold(self, threshold: float, graphs: dict[str, Any]) -> bool:
        """Take a new threshold in place (True), or say a new matcher is needed (False)."""
        ...

    @property
    def device_outputs(self) -> frozenset[str]:
        """Graph outputs the torch backend keeps on the device (consumed by the next graph or step)."""
        ...

    def preprocess(self, image0: np.ndarray, image1: np.ndarray) -> tuple[dict[str, np.ndarray], Any]:
        """RGB uint8 images -> inputs of the first graph, plus meta for post-processing."""
        ...

    def infer(self, backend: "Backend", inputs: dict[str, np.ndarray], meta: Any) -> dict[str, np.ndarray]:
        """Run the graphs in order on `backend` with the host-side selection between them."""
        ...

    def postprocess(self, outputs: dict[str, np.ndarray], meta: Any) -> MatchResult:
        ...


def pipeline_class(variant: str) -> Any:
    try:
        target = PIPELINES[variant]
    except KeyError:
        raise ConfigError(f"unknown variant {variant!r}; choose one of {', '.join(PIPELINES)}") from None
    module_name, cls_name = target.split(":")
    return getattr(importlib.import_module(module_name), cls_name)
