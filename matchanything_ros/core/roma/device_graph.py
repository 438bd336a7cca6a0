"""The "dense" graph fed with stage-1 images: the stretch-resize runs on the device.

torchvision's antialiased bicubic resize is linear and separable, so each image's coarse and fine inputs are
`Wh @ X @ Ww^T` per channel with fixed matrices (`preprocess.resize_matrix`, built from the same taps as the
bit-exact numpy path, once per input size). The host only hands over the uint8 image (0.9 MB at 640x480)
instead of resizing 4 images in numpy (~270 ms). On CUDA with Triton each product runs as the matrix's band
(`band_of`, `core/resample_kernel.py`: each output value sums the 4-19 non-zero weights of its row at the
camera sizes) — the dense MatMuls sum every row in full, 49 GFLOP in IEEE fp32 for a 1920x1080 pair; elsewhere
(the CPU, ONNX/TensorRT export, torch without Triton) they are two MatMuls per image and size. Either deviates
from the numpy path by float32 summation order only (bounded in test/test_roma_device_resize.py and
test_gpu.py); the numpy path stays the exact one (CPU parity).

The graph has fixed shapes per input size (`capture_key`), so the torch backend captures it whole
in a CUDA graph. cuDNN/TF32 settings it needs are set for its own forward only and restored after.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from ..kernels import resample_kernel
from .model import RomaNet
from .config import WEBUI_SIZE_WH
from .preprocess import resize_matrix, webui_matrices


# GPU memory (GiB) the fp32 graph's warm-up may take beyond what the process holds (the torch backend's bound,
# `warmup_headroom_gib`): cuDNN's autotuning (on for fp32) tries algorithms with whatever workspace the allocator
# grants, and with the backend's default bound (6 GiB) a process's first fp32 frame peaked at 6.8 GB (H200).
# None: the backend's default.
FP32_WARMUP_HEADROOM_GIB: float | None = 2.0


@contextlib.contextmanager
def fp32_math(cudnn_benchmark: bool, cudnn_tf32: bool = False) -> Iterator[None]:
    """True fp32 (no TF32; convolutions in TF32 where `cudnn_tf32`, RomaOptions.fp32_cudnn_tf32) in matmuls and
    convolutions, and cuDNN autotuning as asked, for one forward.

    The previous process-wide values are restored on exit: a RoMa matcher leaves no switch behind,
    and one made earlier (e.g. an fp16 one with autotuning) cannot change this one's numbers or memory."""
    saved_matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, benchmark=cudnn_benchmark, deterministic=False,
                                        allow_tf32=cudnn_tf32):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_matmul


