"""ELoFTR variant pipeline: preprocessing -> "coarse" graph -> host selection -> "fine" graph -> pixels.

On the torch backend on CUDA the whole frame is one graph instead ("product", product.EloftrProduct):
the host only checks the images (and resizes those that need it), one replay does the rest, and one
small array comes back. The host path stays the reference the tests compare against, and the path of
the CPU and of the engine backends.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError
from ..params import HF_SPACE_FORCE_RESIZE_WH, PARAMS_BY_NAME
from ..result import MatchResult
from .config import EloftrConfig
from .options import EloftrOptions
from .postprocess import CoarseMatches, select_coarse_matches, to_original_pixels
from .preprocess import (ImageMeta, PreprocessSettings, plan_stage1, preprocess_image, stage2_meta, stage2_rgb,
                         to_model_input)

if TYPE_CHECKING:
    import torch

    from ..backends.base import Backend

log = logging.getLogger(__name__)

COARSE_MODES = ("auto", "topk", "full")


@dataclass
class EloftrMeta:
    image0: ImageMeta
    image1: ImageMeta
    mask0: np.ndarray | None  # [Hc,Wc] bool coarse masks (host copies for selection; None: product graph)
    mask1: np.ndarray | None
    canvas0_u8: np.ndarray | None  # the model input canvases (parity checks, debugging; None: product graph)
    canvas1_u8: np.ndarray | None


def _param(config: dict[str, Any], name: str) -> Any:
    return PARAMS_BY_NAME[name].validate(config.get(name, PARAMS_BY_NAME[name].default))


def preprocess_settings(config: dict[str, Any], model_config: EloftrConfig) -> PreprocessSettings:
    """Params (preset, resize_max, force_resize_*) -> stage-1 settings.

    `hf_space` forces 640x480 as the web UI; explicit force_resize_width/height override the size.
    """
    preset = _param(config, "preset")
    fw, fh = _param(config, "force_resize_width"), _param(config, "force_resize_height")
    if (fw == 0) != (fh == 0):
        raise ConfigError("force_resize_width and force_resize_height must both be set (or both 0)")
    force: tuple[int, int] | None = (fw, fh) if fw else None
    if force is None and preset == "hf_space":
        force = HF_SPACE_FORCE_RESIZE_WH
    return PreprocessSettings(resize_max=_param(config, "resize_max"), force_resize_wh=force,
                              coarse_stride=model_config.coarse_stride)


class EloftrPipeline:
    name = "eloftr"
    graphs = ("coarse", "fine")

    def __init__(self, config: dict[str, Any] | None = None, model_config: EloftrConfig | None = None,
                 coarse_mode: str = "auto", options: EloftrOptions | None = None) -> None:
        config = dict(config or {})
        self.model_config = model_config or EloftrConfig()
        self.options = options or EloftrOptions()
        self.threshold = float(_param(config, "threshold"))
        self.settings = preprocess_settings(config, self.model_config)
        if coarse_mode not in COARSE_MODES:
            raise ConfigError(f"coarse_mode must be one of {COARSE_MODES}, got {coarse_mode!r}")
        k = self.model_config.candidates_per_cell
        # top-K is exact when at most K confidences of a row can pass: thr >= 1/(K+1) (a row of the
        # dual softmax sums to <= 1). Below that the torch graph returns the full matrix instead.
        self.topk_exact = self.threshold >= 1.0 / (k + 1)
        self.coarse_full = coarse_mode == "full" or (coarse_mode == "auto" and not self.topk_exact)
        # the product graph's cap on matches per frame: the same bound the engines' fine graph has
        self.max_matches = int(_param(config, "engine_max_matches"))
        # which graphs run, fixed once when the backend is built (bind_graphs, bind_product_model): the product
        # graph (torch on CUDA, or an exported product model) ...
        self.product = False
        self.stage1_on_device = False  # ... and whether that graph resamples the camera images itself

    # the one-graph export (engines.export.export_eloftr_product): ONNX Runtime runs it instead of coarse + fine
    product_graph = "product"

    def bind_product_model(self, threshold: Any, max_matches: Any, source: str) -> None:
        """Run an exported product model. Its threshold and cap are constants of the graph: they must be
        this matcher's, or the matches would silently follow the export instead of the parameters."""
        if threshold != self.threshold or max_matches != self.max_matches:
            raise ConfigError(
                f"{source} was exported for threshold {threshold} and engine_max_matches {max_matches}; this "
                f"matcher has threshold {self.threshold} and engine_max_matches {self.max_matches}. Set those, or "
                "export for these with `matchanything export --image-size WxH --threshold T --engine-max-matches N`")
        self.product = True

    def bind_graphs(self, graphs: dict[str, "torch.nn.Module"]) -> None:
        """Feed the graphs the torch backend runs (from `torch_graphs`): the product graph where there is one, with
        the camera images themselves where it resamples them. Called once, when the backend is built."""
        product = graphs.get(self.product_graph)
        self.product = product is not None
        self.stage1_on_device = product is not None and getattr(product, "stage1", None) is not None

    def load_weights(self, params: dict[str, Any]) -> dict[str, "torch.Tensor"]:
        """The released checkpoint's state dict (one file; loaded without executing pickled code)."""
        from ..checkpoint import load_state_dict

        return load_state_dict(params["checkpoint_path"], self.name)

    # --- VariantPipeline -----------------------------------------------------------------------
    def preprocess(self, image0: np.ndarray, image1: np.ndarray) -> tuple[dict[str, np.ndarray], EloftrMeta]:
        if self.product:
            rgb0, meta0 = self._product_input(image0)
            rgb1, meta1 = self._product_input(image1)
            return {"rgb0": rgb0, "rgb1": rgb1}, EloftrMeta(meta0, meta1, None, None, None, None)
        c0, m0, meta0 = preprocess_image(image0, self.settings)
        c1, m1, meta1 = preprocess_image(image1, self.settings)
        inputs = {"image0": to_model_input(c0), "image1": to_model_input(c1), "mask0": m0[None], "mask1": m1[None]}
        return inputs, EloftrMeta(meta0, meta1, m0, m1, c0, c1)

    def _product_input(self, image: np.ndarray) -> tuple[np.ndarray, ImageMeta]:
        """The product graph's input: the image itself where the graph resamples it (stage 1 on the device),
        else the stage-2 image resampled here."""
        h, w = image.shape[:2]
        if self.stage1_on_device and plan_stage1(w, h, self.settings).device:
            return np.ascontiguousarray(image), stage2_meta(w, h, self.settings)
        return stage2_rgb(image, self.settings)

    # Outputs a device backend (torch, ONNX Runtime with IOBinding, TensorRT) hands back on the device: the
    # fine maps stay on the GPU between the graphs.
    device_outputs = frozenset({"feat_f0", "feat_f1"})

    def infer(self, backend: "Backend", inputs: dict[str, np.ndarray], meta: EloftrMeta) -> dict[str, Any]:
        if self.product:
            return self._infer_product(backend, inputs)
        assert meta.mask0 is not None and meta.mask1 is not None
        coarse = backend.run("coarse", inputs)
        if "conf" not in coarse and not self.topk_exact:
            log.warning("ELoFTR threshold %.4g < 1/(K+1) with the top-%d coarse graph of backend %s: "
                        "matches may be missing", self.threshold, self.model_config.candidates_per_cell,
                        getattr(backend, "name", "?"))
        cm = select_coarse_matches(coarse, meta.mask0, meta.mask1, self.threshold, self.model_config.border_rm,
                                   self.max_matches)
        # the coarse cells of each match row: their identity for `validate` (MatchResult.extras)
        cap_info = {"coarse_matches_total": cm.total, "matches_capped": cm.capped, "coarse_i_ids": cm.i_ids,
                    "coarse_j_ids": cm.j_ids}
        if cm.capped:
            self._say_capped(cm.total, self.max_matches)
        if cm.i_ids.size == 0:
            empty = np.zeros((0, 2), np.float32)
            return {"mkpts0_c": empty, "mkpts1_c": empty.copy(), "mconf": cm.mconf, **cap_info}
        fine = backend.run("fine", {"feat_f0": coarse["feat_f0"], "feat_f1": coarse["feat_f1"],
                                    "i_ids": cm.i_ids, "j_ids": cm.j_ids})
        return {"mkpts0_c": np.asarray(fine["mkpts0_c"], np.float32),
                "mkpts1_c": np.asarray(fine["mkpts1_c"], np.float32), "mconf": cm.mconf, **cap_info}

    def _say_capped(self, total: int, cap: int) -> None:
        log.warning("ELoFTR: %d coarse matches pass threshold %.4g, more than the cap of %d (engine_max_matches, "
                    "or, for a top-K head, one per cell of image0): the most confident are kept "
                    "(raise the threshold or engine_max_matches)", total, self.threshold, cap)

    def _infer_product(self, backend: "Backend", inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        from .product import PRODUCT_COLUMNS

        out = backend.run("product", inputs)["matches"]
        count, truncated, cap = int(out[0, 0]), int(out[0, 1]), int(out[0, 2])
        rows = out[1:1 + min(count, cap)]
        col = {name: k for k, name in enumerate(PRODUCT_COLUMNS)}
        used = rows[:, col["conf"]] > 0  # a frame over the cap may keep fewer rows than the cap (ties)
        rows = rows[used] if not used.all() else rows
        cm = CoarseMatches(rows[:, col["i"]].astype(np.int64), rows[:, col["j"]].astype(np.int64),
                           rows[:, col["conf"]].copy(), truncated, count)
        if truncated:
            log.warning("ELoFTR: %d coarse rows have all %d candidates above threshold %.4g; matches may be "
                        "truncated", truncated, self.model_config.candidates_per_cell, self.threshold)
        if count > cap:
            self._say_capped(count, cap)
        return {"mkpts0_c": np.ascontiguousarray(rows[:, col["x0"]:col["y0"] + 1]),
                "mkpts1_c": np.ascontiguousarray(rows[:, col["x1"]:col["y1"] + 1]), "mconf": cm.mconf,
                "coarse_matches_total": count, "matches_capped": count > cap, "coarse_i_ids": cm.i_ids,
                "coarse_j_ids": cm.j_ids}

    def postprocess(self, outputs: dict[str, Any], meta: EloftrMeta) -> MatchResult:
        mconf = np.asarray(outputs["mconf"], np.float32)
        extras: dict[str, Any] = {"coarse_matches_total": int(outputs.get("coarse_matches_total", mconf.size)),
                                  "matches_capped": bool(outputs.get("matches_capped", False))}
        for key in ("coarse_i_ids", "coarse_j_ids"):  # each match's coarse cell in image0 / image1
            if key in outputs:
                extras[key] = np.asarray(outputs[key], np.int64)
        if self.product:
            extras["graph"] = "product"
        return MatchResult(
            keypoints0=to_original_pixels(outputs["mkpts0_c"], meta.image0),
            keypoints1=to_original_pixels(outputs["mkpts1_c"], meta.image1),
            confidence=np.asarray(outputs["mconf"], np.float32),
            image0_size=meta.image0.orig_wh,
            image1_size=meta.image1.orig_wh,
            extras={"canvas0": meta.image0.canvas, "canvas1": meta.image1.canvas,
                    "model_size0": meta.image0.stage1_wh, "model_size1": meta.image1.stage1_wh,
                    "coarse_mode": "full" if self.coarse_full else "topk", **extras},
        )

    # --- torch graphs (torch backend, ONNX export) ----------------------------------------------
    def build_net(self, state_dict: dict[str, "torch.Tensor"]) -> Any:
        from ..checkpoint import check_keys
        from .model import EloftrNet

        net = EloftrNet(self.model_config)
        expected = {k: v.shape for k, v in net.state_dict().items()}
        check_keys(state_dict, expected, "ELoFTR checkpoint")
        net.load_state_dict(state_dict, strict=True)
        return net.eval()

    def torch_graphs(self, state_dict: dict[str, "torch.Tensor"], device: str = "cpu",
                     full_conf: bool | None = None, precision: str = "fp32",
                     speed_form: bool | None = None, product: bool | None = None) -> dict[str, "torch.nn.Module"]:
        """{"coarse": EloftrCoarse, "fine": EloftrFine} on `device`, weights loaded strictly.

        `full_conf` None = this pipeline's choice (full matrix when top-K is not exact for the threshold);
        the ONNX exporter passes False (fixed-size top-K outputs). `speed_form` (default: on for fp16,
        which is not exact anyway) fuses RepVGG and uses SDPA + channels-last; fp32 stays the exact form.
        """
        from .graphs import EloftrCoarse, EloftrFine
        from .product import EloftrProduct

        net = self.build_net(state_dict).to(device)
        if speed_form if speed_form is not None else precision == "fp16":
            net.to_speed_form()
        if precision == "fp16":
            net.store_half_weights(self.options.fp32_island)
        full = self.coarse_full if full_conf is None else full_conf
        graphs: dict[str, torch.nn.Module] = {"coarse": EloftrCoarse(net, exact_full_conf=full).eval(),
                                              "fine": EloftrFine(self.model_config).eval()}
        # the product graph: torch on CUDA; `product=True` also builds it on the CPU (tests compare it with the
        # host path there). Its log-space head (a mask, no top-K) is exact at every threshold; the top-K heads
        # (the CPU's, the export's) only at thresholds >= 1/(K+1)
        if product is None:
            product = self.options.product_graph and str(device).startswith("cuda")
        if product and str(device).startswith("cuda"):
            o = self.options
            graphs["product"] = EloftrProduct(net, self.threshold, self.max_matches, o.head, o.fine, o.compiled,
                                              stage1=self.settings if o.stage1_on_device else None,
                                              reach_crop=o.reach_crop, stage1_kernel=o.stage1_kernel,
                                              head_on_valid_cells=o.head_on_valid_cells).eval()
        elif product and not full:
            graphs["product"] = EloftrProduct(net, self.threshold, self.max_matches).eval()
        return graphs  # what runs is fixed by bind_graphs(graphs): building graphs changes nothing here

    def set_threshold(self, threshold: float, graphs: dict[str, Any]) -> bool:
        """Take a new threshold without rebuilding: True when these graphs serve it (the product graph reads
        it as an input; the host path selects on the host), False when another coarse graph is needed (the
        top-K graph of a host path is exact only down to 1/(K+1)): then build a new matcher."""
        threshold = float(PARAMS_BY_NAME["threshold"].validate(threshold))
        k = self.model_config.candidates_per_cell
        topk_exact = threshold >= 1.0 / (k + 1)
        product = graphs.get("product")
        if self.product and product is None:
            return False  # an exported product model: its threshold is a constant of the file
        if not self.product and not (self.coarse_full or topk_exact):
            return False  # the top-K coarse graph would miss matches: a matcher with the full-matrix graph
        if product is not None:
            product.set_threshold(threshold)
        self.threshold, self.topk_exact = threshold, topk_exact
        return True

    def example_inputs(self, graph: str, canvas: int | tuple[int, int] = 640,
                       valid_hw: tuple[int, int] | None = None) -> dict[str, "torch.Tensor"]:
        """Inputs of the right shapes/dtypes for tracing/export (valid region default: whole canvas)."""
        import torch

        s0, s1 = (canvas, canvas) if isinstance(canvas, int) else canvas
        stride = self.model_config.coarse_stride
        if graph == "coarse":
            def mask(s: int) -> torch.Tensor:
                m = torch.zeros(1, s // stride, s // stride, dtype=torch.bool)
                h, w = valid_hw or (s, s)
                m[:, : h // stride, : w // stride] = True
                return m
            return {"image0": torch.rand(1, 1, s0, s0), "image1": torch.rand(1, 1, s1, s1),
                    "mask0": mask(s0), "mask1": mask(s1)}
        if graph == "fine":
            c = self.model_config.fine_d_model
            n = 4
            return {"feat_f0": torch.rand(1, c, s0, s0), "feat_f1": torch.rand(1, c, s1, s1),
                    "i_ids": torch.arange(n, dtype=torch.int64) * 3 + (s0 // stride) * 2,
                    "j_ids": torch.arange(n, dtype=torch.int64) * 5 + (s1 // stride) * 3}
        raise ConfigError(f"unknown ELoFTR graph {graph!r}; graphs are {self.graphs}")
