"""`matchanything build-engine`: TensorRT engines (+ JSON sidecars) from a `matchanything export` directory.

Runs on the target machine (engines are bound to the GPU and TensorRT version). A one-graph export
(`export --image-size WxH`, ELoFTR's product model) gives one engine with the export's fixed shapes; a
--free-size export gives two, with the optimisation profile from --engine-min/opt/max-size (canvas side)
and --engine-max-matches. --precision fp16 on an fp16 export builds it strongly typed (TensorRT 10 and
11); on an fp32 export, weakly typed with softmax/similarity layers kept in FP32 (TensorRT 10 only). With
an empty --engine-file-path the engines go to the cache directory the tensorrt backend looks in by
default. Existing engines that still match are reused unless --force-engine-update.
"""
from __future__ import annotations

import argparse
import sys

from ..core.params import names
from . import add_param_args, param_values

# coarse_res/upsample_res: which RoMa export to find when --model-file-path is empty (its graph is static);
# every "engine"/"build" parameter, as the Matcher's engine lookup reads them (engines.build.engine_settings)
BUILD_PARAMS = ["variant", "checkpoint_path", "coarse_res", "upsample_res", "precision", *names("engine", "build")]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("build-engine", help="build TensorRT engines from an ONNX export (TensorRT 10/11)",
                                   description=__doc__.splitlines()[0] if __doc__ else None)
    add_param_args(parser, BUILD_PARAMS)
    parser.add_argument("--device-index", type=int, default=0, help="CUDA device to build for (default: 0)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..core.engines.build import build_engine_set, engine_settings
    from ..core.engines.cache import resolve_onnx_dir

    params = param_values(args, BUILD_PARAMS)
    onnx_dir = str(resolve_onnx_dir(params))
    engines = build_engine_set(onnx_dir, force=params["force_engine_update"], device_index=args.device_index,
                               log=sys.stderr, **engine_settings(params))
    for graph, path in engines.items():
        print(f"{graph}: {path}")
    first = next(iter(engines.values()))
    print("check it against torch fp32 on this GPU:\n  matchanything validate --backend tensorrt "
          f"--precision {params['precision']} --engine-file-path {first.parent} --model-file-path {onnx_dir} "
          "--device cuda --fixtures <dir of .npz pairs> (or --pair IMAGE0 IMAGE1)")
    return 0
