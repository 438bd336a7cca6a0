"""RoMa variant pipeline: preprocessing -> "dense" graph (warp + certainty) -> host sampling -> pixels.

The "dense" graph has fixed shapes for a (coarse_res, upsample_res) pair: four images [1, 3, S, S]
in, `warp` [1, u, 2u, 4] and `certainty` [1, u, 2u] out (the original's symmetric layout: left half
A -> B, right half B -> A). Everything data-dependent (sampling, mask, pixel conversion) is here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from ..errors import CheckpointError, ConfigError
from ..params import PARAMS_BY_NAME
from ..result import MatchResult
from .config import RomaConfig
from .options import RomaOptions
from .preprocess import PreparedImage, model_to_original, prepare_image, prepare_stage1
from .sampling import (DeviceSampler, SparseMatches, balanced_sample, seeded_generator, to_pixels, topk_sample,
                       valid_mask)

if TYPE_CHECKING:
    import torch

    from ..backends.base import Backend
    from .gp import GpSolver
    from .model import RomaNet


def _to_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor left on the device by the torch backend
        return a.detach().float().cpu().numpy()
    return np.asarray(a)


DINOV2_KEY_PREFIX = "dinov2."  # DINOv2 keys inside the combined state dict of `load_weights`


@dataclass
class RomaMeta:
    image0: PreparedImage
    image1: PreparedImage


# the dense graph's inputs where it stretch-resizes the stage-1 images itself (device_graph.RomaImageGraph)
STAGE1_INPUTS = ("image0", "image1")


class RomaPipeline:
    name = "roma"
    graphs = ("dense",)

    def __init__(self, config: dict[str, Any] | None = None, roma_config: RomaConfig | None = None,
                 options: RomaOptions | None = None) -> None:
        config = dict(config or {})
        self.config = roma_config or RomaConfig.from_params(config)
        self.dinov2_path = str(PARAMS_BY_NAME["dinov2_path"].validate(config.get("dinov2_path", "")))
        self.options = options or RomaOptions()
        # the dense graph's inputs: four resized images (numpy stretch here), or the two stage-1 images where the
        # graph resizes them itself (RomaImageGraph). Fixed once, by `bind_graphs` when the torch backend is built
        # for this pipeline: torch_graphs changes nothing here
        self.stage1_inputs = False
        # the balanced sampler where the dense outputs are on CUDA
        self._device_sampler = DeviceSampler(self.options.capture_sampler, self.options.host_wait)

    def bind_graphs(self, graphs: dict[str, "torch.nn.Module"]) -> None:
        """Feed the dense graph the backend runs (from `torch_graphs`) the inputs it takes. Called once, when the
        backend is built (backends.factory); ONNX Runtime and TensorRT run exported graphs of four images."""
        from ..backends.torch_backend import graph_input_names

        self.stage1_inputs = tuple(graph_input_names(graphs["dense"])) == STAGE1_INPUTS

    product_graph = None  # RoMa has no one-graph export to bind (VariantPipeline)

    def set_threshold(self, threshold: float, graphs: dict[str, Any]) -> bool:
        """RoMa's graphs take no threshold: a new one needs a new matcher (VariantPipeline)."""
        return False

    # --- VariantPipeline -----------------------------------------------------------------------
    def preprocess(self, image0: np.ndarray, image1: np.ndarray) -> tuple[dict[str, np.ndarray], RomaMeta]:
        c = self.config
        if self.stage1_inputs:
            s0, q0 = prepare_stage1(image0, c.webui_resize, "image0", webui_on_device=True)
            s1, q1 = prepare_stage1(image1, c.webui_resize, "image1", webui_on_device=True)
            return {"image0": s0[None], "image1": s1[None]}, RomaMeta(q0, q1)
        p0 = prepare_image(image0, c.coarse_res, c.upsample_res, c.webui_resize, "image0")
        p1 = prepare_image(image1, c.coarse_res, c.upsample_res, c.webui_resize, "image1")
        assert p0.coarse is not None and p0.fine is not None and p1.coarse is not None and p1.fine is not None
        inputs = {"image0_coarse": p0.coarse[None], "image1_coarse": p1.coarse[None],
                  "image0_fine": p0.fine[None], "image1_fine": p1.fine[None]}
        return inputs, RomaMeta(p0, p1)

    @property
    def device_outputs(self) -> frozenset[str]:
        """Outputs the torch backend hands back as device tensors: the balanced sampler runs where the
        warp is (no 24 MB copy, KDE on the GPU)."""
        return frozenset({"warp", "certainty"}) if self.config.sample_mode == "balanced" else frozenset()

    def infer(self, backend: "Backend", inputs: dict[str, np.ndarray], meta: RomaMeta) -> dict[str, Any]:
        return backend.run("dense", inputs)

    def sample(self, warp: Any, certainty: Any) -> SparseMatches:
        """Dense [.., u, 2u, 4] / [.., u, 2u] (numpy or torch) -> sparse normalised matches."""
        c = self.config
        if c.sample_mode == "topk":
            return topk_sample(_to_numpy(warp), _to_numpy(certainty), c.num_samples)
        import torch

        w = torch.as_tensor(warp).float().reshape(-1, 4)
        cert = torch.as_tensor(certainty).float().reshape(-1)
        if w.is_cuda:
            return self._device_sampler(w, cert, c.num_samples, c.sample_seed)
        return balanced_sample(w, cert, c.num_samples, seeded_generator(c.sample_seed, w.device))

    def postprocess(self, outputs: dict[str, Any], meta: RomaMeta) -> MatchResult:
        t0 = time.perf_counter()
        sparse = self.sample(outputs["warp"], outputs["certainty"])
        s0, s1 = meta.image0.model_size_wh, meta.image1.model_size_wh
        k0, k1 = to_pixels(sparse.matches, s0, s1)
        keep = valid_mask(k0, k1, sparse.confidence, s0, s1)
        # compress, not k0[keep]: numpy's boolean row indexing of [n, 2] takes 20x longer (0.15 ms at 5000)
        k0, k1 = k0.compress(keep, axis=0), k1.compress(keep, axis=0)
        sample_ms = (time.perf_counter() - t0) * 1e3
        return MatchResult(
            keypoints0=model_to_original(k0, meta.image0),
            keypoints1=model_to_original(k1, meta.image1),
            confidence=sparse.confidence.compress(keep).astype(np.float32),
            image0_size=meta.image0.original_size_wh,
            image1_size=meta.image1.original_size_wh,
            timings_ms={"sampling": sample_ms},
            extras={"sample_mode": self.config.sample_mode, "model_size0": s0, "model_size1": s1,
                    "keypoints0_model": k0, "keypoints1_model": k1,
                    "coarse_res": self.config.coarse_res, "upsample_res": self.config.upsample_res},
        )

    # --- torch graphs (torch backend, ONNX export) ----------------------------------------------
    def load_weights(self, params: dict[str, Any]) -> dict[str, "torch.Tensor"]:
        """Both files, strictly: the checkpoint's keys (`model.*`) plus DINOv2's under `dinov2.`."""
        from ..checkpoint import load_state_dict
        from .weights import load_dinov2_state_dict

        path = str(params.get("checkpoint_path", ""))
        if not path:
            raise CheckpointError("RoMa needs the MatchAnything checkpoint (matchanything_roma.ckpt): "
                                  "set checkpoint_path")
        state = dict(load_state_dict(path, "roma"))
        dino = load_dinov2_state_dict(str(params.get("dinov2_path", self.dinov2_path)))
        state.update({DINOV2_KEY_PREFIX + k: v for k, v in dino.items()})
        return state

    def build_net(self, state_dict: dict[str, "torch.Tensor"],
                  dinov2_state: dict[str, "torch.Tensor"] | None = None,
                  gp_solver: "GpSolver | None" = None) -> "RomaNet":
        """RomaNet with both weight sets loaded strictly.

        DINOv2 comes from `dinov2_state`, else from `dinov2.`-prefixed keys of `state_dict`
        (`load_weights`), else from the `dinov2_path` file."""
        from .model import RomaNet
        from .weights import load_dinov2_state_dict, load_state_dicts_into

        roma = {k: v for k, v in state_dict.items() if not k.startswith(DINOV2_KEY_PREFIX)}
        if dinov2_state is None:
            n = len(DINOV2_KEY_PREFIX)
            dinov2_state = {k[n:]: v for k, v in state_dict.items() if k.startswith(DINOV2_KEY_PREFIX)} or None
        if dinov2_state is None:
            dinov2_state = load_dinov2_state_dict(self.dinov2_path)
        net = RomaNet(gp_solver or "inverse")
        load_state_dicts_into(net, roma, dinov2_state, "RoMa checkpoint", self.dinov2_path or "DINOv2 weights")
        return net.eval()

    def torch_graphs(self, state_dict: dict[str, "torch.Tensor"], device: str = "cpu",
                     dinov2_state: dict[str, "torch.Tensor"] | None = None,
                     gp_solver: "GpSolver | None" = None, precision: str = "fp32",
                     resize_on_device: bool | None = None) -> dict[str, "torch.nn.Module"]:
        """{"dense": graph}. On the CPU (and for export): `RomaDenseGraph`, the exact form fed with the numpy
        preprocessing. On CUDA, the speed form of `self.options` (RomaOptions): the GP by its CUDA solver, the
        refiners' local correlation gathered, for precision fp16 half weights stored once with the BatchNorms
        folded into the convolutions and the refiners' channels padded to aligned counts, and in both precisions
        the refiner blocks in the fused form it names (channels-last "cudnn_nhwc" by default); fed with the
        stage-1 images (`RomaImageGraph`) where `resize_on_device` (None: options.stage1_on_device on CUDA).
        (channels_last for the whole net measured slower.) gp_solver: None = "inverse" on the CPU, the options'
        on CUDA; "newton_schulz" for ONNX export. Pure: the pipeline learns the graph's inputs in `bind_graphs`."""
        import torch

        from .device_graph import FP32_WARMUP_HEADROOM_GIB, RomaImageGraph
        from .model import RomaDenseGraph

        o = self.options
        on_gpu = torch.device(device).type == "cuda"
        if resize_on_device is None:
            resize_on_device = on_gpu and o.stage1_on_device
        solver = gp_solver or cast("GpSolver", o.cuda_gp_solver if on_gpu else "inverse")  # RomaOptions checks it
        net = self.build_net(state_dict, dinov2_state, solver)
        if precision == "fp16":
            net.fold_batchnorms()
            net.half_weights()
        if on_gpu and o.gathered_correlation:
            net.use_gathered_correlation(o.fused_window_dots)
        net.to(device)
        if on_gpu and precision == "fp16" and o.refiner_channel_multiple:
            net.pad_refiner_channels(o.refiner_channel_multiple)
        if on_gpu:
            # fp32 keeps its BatchNorms unfolded: only "cudnn_nhwc" (or None) takes them
            blocks = o.refiner_blocks
            net.use_fused_depthwise(blocks if precision == "fp16" or blocks == "cudnn_nhwc" else None)
        grid = self.config.coarse_res // 14
        net.dinov2.freeze_pos_embed(grid, grid)  # a constant for this input size (and in exported graphs)
        if resize_on_device:
            # cuDNN autotuning: fp16 measured the same speed without it (82.4 vs 82.6 ms, H200) and less
            # memory; fp32 without it measured 736 ms inference (cuDNN's heuristic picks), with it 315 ms
            # (issue 13's run of the previous code): on for fp32 only
            fp32 = precision == "fp32"
            return {"dense": RomaImageGraph(net, self.config.coarse_res, self.config.upsample_res,
                                            cudnn_benchmark=fp32,
                                            warmup_headroom_gib=FP32_WARMUP_HEADROOM_GIB if fp32 else None,
                                            webui=self.config.webui_resize, cudnn_tf32=o.fp32_cudnn_tf32,
                                            banded_resize=o.stage1_kernel).eval()}
        return {"dense": RomaDenseGraph(net).eval()}

    def example_inputs(self, graph: str = "dense") -> dict[str, "torch.Tensor"]:
        """Inputs of the right shapes/dtypes for tracing/export (the sizes of this pipeline's config)."""
        import torch

        if graph != "dense":
            raise ConfigError(f"unknown RoMa graph {graph!r}; graphs are {self.graphs}")
        c, u = self.config.coarse_res, self.config.upsample_res
        return {"image0_coarse": torch.rand(1, 3, c, c), "image1_coarse": torch.rand(1, 3, c, c),
                "image0_fine": torch.rand(1, 3, u, u), "image1_fine": torch.rand(1, 3, u, u)}
