"""`matchanything export`: the variant's network -> ONNX graphs (checked, with metadata) in one directory.

ELoFTR with --image-size WxH (your camera's size; once for both cameras, or twice: image0 then image1),
or with a forced resize (--force-resize-width/height, --preset hf_space: then for any camera):
`<dir>/product.onnx`, the whole frame as ONE fixed-shape graph (uint8 RGB images in, the padded match
list out), for images of that size under the given --resize-max/--preset/force-resize, with --threshold
and --engine-max-matches built in. `build-engine` makes one engine of it; the onnxruntime backend runs it
(and refuses other image sizes, thresholds or caps with the command to re-export). This is the path for
a robot with a fixed camera. --precision fp16 writes it with fp16 weights and explicit fp32 islands, which
TensorRT builds strongly typed (TensorRT 10 and 11).

ELoFTR with --free-size: `<dir>/coarse.onnx` and `<dir>/fine.onnx` for images of any size (a dynamic
canvas side between --engine-min-size and --engine-max-size, multiples of 32, and a dynamic match count).
Without --image-size, a forced resize or --free-size, the export says which to choose.

RoMa: `<dir>/dense.onnx` with the static shapes of --coarse-res and --upsample-res (one export per pair
of sizes; needs --dinov2-path too) and the export-ready Newton-Schulz GP.

With an empty --model-file-path the directory is the cache location the onnxruntime/tensorrt backends
look in by default (derived from the checkpoint's sha256, and for RoMa the two sizes).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..core.errors import ConfigError
from . import add_param_args, param_values

EXPORT_PARAMS = ["variant", "checkpoint_path", "dinov2_path", "model_file_path", "engine_min_size",
                 "engine_max_size", "coarse_res", "upsample_res"]
# the product model's constants: its input sizes follow from the first four, its selection from threshold and
# engine_max_matches; precision: fp32, or fp16 weights with explicit fp32 islands
PRODUCT_PARAMS = ["preset", "resize_max", "force_resize_width", "force_resize_height", "threshold",
                  "engine_max_matches", "precision"]
CHOOSE_SIZE = ("matchanything export (ELoFTR) needs to know the image size: --image-size WxH (your camera's; "
               "repeat it for a second camera of another size) writes the one-graph model product.onnx, which "
               "build-engine makes one engine of — the path for a robot with a fixed camera; --free-size writes "
               "the two graphs (coarse.onnx + fine.onnx) for images of any size")


def _image_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 640x480, got {text!r}") from None
    if w < 32 or h < 32:
        raise argparse.ArgumentTypeError(f"image size {text!r}: each side must be >= 32 px")
    return w, h


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..core.engines.export import DEFAULT_OPSET, MIN_OPSET

    parser = subparsers.add_parser("export", help="export the network to ONNX (checked against TensorRT's op list)",
                                   description=__doc__.splitlines()[0] if __doc__ else None)
    add_param_args(parser, EXPORT_PARAMS + PRODUCT_PARAMS)
    parser.add_argument("--image-size", type=_image_size, action="append", default=[], metavar="WxH",
                        help="ELoFTR: export the one-graph product model for camera images of this size "
                             "(give it twice for two different cameras: image0, then image1)")
    parser.add_argument("--free-size", action="store_true",
                        help="ELoFTR: export the two graphs (coarse + fine) for images of any size (canvas "
                             "--engine-min-size..--engine-max-size) instead of one camera size's product model")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset (>= {MIN_OPSET}; default: {DEFAULT_OPSET})")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the ONNX Runtime vs torch check (ELoFTR: two canvas sizes; RoMa: its size; "
                             "about a minute on a CPU)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..core.checkpoint import load_state_dict
    from ..core.eloftr.pipeline import preprocess_settings
    from ..core.engines.cache import resolve_onnx_dir, sha256_file
    from ..core.engines.export import export_eloftr
    from ..core.bundled import resolve_eloftr_checkpoint
    from ..core.variants import pipeline_class

    params = param_values(args, EXPORT_PARAMS)
    if params["variant"] == "roma":
        if param_values(args, ["precision"])["precision"] != "fp32":
            raise ConfigError("RoMa exports in fp32 only (an fp16 RoMa engine: build-engine --precision fp16 on "
                              "TensorRT 10, which keeps the GP in fp32)")
        return run_roma(args, params)
    if params["variant"] != "eloftr":
        raise ConfigError(f"no ONNX export for variant {params['variant']!r}")
    path, model_config, is_demo = resolve_eloftr_checkpoint(params["checkpoint_path"])
    params["checkpoint_path"] = str(path)
    out_dir = resolve_onnx_dir(params)
    state = load_state_dict(path, "eloftr")
    product = param_values(args, PRODUCT_PARAMS)
    if args.free_size:
        if args.image_size:
            raise ConfigError("--free-size (two graphs, any image size) and --image-size (one camera size) "
                              "exclude each other")
        if product["precision"] != "fp32":
            raise ConfigError("--precision fp16 exports the one-graph product model only (--image-size WxH); "
                              "the --free-size graphs are fp32 (build-engine --precision fp16 on TensorRT 10)")
    # a forced resize makes every camera's images one size: the product model fits any camera
    elif args.image_size or preprocess_settings(product, model_config).force_resize_wh:
        return run_product(args, params, out_dir, path, model_config, state, is_demo)
    else:
        raise ConfigError(CHOOSE_SIZE)
    pipeline = pipeline_class("eloftr")({}, model_config)
    with torch.no_grad():  # scoped: the CLI runs in-process too (tests, scripts), where grad mode must survive
        files = export_eloftr(pipeline, state, out_dir, checkpoint_sha256=sha256_file(path), opset=args.opset,
                              sizes=(params["engine_min_size"], params["engine_max_size"]),
                              verify_sizes=None if args.verify else [], log=sys.stderr)
    print(f"exported {', '.join(str(p) for p in files.values())}" + (" (bundled demo model)" if is_demo else ""))
    print(f"next: matchanything build-engine --model-file-path {out_dir} --precision fp16   (on the target GPU)")
    return 0


def run_product(args: argparse.Namespace, params: dict[str, Any], out_dir: Any, path: Any, model_config: Any,
                state: Any, is_demo: bool) -> int:
    """ELoFTR's product model for --image-size: verified on the bundled real photos resized to that size."""
    import cv2
    import numpy as np
    import torch

    from ..core.eloftr.pipeline import EloftrPipeline
    from ..core.eloftr.preprocess import stage2_rgb
    from ..core.engines.cache import sha256_file
    from ..core.engines.export import export_eloftr_product
    from ..core.bundled import DATA_DIR

    if len(args.image_size) > 2:
        raise ConfigError("--image-size is given once (both images) or twice (image0, image1)")
    product = param_values(args, PRODUCT_PARAMS)
    pipeline = EloftrPipeline(product, model_config)
    given = args.image_size or [pipeline.settings.force_resize_wh]  # forced: any camera size gives that one
    sizes = given * (3 - len(given))
    with np.load(DATA_DIR / "demo_homography.npz") as z:
        photos = [z["image0"], z["image1"]]
    rgb = [stage2_rgb(cv2.resize(photo, size, interpolation=cv2.INTER_AREA), pipeline.settings)[0]
           for photo, size in zip(photos, sizes[:2], strict=True)]
    with torch.no_grad():
        report = export_eloftr_product(pipeline, state, out_dir / "product.onnx", image0=rgb[0], image1=rgb[1],
                                       checkpoint_sha256=sha256_file(path), opset=args.opset,
                                       precision=product["precision"], log=sys.stderr, manifest=True)
    if report["trt_unsupported_ops"]:
        print("TensorRT's parser would refuse:\n  " + "\n  ".join(report["trt_unsupported_ops"]), file=sys.stderr)
    print(f"exported {report['file']} ({product['precision']} product graph for images {sizes[0][0]}x{sizes[0][1]} "
          f"and {sizes[1][0]}x{sizes[1][1]}, threshold {pipeline.threshold}, at most {pipeline.max_matches} "
          "matches)" + (" (bundled demo model)" if is_demo else ""))
    print(f"next: matchanything build-engine --model-file-path {out_dir} --precision {product['precision']}   "
          "(on the target GPU: one engine)")
    return 0


def run_roma(args: argparse.Namespace, params: dict[str, Any]) -> int:
    """RoMa: one static `dense` graph for (coarse_res, upsample_res); --engine-*-size do not apply."""
    import torch

    from ..core.engines.cache import resolve_onnx_dir, sha256_file
    from ..core.engines.export import export_roma
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
