"""How ELoFTR runs: the speed choices of one matcher, as data (torch-free).

These are not user parameters (core/params.py): every choice gives the original's matches on the CPU, and
on CUDA the measured fastest form is the default. A benchmark or a test compares forms by passing another
`EloftrOptions` to its matcher (`MatcherConfig(options=...)`) — nothing is set on a class or a module, so
what one matcher runs never depends on what ran before it in the process.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..device_wait import DEFAULT_HOST_WAIT, check_host_wait
from ..errors import ConfigError

# matching heads of the product graph: the original's dual softmax + top-K (exact on the CPU; the export's);
# its log-sum-exp form + top-K, eager or compiled; the log-sum-exp form as a mask + fixed-size nonzero
PRODUCT_HEADS = ("dsmax", "lse", "lse_compiled", "lse_nonzero")
FINE_FORMS = ("exact", "fast", "fast_compiled")
COMPILED_PARTS = ("none", "features")
# fp16: the parts kept in fp32 (weights and arithmetic), for the fine level's argmax
FP32_ISLANDS: dict[str, tuple[str, ...]] = {
    "none": (),
    "fpn": ("fine_preprocess",),
    "fpn_backbone12": ("fine_preprocess", "backbone.layer0", "backbone.layer1", "backbone.layer2"),
    "fpn_backbone": ("fine_preprocess", "backbone.layer0", "backbone.layer1", "backbone.layer2", "backbone.layer3"),
}


@dataclass(frozen=True)
class EloftrOptions:
    """One matcher's ELoFTR forms (the defaults: the fastest measured, bench/results/README.md)."""

    # torch on CUDA runs the whole frame as one graph (product.EloftrProduct); off: the host path
    product_graph: bool = True
    # its matching head: the log-space mask + fixed-size nonzero (exact at every threshold, no top-K)
    head: str = "lse_nonzero"
    # its fine level: argmax in log space, only the regression row used, under torch.compile
    fine: str = "fast_compiled"
    # torch.compile of backbone + transformer + FPN (fuses the kernels between cuDNN's convolutions)
    compiled: str = "features"
    # fp16: what stays fp32. With "fpn_backbone12" fp16 keeps 99.7-99.8 % of fp32's matches within 1 px
    # on held-out real pairs (H200, bench/results), with "fpn" or "none" 99.0-99.5 %, at the same speed
    fp32_island: str = "fpn_backbone12"
    # the product graph resamples the camera images itself (stage 1 on the device, bit for bit)
    stage1_on_device: bool = True
    # ... as one Triton kernel per resampled axis (resample_kernel.py: the same sums and roundings as the torch ops'
    # tap-by-tap form; a 1920x1080 pair 0.06 instead of 0.55 ms on an H100); off, or without Triton: the torch ops
    stage1_kernel: bool = True
    # ... and runs the backbone and the fine FPN on the valid region plus the backbone's edge reach, not the
    # whole square canvas (a 16:9 camera's image fills 54 % of it), its stride-1 blocks given the canvas's far
    # field at the crop's edge: the matches are the whole canvas's (product.network_extent,
    # model.EloftrNet.far_field_edges). 1280x720 runs 832x512 of 832² (released model; demo model 832x480)
    reach_crop: bool = True
    # the log-space head on the valid cells only, not the whole square canvas (product.valid_cell_block): the
    # same matches; a 16:9 camera's similarity matrix has 29 % of the canvas's entries (56x104 of 104x104 cells)
    head_on_valid_cells: bool = True
    # the torch backend runs the product graph's fine level in captured row buckets (a frame pays for its
    # matches, not for the cap) ...
    row_buckets: bool = True
    # ... on the previous frame's bucket straight after the coarse half, one synchronisation for both
    predict_rows: bool = True
    # how the host waits for the device (device_wait.HOST_WAITS): sleep through most of the expected time, then
    # spin on the event; "blocking": the event's own sleep, whose wake-up comes late on the GPU machines
    host_wait: str = DEFAULT_HOST_WAIT
    # the torch backend copies the camera images into its reused pinned buffers (numpy) and sends those; off (the
    # default): straight from the arrays, the driver staging them in pieces while earlier pieces travel. H100 host,
    # a 1920x1080 pair: 1.40 instead of 1.83 ms (bench/upload_paths.py), ELoFTR end to end 5.5-5.6 instead of 5.9-6.1
    pinned_upload: bool = False

    def __post_init__(self) -> None:
        check_host_wait(self.host_wait, type(self).__name__)
        for name, value, allowed in (("head", self.head, PRODUCT_HEADS), ("fine", self.fine, FINE_FORMS),
                                     ("compiled", self.compiled, COMPILED_PARTS),
                                     ("fp32_island", self.fp32_island, tuple(FP32_ISLANDS))):
            if value not in allowed:
                raise ConfigError(f"EloftrOptions.{name}: {value!r} is not one of {', '.join(allowed)}")
