"""`matchanything export`: the variant's network -> ONNX graphs (checked, with metadata) in one directory.

ELoFTR: `<dir>/coarse.onnx` and `<dir>/fine.onnx` with a dynamic canvas side between
--engine-min-size and --engine-max-size (multiples of 32) and a dynamic match count, plus
`<dir>/export.json`. With an empty --model-file-path the directory is the cache location the
onnxruntime/tensorrt backends look in by default (derived from the checkpoint's sha256).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
                        help="skip the ONNX Runtime vs torch check at two canvas sizes (about a minute on a CPU)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..core.checkpoint import file_sha256, load_state_dict
    from ..core.export import default_model_dir, export_eloftr
    from ..core.matcher import resolve_eloftr_checkpoint
    from ..core.variants import pipeline_class

    params = param_values(args, EXPORT_PARAMS)
    if params["variant"] != "eloftr":
        raise ConfigError("export of RoMa is not available yet in this release (its static-shape graph with the "
                          "Newton-Schulz GP is prepared in core/roma but not wired to the exporter); use ELoFTR")
    path, model_config, is_demo = resolve_eloftr_checkpoint(params["checkpoint_path"])
    params["checkpoint_path"] = str(path)
    out_dir = Path(params["model_file_path"]) if params["model_file_path"] else default_model_dir(params, "eloftr")
    pipeline = pipeline_class("eloftr")({}, model_config)
    state = load_state_dict(path, "eloftr")
    torch.set_grad_enabled(False)
    files = export_eloftr(pipeline, state, out_dir, checkpoint_sha256=file_sha256(path), opset=args.opset,
                          sizes=(params["engine_min_size"], params["engine_max_size"]),
                          verify_sizes=None if args.verify else [], log=sys.stderr)
    print(f"exported {', '.join(str(p) for p in files.values())}" + (" (bundled demo model)" if is_demo else ""))
    print(f"next: matchanything build-engine --model-file-path {out_dir} --precision fp16   (on the target GPU)")
    return 0
