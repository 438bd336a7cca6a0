"""`matchanything match IMG0 IMG1`: match one image pair, write JSON (original-pixel keypoints) and a PNG.

Flags for every matcher setting come from core/params.py. Short aliases: `--checkpoint` for
`--checkpoint-path`, `--dinov2` for `--dinov2-path`, `--force-resize WxH` for the two force-resize sizes.
`--geometry essential` needs the cameras' intrinsics: `--K0`/`--K1` (fx,fy,cx,cy or the 9 entries of K,
row by row) or `--intrinsics FILE` (YAML or JSON: `K0:` and `K1:`, or one `K:` for both; or a ROS
camera_calibration file, whose `camera_matrix` serves both images).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import ConfigError
from ..core.params import MATCHER_PARAM_NAMES
from ..core.viz import DEFAULT_MAX_LINES
from . import add_param_args, param_values

MATCH_PARAMS = list(MATCHER_PARAM_NAMES)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "match", help="match two image files; write JSON and/or a PNG of the matches",
        description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("image0", help="first image file")
    parser.add_argument("image1", help="second image file")
    add_param_args(parser, MATCH_PARAMS)
    parser.add_argument("--checkpoint", dest="checkpoint_path", default=argparse.SUPPRESS,
                        help="alias of --checkpoint-path")
    parser.add_argument("--dinov2", dest="dinov2_path", default=argparse.SUPPRESS, help="alias of --dinov2-path")
    parser.add_argument("--force-resize", metavar="WxH", default=None,
                        help="force-resize both images to W x H in stage 1 (sets --force-resize-width/height)")
    parser.add_argument("--K0", metavar="FX,FY,CX,CY", default=None,
                        help="intrinsics of image0 for --geometry essential (or the 9 entries of K, row by row)")
    parser.add_argument("--K1", metavar="FX,FY,CX,CY", default=None,
                        help="intrinsics of image1 (default: those of image0)")
    parser.add_argument("--intrinsics", metavar="FILE", default=None,
                        help="YAML/JSON with K0 and K1 (or K for both), or a ROS camera_calibration YAML")
    parser.add_argument("--json", dest="json_out", metavar="OUT", help="write the matches as JSON")
    parser.add_argument("--png", dest="png_out", metavar="OUT", help="write a side-by-side drawing of the matches")
    parser.add_argument("--max-lines", type=int, default=DEFAULT_MAX_LINES,
                        help="most matches drawn in the PNG, a spatially even sample (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log which backend runs")
    parser.set_defaults(func=run)


def parse_force_resize(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--force-resize expects WxH (e.g. 640x480), got {text!r}") from None
    if w <= 0 or h <= 0:
        raise ConfigError(f"--force-resize sizes must be positive, got {text!r}")
    return w, h


def parse_camera_matrix(value: Any, what: str) -> np.ndarray:
    """fx,fy,cx,cy / 9 numbers (text or a list, flat or 3x3) -> a 3x3 camera matrix, or ConfigError."""
    try:
        numbers = np.asarray([float(v) for v in value.replace(";", ",").split(",")] if isinstance(value, str)
                             else value, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: expected fx,fy,cx,cy or 9 numbers, got {value!r}") from None
    if numbers.size == 4:
        fx, fy, cx, cy = numbers
        numbers = np.array([fx, 0.0, cx, 0.0, fy, cy, 0.0, 0.0, 1.0])
    if numbers.size != 9:
        raise ConfigError(f"{what}: expected fx,fy,cx,cy or 9 numbers, got {numbers.size} numbers")
    from ..core.geometry import check_intrinsics

    K, why = check_intrinsics(numbers.reshape(3, 3), what)
    if K is None:
        raise ConfigError(why)
    return K


def load_intrinsics(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(K0, K1) from a YAML/JSON file: K0 + K1, or K, or a ROS camera_calibration `camera_matrix`."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"--intrinsics {path}: cannot read it ({exc})") from None
    try:
        doc = json.loads(text)
    except ValueError:
        try:
            import yaml  # type: ignore[import-untyped]  # python3-yaml (ROS); a core-only install reads JSON
        except ImportError:
            raise ConfigError(f"--intrinsics {path}: not JSON, and PyYAML is not installed to read YAML") from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--intrinsics {path}: neither JSON nor YAML ({exc})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"--intrinsics {path}: expected a mapping with K0 and K1, K, or camera_matrix")
    if "K0" in doc and "K1" in doc:
        return (parse_camera_matrix(doc["K0"], f"{path}: K0"), parse_camera_matrix(doc["K1"], f"{path}: K1"))
    for key in ("K", "camera_matrix"):
        if key in doc:
            value = doc[key]["data"] if isinstance(doc[key], dict) and "data" in doc[key] else doc[key]
            K = parse_camera_matrix(value, f"{path}: {key}")
            return K, K
    raise ConfigError(f"--intrinsics {path}: no K0 and K1, K, or camera_matrix in it")


def intrinsics(args: argparse.Namespace) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(K0, K1) from --intrinsics and/or --K0/--K1 (flags override the file); K1 defaults to K0."""
    K0 = K1 = None
    if args.intrinsics:
        K0, K1 = load_intrinsics(args.intrinsics)
    if args.K0:
        K0 = parse_camera_matrix(args.K0, "--K0")
    if args.K1:
        K1 = parse_camera_matrix(args.K1, "--K1")
    elif args.K0 and not args.intrinsics:
        K1 = K0
    return K0, K1


