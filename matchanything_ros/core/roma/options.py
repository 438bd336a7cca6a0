"""How RoMa runs on CUDA: the speed choices of one matcher, as data (torch-free to import).

These are not user parameters (core/params.py): the CPU always runs the original's exact form, and on CUDA the
measured fastest form is the default. A benchmark or a test compares forms by passing another `RomaOptions` to
its matcher (`MatcherConfig(options=...)`) or to `RomaPipeline(options=...)` — nothing is set on a class or a
module, so what one matcher runs never depends on what ran before it in the process.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from ..device_wait import DEFAULT_HOST_WAIT, check_host_wait
from ..errors import ConfigError

# the GP's solve forms (gp.solve_posterior): the original's fp32 inverse, the export form, a float64 diagnostic,
# the CUDA speed form
GpSolver = Literal["inverse", "newton_schulz", "inverse_fp64", "cholesky"]
GP_SOLVERS: tuple[str, ...] = get_args(GpSolver)

# the refiner blocks' fused forms (refiner_kernel.py). "triton": each block's depthwise conv + bias + ReLU as one
# Triton kernel; "cudnn_nhwc": channels-last — cuDNN's depthwise conv, bias (+ BatchNorm) + ReLU by one Triton
# pass, the 1x1 convs as GEMMs with their bias in cuBLAS's epilogue; "inductor": torch.compile of the eager
# form; "shifted": the eager reference form (slow; tests, benchmarks)
REFINER_BLOCK_MODES = ("triton", "cudnn_nhwc", "inductor", "shifted")


@dataclass(frozen=True)
class RomaOptions:
    """One matcher's RoMa forms on CUDA (the defaults: the fastest measured, bench/results/README.md)."""

    # the GP solve (gp.GP_SOLVERS): fp32 Cholesky + triangular solves, no host sync (CUDA-graph capturable).
    # The CPU runs "inverse" (the original's); the ONNX export its own ("newton_schulz", engines/export.py)
    cuda_gp_solver: str = "cholesky"
    # the refiner blocks (REFINER_BLOCK_MODES; None: cuDNN's modules, NCHW). "cudnn_nhwc", H200, 640x480 pair:
    # fp16 79.7 -> 60.3 ms, fp32 273.5 -> 229.6 ms (IEEE fp32 still, summation order aside). fp32 keeps its
    # BatchNorms unfolded, which only "cudnn_nhwc" (or None) takes: other modes run cuDNN's modules in fp32
    refiner_blocks: str | None = "cudnn_nhwc"
    # fp16: the refiners' channels (1377/1137/569) padded with zero channels to a multiple of this, so the 1x1
    # convs run aligned GEMMs (None: unpadded)
    refiner_channel_multiple: int | None = 8
    # the refiners' local correlation gathered at whole-pixel offsets (model.local_correlation_gathered) ...
    gathered_correlation: bool = True
    # ... with its window products by the Triton kernel `window_dots` where it runs (False: gathered windows and a
    # batched GEMM, ~5 GB of windows written and re-read a pair at 864: 6.4 ms fp16, H200). Gathered form only
    fused_window_dots: bool = True
    # the torch backend's graph takes the stage-1 images and stretch-resizes them itself (device_graph.py) ...
    stage1_on_device: bool = True
    # ... each resize matrix's product by its band, one Triton kernel per axis (core/resample_kernel.py: 4-19
    # weights a value at the camera sizes, where the dense MatMuls sum whole rows: 49 GFLOP of IEEE fp32 for a
    # 1920x1080 pair); off, or without Triton: two MatMuls per image and size
    stage1_kernel: bool = True
    # the balanced sampler replayed as one CUDA graph a frame (sampling.DeviceSampler; False: eager kernels)
    capture_sampler: bool = True
    # fp32 convolutions in TF32 (torch's cuDNN default, which the original's fp32 timing ran with); off: true
    # fp32, the parity form
    fp32_cudnn_tf32: bool = False
    # how the host waits for the device (device_wait.HOST_WAITS): sleep through most of the expected time, then
    # spin on the event; "blocking": the event's own sleep, whose wake-up comes late on the GPU machines
    host_wait: str = DEFAULT_HOST_WAIT
    # the torch backend copies the camera images into its reused pinned buffers (numpy) and sends those; off (the
    # default): straight from the arrays, the driver staging them in pieces while earlier pieces travel. H100 host,
    # a 1920x1080 pair: 1.40 instead of 1.83 ms (bench/upload_paths.py), RoMa end to end 55.7-56.0 instead of 56.1-56.4
    pinned_upload: bool = False

    def __post_init__(self) -> None:
        check_host_wait(self.host_wait, type(self).__name__)
        if self.cuda_gp_solver not in GP_SOLVERS:
            raise ConfigError(f"RomaOptions.cuda_gp_solver: {self.cuda_gp_solver!r} is not one of "
                              f"{', '.join(GP_SOLVERS)}")
        if self.refiner_blocks is not None and self.refiner_blocks not in REFINER_BLOCK_MODES:
            raise ConfigError(f"RomaOptions.refiner_blocks: {self.refiner_blocks!r} is not one of "
                              f"{', '.join(REFINER_BLOCK_MODES)} or None (cuDNN's modules)")
        multiple = self.refiner_channel_multiple
        if multiple is not None and (isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1):
            raise ConfigError(f"RomaOptions.refiner_channel_multiple: {multiple!r} is not a positive integer or None")