def band_of(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A resize matrix W [n_out, n_in] as its band: (index int32 [n_out, T], weight float32 [n_out, T]) with
    W[k, index[k, t]] = weight[k, t] over each row's span from its first to its last non-zero, T the widest
    span. Past a row's span the index stays on its last column with weight 0 (an exact +0 in the sum)."""
    w = np.asarray(matrix, np.float32)
    nonzero = w != 0
    rows = np.arange(w.shape[0])
    first = nonzero.argmax(axis=1)
    last = w.shape[1] - 1 - nonzero[:, ::-1].argmax(axis=1)  # an all-zero row: first = 0, last = n_in - 1
    taps = int((last - first).max()) + 1
    index = first[:, None] + np.arange(taps)[None, :]
    inside = index <= last[:, None]
    index = np.minimum(index, last[:, None])
    weight = np.where(inside, w[rows[:, None], index], np.float32(0)).astype(np.float32)
    return index.astype(np.int32), weight


class StretchResize(nn.Module):
    """Stage-1 image [1, H, W, 3] (uint8 or float32, 0..255) -> [1, 3, S, S] float32 in [0, 1] per size S.
    `webui`: the input is the camera image and the web UI's stage (to 640x480, `preprocess.webui_matrices`)
    is composed into the same two matrices: the host does no per-pixel work at any camera size. `banded`: on
    CUDA where Triton is, each matrix product by the resample kernel over the matrix's band (RomaOptions.
    stage1_kernel); else, and always on the CPU, two MatMuls."""

    def __init__(self, sizes: tuple[int, ...], webui: bool = False, banded: bool = False) -> None:
        super().__init__()
        self.sizes = sizes
        self.webui = webui
        self.banded = banded
        # (device, H, W, S) -> (Wh [S, H], Ww^T [W, S]), or for the banded form (index, weight of Wh, index,
        # weight of Ww); plain tensors, made on first use of a size (the torch backend's eager warm-up) so a
        # CUDA-graph capture never copies from the host
        self._weights: dict[tuple[str, int, int, int, bool], tuple[torch.Tensor, ...]] = {}

    def matrices(self, h: int, w: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(Wh [S, H], Ww [S, W]) float32 for an H x W stage-1 image and output size S."""
        if self.webui and (int(w), int(h)) != WEBUI_SIZE_WH:
            ry, rx = webui_matrices(int(w), int(h))  # float64: composed before the one rounding to float32
            return ((resize_matrix(WEBUI_SIZE_WH[1], int(size)).astype(np.float64) @ ry).astype(np.float32),
                    (resize_matrix(WEBUI_SIZE_WH[0], int(size)).astype(np.float64) @ rx).astype(np.float32))
        return resize_matrix(int(h), int(size)), resize_matrix(int(w), int(size))

    def weights(self, h: int, w: int, size: int, device: torch.device, banded: bool = False
                ) -> tuple[torch.Tensor, ...]:
        key = (str(device), int(h), int(w), int(size), banded)
        found = self._weights.get(key)
        if found is None:
            if len(self._weights) >= 16:  # images of ever new sizes (no web-UI stage): bound the memory
                self._weights.clear()
            wh_np, ww_np = self.matrices(h, w, size)
            if banded:
                found = tuple(torch.from_numpy(a).to(device) for a in (*band_of(wh_np), *band_of(ww_np)))
            else:
                found = (torch.from_numpy(wh_np).to(device), torch.from_numpy(np.ascontiguousarray(ww_np.T)).to(device))
            self._weights[key] = found
        return found

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        _, h, w, _ = image.shape
        kernel = resample_kernel() if self.banded and image.is_cuda else None
        if kernel is not None:
            x = image.contiguous()
            out = []
            for size in self.sizes:
                index_h, weight_h, index_w, weight_w = self.weights(h, w, size, image.device, banded=True)
                # width pass (each value / 255 first, as the MatMul form's input), then height pass; fused
                # multiply-adds in tap order: [1, H, W, 3] -> [1, H, S, 3] -> [1, S, S, 3]
                y = kernel.resample(x, index_w, weight_w, 2, fma=True, divide_first=True)
                y = kernel.resample(y, index_h, weight_h, 1, fma=True)
                out.append(y.permute(0, 3, 1, 2))
            return out
        x = image.squeeze(0).permute(2, 0, 1).float() / 255.0  # [3, H, W], as the numpy path's / 255.0 in float32
        out = []
        for size in self.sizes:
            wh, wwt = self.weights(h, w, size, image.device)
            out.append((wh @ (x @ wwt))[None])  # width pass, then height pass, as the numpy path
        return out


class RomaImageGraph(nn.Module):
    """The "dense" graph with the stretch inside: image0, image1 [1, H, W, 3] (uint8 or float32 0..255,
    the stage-1 images) -> warp [1, u, 2u, 4], certainty [1, u, 2u]. Runs in the weights' own dtype
    (pure fp16 for half weights: autocast is switched off inside, the GP and output convs cast to fp32
    themselves)."""

    input_names = ("image0", "image1")
    output_names = ("warp", "certainty")

    def __init__(self, net: RomaNet, coarse_res: int, upsample_res: int, cudnn_benchmark: bool = False,
                 warmup_headroom_gib: float | None = None, webui: bool = False, cudnn_tf32: bool = False,
                 banded_resize: bool = False) -> None:
        super().__init__()
        self.net = net
        self.stretch = StretchResize((coarse_res, upsample_res), webui, banded_resize)
        self.cudnn_benchmark = cudnn_benchmark
        self.cudnn_tf32 = cudnn_tf32
        self.warmup_headroom_gib = warmup_headroom_gib  # read by the torch backend's capture

    def forward(self, image0: torch.Tensor, image1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(image0.device.type, enabled=False), fp32_math(self.cudnn_benchmark, self.cudnn_tf32):
            coarse0, fine0 = self.stretch(image0)
            coarse1, fine1 = self.stretch(image1)
            return self.net(coarse0, coarse1, fine0, fine1)

    # --- torch backend: CUDA-graph capture ----------------------------------------------------------
    def capture_key(self, inputs: dict[str, Any]) -> tuple[Any, ...]:
        """Shapes and dtypes fix every kernel of this graph: one capture per camera size."""
        return tuple((n, tuple(inputs[n].shape), str(inputs[n].dtype)) for n in self.input_names)

    def static_crop(self, inputs: dict[str, Any]) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # nothing data-dependent to fix for the capture