def geometry_summary(result: Any) -> str:
    g = result.geometry
    if g is None:
        return ""
    verify_ms = result.timings_ms.get("verify", 0.0)
    if not g.found:
        return f"; no {g.model}: {g.reason}"
    return f"; {g.model}: {g.num_inliers} inliers of {len(g.inliers)} (verify {verify_ms:.1f} ms)"


def run(args: argparse.Namespace) -> int:
    from ..core.images import load_image
    from ..core.matcher import DEMO_MODEL_NOTICE, Matcher, MatcherConfig

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.force_resize:
        args.force_resize_width, args.force_resize_height = parse_force_resize(args.force_resize)
    params = param_values(args, MATCH_PARAMS)
    K0, K1 = intrinsics(args)
    if params["geometry"] == "essential" and (K0 is None or K1 is None):
        raise ConfigError("--geometry essential needs the cameras' intrinsics: --K0 (and --K1 if image1's camera "
                          "differs) or --intrinsics FILE")
    image0, image1 = load_image(args.image0), load_image(args.image1)
    with Matcher(MatcherConfig.from_params(params)) as matcher:
        result = matcher.match(image0, image1, K0, K1)
        info = matcher.info
    model = f"{DEMO_MODEL_NOTICE}, " if info["is_demo_model"] else ""
    summary = (f"{len(result)} matches ({model}{info['variant']}, {info['backend']} on {info['device']} "
               f"{info['precision']}; inference {result.timings_ms.get('inference', 0.0):.1f} ms"
               f"{geometry_summary(result)})")
    if args.json_out:
        doc: dict[str, Any] = result.to_json_dict()
        doc.update({"image0": str(args.image0), "image1": str(args.image1), "matcher": info})
        Path(args.json_out).write_text(json.dumps(doc, indent=1))
    if args.png_out:
        import cv2

        from ..core.viz import draw_matches

        title = f"{info['variant']} thr {info['threshold']:g}"
        geometry = result.geometry
        if geometry is not None and not geometry.found:
            title += f"  |  no {geometry.model}: {geometry.reason}"
        png = draw_matches(image0, image1, result.keypoints0, result.keypoints1, result.confidence,
                           max_lines=args.max_lines, title=title, demo_model=info["is_demo_model"],
                           inliers=result.inliers,
                           labels=(f"{geometry.model} inliers" if geometry else "inliers", "outliers"))
        if not cv2.imwrite(str(args.png_out), png[:, :, ::-1]):
            raise ConfigError(f"cannot write PNG {args.png_out}")
    print(summary, file=sys.stdout)
    return 0
