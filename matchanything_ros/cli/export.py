"""`matchanything export`: the variant's network -> ONNX graphs (checked, with metadata) in one directory.

ELoFTR: `<dir>/coarse.onnx` and `<dir>/fine.onnx` with a dynamic canvas side between
--engine-min-size and --engine-max-size (multiples of 32) and a dynamic match count, plus
`<dir>/export.json`. RoMa: `<dir>/dense.onnx` with the static shapes of --coarse-res and
--upsample-res (one export per pair of sizes; needs --dinov2-path too) and the export-ready
Newton-Schulz GP. With an empty --model-file-path the directory is the cache location the
onnxruntime/tensorrt backends look in by default (derived from the checkpoint's sha256, and for
RoMa the two sizes).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..core.errors import ConfigError
from . import add_param_args, param_values

EXPORT_PARAMS = ["variant", "checkpoint_path", "dinov2_path", "model_file_path", "engine_min_size",
                 "engine_max_size", "coarse_res", "upsample_res"]


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..core.export import DEFAULT_OPSET, MIN_OPSET

    parser = subparsers.add_parser("export", help="export the network to ONNX (checked against TensorRT's op list)",
                                   description=__doc__.splitlines()[0] if __doc__ else None)
    add_param_args(parser, EXPORT_PARAMS)
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset (>= {MIN_OPSET}; default: {DEFAULT_OPSET})")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the ONNX Runtime vs torch check (ELoFTR: two canvas sizes; RoMa: its size; "
                             "about a minute on a CPU)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..core.checkpoint import load_state_dict
    from ..core.engine_cache import sha256_file
    from ..core.export import export_eloftr, resolve_onnx_dir
    from ..core.matcher import resolve_eloftr_checkpoint
    from ..core.variants import pipeline_class

    params = param_values(args, EXPORT_PARAMS)
    if params["variant"] == "roma":
        return run_roma(args, params)
    if params["variant"] != "eloftr":
        raise ConfigError(f"no ONNX export for variant {params['variant']!r}")
    path, model_config, is_demo = resolve_eloftr_checkpoint(params["checkpoint_path"])
    params["checkpoint_path"] = str(path)
    out_dir = resolve_onnx_dir(params)
    pipeline = pipeline_class("eloftr")({}, model_config)
    state = load_state_dict(path, "eloftr")
    with torch.no_grad():  # scoped: the CLI runs in-process too (tests, scripts), where grad mode must survive
        files = export_eloftr(pipeline, state, out_dir, checkpoint_sha256=sha256_file(path), opset=args.opset,
                              sizes=(params["engine_min_size"], params["engine_max_size"]),
                              verify_sizes=None if args.verify else [], log=sys.stderr)
    print(f"exported {', '.join(str(p) for p in files.values())}" + (" (bundled demo model)" if is_demo else ""))
    print(f"next: matchanything build-engine --model-file-path {out_dir} --precision fp16   (on the target GPU)")
    return 0


def run_roma(args: argparse.Namespace, params: dict[str, Any]) -> int:
    """RoMa: one static `dense` graph for (coarse_res, upsample_res); --engine-*-size do not apply."""
    import torch

    from ..core.engine_cache import sha256_file
    from ..core.export import export_roma, resolve_onnx_dir
    from ..core.roma.pipeline import RomaPipeline

    pipeline = RomaPipeline(params)  # validates coarse_res / upsample_res before the weights are read
    state = pipeline.load_weights(params)  # both files, strictly; clear errors for missing paths
    out_dir = resolve_onnx_dir(params)
    with torch.no_grad():
        files = export_roma(pipeline, state, out_dir, checkpoint_sha256=sha256_file(params["checkpoint_path"]),
                            dinov2_sha256=sha256_file(params["dinov2_path"]), opset=args.opset, verify=args.verify,
                            log=sys.stderr)
    print(f"exported {files['dense']} (RoMa, coarse_res {pipeline.config.coarse_res}, upsample_res "
          f"{pipeline.config.upsample_res}; run the matcher with these two sizes)")
    print(f"next: matchanything build-engine --model-file-path {out_dir} --precision fp16   (on the target GPU)")
    return 0
