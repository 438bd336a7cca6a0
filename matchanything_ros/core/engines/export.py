"""`matchanything export`: the variant's torch graphs -> ONNX files that work at every size they claim.

ELoFTR for one camera size: the product model (`export_eloftr_product`), the whole frame as one
fixed-shape graph, in fp32 or in fp16 with explicit fp32 islands. ELoFTR for any size: two graphs
(`coarse`, `fine`, `export_eloftr`) with a dynamic canvas side (416..1664 by default, multiples of 32)
and a dynamic match count M for `fine`. Outputs have shapes fixed by the inputs (no data-dependent
shapes), so TensorRT needs no output allocator. RoMa exports one static graph (`dense`) per
(coarse_res, upsample_res), with the Newton-Schulz GP solve (no Inverse op).

Every export is checked before it is declared done, because peers ship exports that only work at
the trace size: `onnx.checker`, ONNX shape inference, every operator against TensorRT's ONNX
support list (`data/trt_onnx_ops.json`), and (unless disabled) ONNX Runtime against the torch
graphs at two sizes other than the trace size (RoMa: at its one size). The files carry metadata
(variant, config, thresholds, preprocessing contract, package version, checkpoint sha256, dim rules
for the engine builder); weights go to external data when a graph's serialized size reaches 2 GB.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
import onnx

from ... import __version__
from ..errors import ConfigError, MatchAnythingError
from .cache import DEFAULT_OPSET, EXPORT_MANIFEST, META_PREFIX, ONNX_SUFFIX, sha256_file

if TYPE_CHECKING:
    import torch

MIN_OPSET = 17
PROTOBUF_LIMIT = 2 << 30  # 2 GB: a single ONNX protobuf must be smaller; weights go to a .data file
TRT_OPS_FILE = Path(__file__).resolve().parents[2] / "data" / "trt_onnx_ops.json"
TOPK_MAX_K = 3840  # TensorRT restriction on TopK (see trt_onnx_ops.json)


class ExportCheckError(MatchAnythingError):
    """An exported graph fails a check (checker, shape inference, TensorRT op support, ORT parity)."""


# --- TensorRT operator support ----------------------------------------------------------------------

def load_trt_op_table(path: Path = TRT_OPS_FILE) -> dict[str, Any]:
    return json.loads(path.read_text())


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    out: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            out.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            out.extend(attr.graphs)
    return out


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer if not i.external_data}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR:
            values[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    return values


def trt_unsupported_ops(model: onnx.ModelProto, table: dict[str, Any] | None = None) -> list[str]:
    """Problems TensorRT's ONNX parser would have with `model` (empty list = all operators supported).

    Checks every node, inside subgraphs too: operator in the support list and marked supported,
    default domain only (custom domains need plugins), and the restrictions that can be checked
    statically here (TopK K < 3840, no antialiased Resize).
    """
    ops = (table or load_trt_op_table())["operators"]
    problems: list[str] = []
    stack = [model.graph]
    while stack:
        graph = stack.pop()
        consts = _constants(graph)
        for node in graph.node:
            stack.extend(_subgraphs(node))
            where = f"{node.op_type} ({node.name or node.output[0]})"
            if node.domain not in ("", "ai.onnx"):
                problems.append(f"{where}: custom domain {node.domain!r} needs a TensorRT plugin")
                continue
            entry = ops.get(node.op_type)
            if entry is None or not entry.get("supported"):
                problems.append(f"{where}: not supported by TensorRT's ONNX parser")
                continue
            if node.op_type == "TopK" and len(node.input) > 1:
                k = consts.get(node.input[1])
                if k is None:
                    problems.append(f"{where}: K is not a build-time constant")
                elif int(np.asarray(k).reshape(-1)[0]) >= TOPK_MAX_K:
                    problems.append(f"{where}: K = {int(np.asarray(k).reshape(-1)[0])} >= {TOPK_MAX_K}")
            if node.op_type == "Resize":
                for a in node.attribute:
                    if a.name == "antialias" and a.i:
                        problems.append(f"{where}: antialiased Resize is not supported")
    return problems


_TRT_TYPE_NAMES = {onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.BFLOAT16: "BF16",
                   onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT64: "INT64", onnx.TensorProto.UINT8: "UINT8",
                   onnx.TensorProto.INT8: "INT8", onnx.TensorProto.BOOL: "BOOL", onnx.TensorProto.DOUBLE: "FP64"}


def trt_type_problems(model: onnx.ModelProto, table: dict[str, Any] | None = None) -> list[str]:
    """Nodes of the main graph whose data input (input 0) has a type outside the types TensorRT's parser
    lists for the operator (e.g. CumSum on integers: TensorRT's CumSum takes floating types only).

    Types come from ONNX shape inference; a node whose input type stays unknown is reported too.
    """
    ops = (table or load_trt_op_table())["operators"]
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    for node in g.node:  # Constant outputs carry their tensor's type
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
    problems: list[str] = []
    for node in g.node:
        allowed = ops.get(node.op_type, {}).get("types")
        if not allowed or not node.input or not node.input[0]:
            continue
        found = _TRT_TYPE_NAMES.get(types.get(node.input[0], 0), "unknown")
        if found not in allowed:
            problems.append(f"{node.op_type} ({node.name or node.output[0]}): input type {found} "
                            f"not among {', '.join(allowed)}")
    return problems


# --- checks and metadata ----------------------------------------------------------------------------

def proto_bytes(model: onnx.ModelProto) -> int | None:
    """Serialized size of `model`; None when it is past protobuf's 2 GB limit (upb refuses to size it)."""
    from google.protobuf.message import EncodeError  # type: ignore[import-untyped]

    try:
        return int(model.ByteSize())
    except EncodeError:
        return None


def needs_external_data(model: onnx.ModelProto) -> bool:
    """Whether the graph cannot be one protobuf: its actual serialized size reaches 2 GB."""
    size = proto_bytes(model)
    return size is None or size >= PROTOBUF_LIMIT


def save_model(model: onnx.ModelProto, path: Path, external: bool | None = None) -> bool:
    """Save; weights go to `<name>.data` beside it when the graph would reach 2 GB (or when `external`
    says so). Returns that choice. Check such files by path (`check_onnx_file`), never in memory."""
    if external is None:
        external = needs_external_data(model)
    data_name = path.name + ".data"
    (path.parent / data_name).unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    return external


def check_onnx_file(path: Path, table: dict[str, Any] | None = None) -> dict[str, Any]:
    """onnx.checker + strict shape inference + TensorRT op support; raises ExportCheckError."""
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as exc:
        raise ExportCheckError(f"{path}: onnx.checker failed: {exc}") from exc
    with tempfile.TemporaryDirectory() as tmp:
        try:
            onnx.shape_inference.infer_shapes_path(str(path), str(Path(tmp) / "inferred.onnx"), check_type=True,
                                                   strict_mode=True)
        except Exception as exc:  # onnx raises InferenceError and others
            raise ExportCheckError(f"{path}: ONNX shape inference failed: {exc}") from exc
    model = onnx.load(str(path), load_external_data=False)
    problems = trt_unsupported_ops(model, table)
    if problems:
        raise ExportCheckError(f"{path}: operators TensorRT cannot parse:\n  " + "\n  ".join(problems))
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {"opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
            "num_nodes": len(model.graph.node), "op_counts": dict(sorted(counts.items()))}


def set_metadata(model: onnx.ModelProto, values: dict[str, Any]) -> None:
    """Store values under `matchanything.<key>` (non-strings as JSON)."""
    del model.metadata_props[:]
    for key, value in values.items():
        entry = model.metadata_props.add()
        entry.key = META_PREFIX + key
        entry.value = value if isinstance(value, str) else json.dumps(value, sort_keys=True)


# --- ELoFTR -------------------------------------------------------------------------------------------

def eloftr_dynamic_axes(graph: str) -> dict[str, dict[int, str]]:
    """Symbolic dims of the ELoFTR graphs. Both images share one canvas side: the traced graph runs the
    backbone on the pair as one batch (as the original does for equal sizes)."""
    canvas = {2: "canvas", 3: "canvas"}
    if graph == "coarse":
        return {"image0": canvas, "image1": canvas, "mask0": {1: "cells", 2: "cells"},
                "mask1": {1: "cells", 2: "cells"}, "cand_j": {1: "num_cells"}, "cand_conf": {1: "num_cells"},
                "conf": {1: "num_cells", 2: "num_cells"}, "feat_f0": canvas, "feat_f1": canvas}
    if graph == "fine":
        return {"feat_f0": canvas, "feat_f1": canvas, "i_ids": {0: "num_matches"}, "j_ids": {0: "num_matches"},
                "mkpts0_c": {0: "num_matches"}, "mkpts1_c": {0: "num_matches"}}
    raise ConfigError(f"unknown ELoFTR graph {graph!r}")


def eloftr_metadata(pipeline: Any, graph: str, checkpoint_sha256: str, sizes: tuple[int, int]) -> dict[str, Any]:
    cfg = pipeline.model_config
    k = cfg.candidates_per_cell
    return {
        "variant": "eloftr",
        "graph": graph,
        "graphs": list(pipeline.graphs),
        "package_version": __version__,
        "checkpoint_sha256": checkpoint_sha256,
        "config": cfg.to_dict(),
        "thresholds": {"candidates_per_cell": k, "exact_for_threshold_at_least": 1.0 / (k + 1),
                       "note": "coarse selection (conf > threshold, border, valid region) runs on the host; "
                               "the top-K candidates are exact for thresholds >= 1/(K+1)"},
        "preprocessing": {
            "image0/image1": "float32 [1,1,S,S] gray in [0,1] (uint8/255), image padded bottom/right with zeros to a "
                             "square canvas of side S; both images share S",
            "mask0/mask1": f"bool [1,S/{cfg.coarse_stride},S/{cfg.coarse_stride}] valid (unpadded) coarse cells",
            "canvas_side": {"min": sizes[0], "max": sizes[1], "multiple_of": cfg.canvas_multiple},
            "stage1": "see matchanything_ros.core.eloftr.preprocess (OpenCV INTER_AREA/LINEAR, Pillow L, /32 floor)",
            "outputs": "coarse: top-K image1 cells per image0 cell + fine maps; fine: canvas-pixel keypoints "
                       "(original pixels = (k*hw_new + 0.5)*s - 0.5)",
        },
        "dynamic_dims": {"canvas": {"canvas_div": 1}, "cells": {"canvas_div": cfg.coarse_stride},
                         "num_matches": {"matches": True}},
        "fp32_layer_patterns": [],
        "opset_min": MIN_OPSET,
    }


def _torch_outputs(module: "torch.nn.Module", inputs: dict[str, "torch.Tensor"]) -> dict[str, np.ndarray]:
    import torch

    with torch.inference_mode():
        outs = module(*[inputs[n] for n in module.input_names])  # type: ignore[union-attr]
    outs = (outs,) if isinstance(outs, torch.Tensor) else outs
    return {n: t.detach().cpu().numpy() for n, t in zip(module.output_names, outs, strict=True)}  # type: ignore


def _verify_eloftr(pipeline: Any, graphs: dict[str, Any], files: dict[str, Path], sizes: list[int],
                   log: TextIO) -> list[dict[str, Any]]:
    """ONNX Runtime vs torch on both graphs at `sizes` (part-valid canvases); raises on mismatch."""
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sessions = {g: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for g, p in files.items()}
    report = []
    gen = torch.Generator().manual_seed(0)
    for side in sizes:
        valid = (side - 2 * pipeline.model_config.canvas_multiple, side)  # exercise the masked crop
        ex = pipeline.example_inputs("coarse", side, valid_hw=valid)
        ex["image0"] = torch.rand(ex["image0"].shape, generator=gen)
        ex["image1"] = torch.rand(ex["image1"].shape, generator=gen)
        ref = _torch_outputs(graphs["coarse"], ex)
        got = dict(zip([o.name for o in sessions["coarse"].get_outputs()],
                       sessions["coarse"].run(None, {k: v.numpy() for k, v in ex.items()}), strict=True))
        errs = {}
        for name in ("cand_conf", "feat_f0", "feat_f1"):
            a, b = ref[name].astype(np.float64), got[name].astype(np.float64)
            if a.shape != b.shape:
                raise ExportCheckError(f"coarse.{name} at canvas {side}: ONNX shape {b.shape} != torch {a.shape}")
            errs[name] = float(np.abs(a - b).max() / max(1e-12, float(np.abs(a).max())))
        # fine graph on the torch candidates: the same ids into both
        stride = pipeline.model_config.coarse_stride
        cells = side // stride
        i_ids = torch.arange(0, cells * cells, max(1, cells * cells // 64), dtype=torch.int64)
        j_ids = torch.from_numpy(ref["cand_j"][0, i_ids.numpy(), 0].astype(np.int64))
        fine_in = {"feat_f0": torch.from_numpy(ref["feat_f0"]), "feat_f1": torch.from_numpy(ref["feat_f1"]),
                   "i_ids": i_ids, "j_ids": j_ids}
        fref = _torch_outputs(graphs["fine"], fine_in)
        fgot = sessions["fine"].run(None, {k: v.numpy() for k, v in fine_in.items()})
        errs["fine_px"] = max(float(np.abs(fref[n] - g).max()) for n, g in
                              zip(("mkpts0_c", "mkpts1_c"), fgot, strict=True))
        bad = {k: v for k, v in errs.items() if v > (1e-2 if k == "fine_px" else 1e-4)}
        print(f"  verify canvas {side}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()), file=log)
        if bad:
            raise ExportCheckError(f"ONNX Runtime disagrees with torch at canvas {side}: {bad}")
        report.append({"canvas": side, **errs})
    return report


def export_eloftr(pipeline: Any, state_dict: dict[str, "torch.Tensor"], out_dir: str | Path, *,
                  checkpoint_sha256: str, opset: int = DEFAULT_OPSET, sizes: tuple[int, int] = (416, 1664),
                  trace_canvas: int = 448, verify_sizes: list[int] | None = None,
                  log: TextIO = sys.stderr) -> dict[str, Path]:
    """Export the ELoFTR graphs to `<out_dir>/<graph>.onnx` + `export.json`; returns {graph: path}."""
    import torch

    if opset < MIN_OPSET:
        raise ConfigError(f"opset {opset} is below the minimum {MIN_OPSET}")
    mult = pipeline.model_config.canvas_multiple
    if sizes[0] % mult or sizes[1] % mult or sizes[0] > sizes[1]:
        raise ConfigError(f"canvas range {sizes} must be multiples of {mult}, min <= max")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    graphs = pipeline.torch_graphs(state_dict, "cpu", full_conf=False)
    table = load_trt_op_table()
    files: dict[str, Path] = {}
    checks: dict[str, Any] = {}
    for name, module in graphs.items():
        ex = pipeline.example_inputs(name, trace_canvas, valid_hw=(trace_canvas - mult, trace_canvas))
        t0 = time.monotonic()
        path = out / f"{name}{ONNX_SUFFIX}"
        with tempfile.TemporaryDirectory() as tmp, torch.inference_mode(False), torch.no_grad():
            raw = Path(tmp) / f"{name}.onnx"
            io_names = (*module.input_names, *module.output_names)
            axes = {k: v for k, v in eloftr_dynamic_axes(name).items() if k in io_names}
            torch.onnx.export(module, tuple(ex[n] for n in module.input_names), str(raw), dynamo=False,
                              opset_version=opset, input_names=list(module.input_names),
                              output_names=list(module.output_names), dynamic_axes=axes, do_constant_folding=True)
            model = onnx.load(str(raw))
        set_metadata(model, eloftr_metadata(pipeline, name, checkpoint_sha256, sizes))
        external = save_model(model, path)
        checks[name] = check_onnx_file(path, table)
        checks[name]["external_data"] = external
        print(f"{name}: exported {path} ({path.stat().st_size / 1e6:.1f} MB{', external data' if external else ''}) "
              f"in {time.monotonic() - t0:.0f} s; checker, shape inference and TensorRT op list OK", file=log)
        files[name] = path
    verify = []
    if verify_sizes is None:
        verify_sizes = [sizes[0], min(sizes[1], sizes[0] + 3 * mult)]
    if verify_sizes:
        verify = _verify_eloftr(pipeline, graphs, files, verify_sizes, log)
    manifest = {
        "variant": "eloftr", "graphs": list(graphs), "dynamic": True, "opset": opset,
        "canvas_range": list(sizes), "checkpoint_sha256": checkpoint_sha256, "package_version": __version__,
        "trace_canvas": trace_canvas, "config": pipeline.model_config.to_dict(),
        "files": {g: {"file": p.name, "sha256": sha256_file(p), "bytes": p.stat().st_size, **checks[g]}
                  for g, p in files.items()},
        "verification": verify,
    }
    (out / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return files


PRODUCT_INPUTS = ("rgb0", "rgb1")  # uint8 [H,W,3] stage-2 RGB images (see product.EloftrProduct)
PRODUCT_OUTPUTS = ("matches",)  # float32 [1 + cap, 7]: header row + product.PRODUCT_COLUMNS rows


# An fp16 product export against the torch fp32 product (ONNX Runtime, the export's own check): at least this
# share of the common (i, j) matches within 1 px, and match counts within FP16_MAX_COUNT_DIFF. Measured with the
# bundled model (test_export_fp16.py): the reference fixtures' two 512² pairs 99.92 % / 99.94 % within 1 px
# (a few fine-level argmax flips, up to 7 px), counts 3546/3546 and 3549/3547; the demo photos at 320x256
# 100 %, 929/929. ONNX Runtime's CPU provider computes most fp16 nodes in fp32 (it inserts casts), so on the
# CPU this checks the graph and its fp16 weights; TensorRT computes in fp16 (validate on the GPU).
FP16_MIN_WITHIN_1PX = 0.95
FP16_MAX_COUNT_DIFF = 0.05


def compare_product_outputs(got: np.ndarray, expected: np.ndarray) -> dict[str, Any]:
    """Two `matches` outputs of the product graph (header row + rows of i, j, x0, y0, x1, y1, conf):
    counts, the common (i, j) matches, their keypoint/confidence differences."""
    def rows(m: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
        n = min(int(m[0, 0]), int(m[0, 2]))
        return {(int(r[0]), int(r[1])): r[2:] for r in m[1:n + 1]}

    a, b = rows(expected), rows(got)
    common = sorted(set(a) & set(b))
    kp = np.array([np.abs(a[k][:4] - b[k][:4]).max() for k in common]) if common else np.zeros(0)
    conf = np.array([abs(float(a[k][4] - b[k][4])) for k in common]) if common else np.zeros(0)
    n_ref = len(a)
    return {"count": len(b), "count_expected": n_ref, "common": len(common),
            "count_diff": abs(len(b) - n_ref) / max(n_ref, 1),
            "within_1px": float((kp <= 1.0).mean()) if len(kp) else 1.0,
            "kp_max": float(kp.max()) if len(kp) else 0.0, "conf_max": float(conf.max()) if len(conf) else 0.0}


def export_eloftr_product(pipeline: Any, state_dict: dict[str, "torch.Tensor"], path: str | Path, *,
                          image0: np.ndarray, image1: np.ndarray, checkpoint_sha256: str,
                          opset: int = DEFAULT_OPSET, precision: str = "fp32", log: TextIO = sys.stderr,
                          manifest: bool = False) -> dict[str, Any]:
    """The ELoFTR product graph (one model: uint8 images in, padded matches out) for the sizes of
    `image0`/`image1`, fixed-shape, verified with ONNX Runtime against torch fp32 on those images.

    `precision` "fp16": fp16 weights, the pipeline's fp32 islands (`pipeline.options.fp32_island`, see
    options.FP32_ISLANDS) with explicit Cast nodes at their borders, the matching head, selection and fine level
    in fp32, metadata `matchanything.precision` = "fp16" (TensorRT then builds it strongly typed, on 10 and
    11); verified against torch fp32 within FP16_MIN_WITHIN_1PX / FP16_MAX_COUNT_DIFF. "fp32": the same
    (i, j) list as torch.
    `manifest`: also write the directory's export manifest naming this file's graph (`out.stem`, "product"
    for the CLI), which `build-engine` and the engine lookup follow.
    Returns a report: the verification and what TensorRT's parser would refuse (`trt_unsupported_ops`:
    operators, their checkable restrictions and input types; recorded, not raised — empty today).
    """
    import onnxruntime as ort
    import torch

    from ..eloftr.product import EloftrProduct
    from ..eloftr.options import FP32_ISLANDS

    if opset < MIN_OPSET:
        raise ConfigError(f"opset {opset} is below the minimum {MIN_OPSET}")
    if precision not in ("fp32", "fp16"):
        raise ConfigError(f"export precision must be fp32 or fp16, got {precision!r}")
    reference = EloftrProduct(pipeline.build_net(state_dict), pipeline.threshold, pipeline.max_matches,
                              "dsmax").eval()
    rgb0, rgb1 = torch.from_numpy(np.ascontiguousarray(image0)), torch.from_numpy(np.ascontiguousarray(image1))
    with torch.inference_mode():
        expected = reference(rgb0, rgb1).numpy()
    module = reference
    if precision == "fp16":  # no autocast in an export: the casts into/out of the fp32 islands are in the graph
        net = pipeline.build_net(state_dict).store_half_weights(pipeline.options.fp32_island, explicit_casts=True)
        module = EloftrProduct(net, pipeline.threshold, pipeline.max_matches, "dsmax").eval()
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on the Python-int sizes, which are fixed here by design
        raw = Path(tmp) / "product.onnx"
        torch.onnx.export(module, (rgb0, rgb1), str(raw), dynamo=False, opset_version=opset,
                          input_names=list(PRODUCT_INPUTS), output_names=list(PRODUCT_OUTPUTS),
                          do_constant_folding=True)
        model = onnx.load(str(raw))
    meta = eloftr_metadata(pipeline, "product", checkpoint_sha256, (max(image0.shape[:2]), max(image1.shape[:2])))
    meta.update(dynamic_dims={}, image_shapes=[list(image0.shape), list(image1.shape)],
                threshold=pipeline.threshold, max_matches=pipeline.max_matches, precision=precision)
    if precision == "fp16":
        island = pipeline.options.fp32_island
        meta.update(fp32_island=island, fp32_modules=list(FP32_ISLANDS[island]),
                    fp32_parts=["matching head (similarity, dual softmax, top-k)", "selection", "fine level"])
    set_metadata(model, meta)
    save_model(model, out)
    try:
        onnx.checker.check_model(str(out), full_check=False)
        with tempfile.TemporaryDirectory() as tmp:
            onnx.shape_inference.infer_shapes_path(str(out), str(Path(tmp) / "inferred.onnx"), check_type=True,
                                                   strict_mode=True)
    except Exception as exc:  # checker / inference errors
        raise ExportCheckError(f"{out}: ONNX checks failed: {exc}") from exc
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"])
    got = session.run(None, {"rgb0": np.ascontiguousarray(image0), "rgb1": np.ascontiguousarray(image1)})[0]
    n = int(expected[0, 0])
    rows = min(n, int(expected[0, 2]))
    if precision == "fp16":
        cmp = compare_product_outputs(got, expected)
        err = cmp["kp_max"]
        print(f"product (fp16): exported {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.monotonic() - t0:.0f} "
              f"s; ONNX Runtime vs torch fp32: {cmp['count']} vs {cmp['count_expected']} matches, "
              f"{cmp['within_1px']:.1%} of {cmp['common']} common within 1 px (max {err:.2e} px)", file=log)
        if cmp["within_1px"] < FP16_MIN_WITHIN_1PX or cmp["count_diff"] > FP16_MAX_COUNT_DIFF:
            raise ExportCheckError(f"the fp16 product graph disagrees with torch fp32 beyond the fp16 rule "
                                   f"(>= {FP16_MIN_WITHIN_1PX:.0%} within 1 px, counts within "
                                   f"{FP16_MAX_COUNT_DIFF:.0%}): {cmp}")
    else:
        same_header = bool(np.array_equal(got[0, :3], expected[0, :3]))
        same_pairs = bool(np.array_equal(got[1:rows + 1, :2], expected[1:rows + 1, :2]))
        err = float(np.abs(got[1:rows + 1, 2:] - expected[1:rows + 1, 2:]).max()) if rows else 0.0
        print(f"product: exported {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.monotonic() - t0:.0f} s; "
              f"ONNX Runtime: {rows} matches, same list {same_pairs}, max keypoint/conf difference {err:.2e}",
              file=log)
        if not (same_header and same_pairs and err < 1e-2):
            raise ExportCheckError(f"ONNX Runtime disagrees with torch on the product graph: same count "
                                   f"{same_header}, same (i, j) list {same_pairs}, max difference {err:.3g}")
    saved = onnx.load(str(out), load_external_data=False)
    if manifest:  # the directory's export: `build-engine` builds this one graph (static profile)
        (out.parent / EXPORT_MANIFEST).write_text(json.dumps({
            "variant": "eloftr", "graphs": [out.stem], "dynamic": False, "opset": opset,
            "image_shapes": meta["image_shapes"], "threshold": pipeline.threshold,
            "max_matches": pipeline.max_matches, "precision": precision, "checkpoint_sha256": checkpoint_sha256,
            "package_version": __version__, "config": pipeline.model_config.to_dict()}, indent=1) + "\n")
    return {"file": str(out), "matches": rows, "max_abs_diff": err, "precision": precision,
            "trt_unsupported_ops": trt_unsupported_ops(saved) + trt_type_problems(saved)}


# --- RoMa ---------------------------------------------------------------------------------------------

ROMA_GP_SOLVER = "newton_schulz"  # fixed-count matrix products: no Inverse op, exports to ONNX and TensorRT
ROMA_GP_NODES = r"/gps\.16/"  # node names of the GP (kept in FP32 by fp16 engine builds)
# ORT vs torch: the RoMa parity tolerances (flows 1e-3 normalised; certainty = sigmoid of logits within 1e-2)
ROMA_VERIFY_TOL = {"warp": 1e-3, "certainty": 1e-2 / 4}


def roma_metadata(pipeline: Any, checkpoint_sha256: str, dinov2_sha256: str) -> dict[str, Any]:
    from dataclasses import asdict

    from ..roma.gp import newton_schulz_iterations

    cfg = pipeline.config
    c, u = cfg.coarse_res, cfg.upsample_res
    tokens = (c // 14) ** 2
    return {
        "variant": "roma",
        "graph": "dense",
        "graphs": list(pipeline.graphs),
        "package_version": __version__,
        "checkpoint_sha256": checkpoint_sha256,
        "dinov2_sha256": dinov2_sha256,
        "config": asdict(cfg),
        "static_shapes": {"coarse_res": c, "upsample_res": u},
        "gp": {"solver": ROMA_GP_SOLVER, "tokens": tokens, "iterations": newton_schulz_iterations(tokens)},
        "preprocessing": {
            "image0_coarse/image1_coarse": f"float32 [1,3,{c},{c}] RGB in [0,1], stretched (aspect not kept)",
            "image0_fine/image1_fine": f"float32 [1,3,{u},{u}] RGB in [0,1], stretched",
            "stage1": "see matchanything_ros.core.roma.preprocess (optional web-UI 640x480 stage, torchvision "
                      "antialiased bicubic, no ImageNet normalisation)",
            "outputs": f"warp [1,{u},{2 * u},4] (left half A->B, right half B->A, normalised coordinates), "
                       f"certainty [1,{u},{2 * u}]; sampling runs on the host",
        },
        "dynamic_dims": {},
        "fp32_layer_patterns": [ROMA_GP_NODES],
        "opset_min": MIN_OPSET,
    }


def _verify_roma(path: Path, inputs: dict[str, "torch.Tensor"], expected: dict[str, np.ndarray],
                 log: TextIO) -> dict[str, float]:
    """ONNX Runtime (CPU) on `path` vs the torch outputs `expected`; raises on mismatch."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {k: v.numpy() for k, v in inputs.items()}),
                   strict=True))
    del sess
    errs = {}
    for name, tol in ROMA_VERIFY_TOL.items():
        if got[name].shape != expected[name].shape:
            raise ExportCheckError(f"dense.{name}: ONNX shape {got[name].shape} != torch {expected[name].shape}")
        errs[name] = float(np.abs(got[name].astype(np.float64) - expected[name]).max())
    print("  verify: " + ", ".join(f"{k} max |diff| {v:.2e}" for k, v in errs.items()), file=log)
    bad = {k: v for k, v in errs.items() if not v <= ROMA_VERIFY_TOL[k]}
    if bad:
        raise ExportCheckError(f"ONNX Runtime disagrees with torch (tolerances {ROMA_VERIFY_TOL}): {bad}")
    return errs


def export_roma(pipeline: Any, state_dict: dict[str, "torch.Tensor"], out_dir: str | Path, *,
                checkpoint_sha256: str, dinov2_sha256: str = "", opset: int = DEFAULT_OPSET, verify: bool = True,
                external_data: bool | None = None, log: TextIO = sys.stderr) -> dict[str, Path]:
    """Export RoMa's "dense" graph with the static shapes of `pipeline.config` to `<out_dir>/dense.onnx`.

    The GP is the export-ready Newton-Schulz solve. `state_dict` as `RomaPipeline.load_weights` gives it
    (checkpoint + `dinov2.` keys). `external_data`: None = only when the graph reaches 2 GB. With `verify`,
    ONNX Runtime must reproduce torch (same solver) on seeded random images within the parity tolerances;
    the torch model is freed before the ONNX Runtime session is made (two copies of 1.7 GB otherwise)."""
    import gc

    import torch

    if opset < MIN_OPSET:
        raise ConfigError(f"opset {opset} is below the minimum {MIN_OPSET}")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"dense{ONNX_SUFFIX}"
    module = pipeline.torch_graphs(state_dict, "cpu", gp_solver=ROMA_GP_SOLVER)["dense"]
    gen = torch.Generator().manual_seed(0)
    inputs = {k: torch.rand(v.shape, generator=gen) for k, v in pipeline.example_inputs("dense").items()}
    t0 = time.monotonic()
    expected = _torch_outputs(module, inputs) if verify else {}
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "dense.onnx"
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # sizes turned into trace constants are the point of a static-shape graph, not a hazard
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(module, tuple(inputs[n] for n in module.input_names), str(raw), dynamo=False,
                              opset_version=opset, input_names=list(module.input_names),
                              output_names=list(module.output_names), do_constant_folding=True)
        del module
        gc.collect()
        model = onnx.load(str(raw))
    set_metadata(model, roma_metadata(pipeline, checkpoint_sha256, dinov2_sha256))
    size = proto_bytes(model)
    external = save_model(model, path, external_data)
    del model
    gc.collect()
    checks = check_onnx_file(path)
    if checks["op_counts"].get("Inverse"):
        raise ExportCheckError(f"{path}: the GP still has an Inverse op (TensorRT has none)")
    checks.update(external_data=external, proto_bytes=size)
    print(f"dense: exported {path} ({(size or 0) / 1e9:.2f} GB{', external data' if external else ''}) in "
          f"{time.monotonic() - t0:.0f} s; checker, shape inference and TensorRT op list OK", file=log)
    verification = _verify_roma(path, inputs, expected, log) if verify else {}
    cfg = pipeline.config
    manifest = {
        "variant": "roma", "graphs": ["dense"], "dynamic": False, "opset": opset,
        "static_shapes": {"coarse_res": cfg.coarse_res, "upsample_res": cfg.upsample_res},
        "gp_solver": ROMA_GP_SOLVER, "checkpoint_sha256": checkpoint_sha256, "dinov2_sha256": dinov2_sha256,
        "package_version": __version__,
        "files": {"dense": {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size, **checks}},
        "verification": [verification] if verification else [],
    }
    (out / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return {"dense": path}


__all__ = ["ExportCheckError", "check_onnx_file", "export_eloftr", "export_eloftr_product", "export_roma",
           "needs_external_data", "trt_type_problems", "trt_unsupported_ops"]
