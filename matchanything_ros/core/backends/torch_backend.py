"""PyTorch backend: CPU fp32; CUDA fp32/fp16 on a dedicated stream.

fp16 = autocast: convolutions/matmuls in half, while the graphs themselves keep the dual softmax,
similarities and fine-level matching in float32 (they cast explicitly).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any

import numpy as np
import torch

from ..errors import BackendUnavailableError, ConfigError


def graph_input_names(module: torch.nn.Module) -> list[str]:
    """A graph's input names: its `input_names` attribute, else its forward() parameters."""
    names = getattr(module, "input_names", None)
    if names is None:
        names = [p for p in inspect.signature(module.forward).parameters]
    return list(names)


class TorchBackend:
    name = "torch"

    def __init__(self, graphs: dict[str, torch.nn.Module], device: str = "cpu", precision: str = "fp32") -> None:
        if precision not in ("fp32", "fp16"):
            raise ConfigError(f"precision must be fp32 or fp16, got {precision!r}")
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError("device cuda requested but torch finds no CUDA GPU")
        if dev.type == "cpu" and precision == "fp16":
            raise BackendUnavailableError("fp16 needs CUDA; use precision fp32 on the CPU")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.type == "cuda" and precision == "fp32":
            # fp32 means fp32: no TF32 in convolutions/matmuls (process-wide torch switches)
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        if dev.type == "cuda" and precision == "fp16":
            torch.backends.cudnn.benchmark = True  # canvases are fixed per camera: pick the fastest kernels
        self.torch_device = dev
        self.device = str(dev)
        self.precision = precision
        self.graphs = {k: g.to(dev).eval() for k, g in graphs.items()}
        self.stream = torch.cuda.Stream(device=dev) if dev.type == "cuda" else None
        self.keep_on_device: set[str] = set()  # outputs returned as device tensors (fed to a later graph)
        self._closed = False

    def _to_tensor(self, value: Any) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value.to(self.torch_device, non_blocking=True)
        return torch.from_numpy(np.ascontiguousarray(value)).to(self.torch_device, non_blocking=True)

    def run(self, graph: str, inputs: dict[str, Any]) -> dict[str, Any]:
        if self._closed:
            raise BackendUnavailableError("torch backend is closed")
        module = self.graphs[graph]
        names = graph_input_names(module)
        stream_ctx = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        autocast = (torch.autocast("cuda", dtype=torch.float16) if self.precision == "fp16"
                    else contextlib.nullcontext())
        with torch.inference_mode(), stream_ctx, autocast:
            args = [self._to_tensor(inputs[n]) for n in names]
            outs = module(*args)
        if self.stream is not None:
            self.stream.synchronize()
        if isinstance(outs, dict):
            items = list(outs.items())
        else:
            outs = (outs,) if isinstance(outs, torch.Tensor) else outs
            items = list(zip(getattr(module, "output_names"), outs))
        result: dict[str, Any] = {}
        for n, t in items:
            if n in self.keep_on_device:
                result[n] = t
            else:
                t = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
                result[n] = t.cpu().numpy()
        return result

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.graphs.clear()
        self.stream = None
        if self.torch_device.type == "cuda":
            torch.cuda.empty_cache()
