"""The one small interface every inference backend implements.

A variant's network is split into named graphs with fixed-shape outputs (ELoFTR: "coarse"
then "fine"; RoMa: "dense"). Pre- and post-processing are shared numpy code outside the
backends; a backend only runs graphs: named numpy arrays in, named numpy arrays out, except the
outputs a pipeline names in `device_outputs` (the next graph's inputs), which a backend on a device
hands back as its own device object (torch tensor, OrtValue, DeviceTensor) for that next graph.

Implemented by `torch_backend.TorchBackend` (beside this file: it runs the model code) and by the two
runtimes of exported files in core/engines/: `onnxruntime_backend.OnnxRuntimeBackend` and
`tensorrt_backend.TensorRTBackend`.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Backend(Protocol):
    name: str  # "torch" | "onnxruntime" | "tensorrt"
    device: str  # what actually runs, e.g. "cpu", "cuda:0", "CUDAExecutionProvider"
    precision: str  # "fp32" | "fp16"

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one named graph of the variant's network."""
        ...

    def close(self) -> None:
        """Free every resource (GPU memory, sessions, streams). Idempotent."""
        ...
