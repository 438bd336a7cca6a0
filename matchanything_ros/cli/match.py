"""`matchanything match IMG0 IMG1`: match one image pair, write JSON (original-pixel keypoints) and a PNG.

Flags for every matcher setting come from core/params.py. Short aliases: `--checkpoint` for
`--checkpoint-path`, `--dinov2` for `--dinov2-path`, `--force-resize WxH` for the two force-resize sizes.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..core.params import MATCHER_PARAM_NAMES
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
    parser.add_argument("--json", dest="json_out", metavar="OUT", help="write the matches as JSON")
    parser.add_argument("--png", dest="png_out", metavar="OUT", help="write a side-by-side drawing of the matches")
    parser.add_argument("--max-lines", type=int, default=500,
                        help="most matches drawn in the PNG, a spatially even sample (default: 500)")
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


def run(args: argparse.Namespace) -> int:
    from ..core.images import load_image
    from ..core.matcher import DEMO_MODEL_NOTICE, Matcher, MatcherConfig

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.force_resize:
        args.force_resize_width, args.force_resize_height = parse_force_resize(args.force_resize)
    params = param_values(args, MATCH_PARAMS)
    image0, image1 = load_image(args.image0), load_image(args.image1)
    with Matcher(MatcherConfig.from_params(params)) as matcher:
        result = matcher.match(image0, image1)
        info = matcher.info
    model = f"{DEMO_MODEL_NOTICE}, " if info["is_demo_model"] else ""
    summary = (f"{len(result)} matches ({model}{info['variant']}, {info['backend']} on {info['device']} "
               f"{info['precision']}; inference {result.timings_ms.get('inference', 0.0):.1f} ms)")
    if args.json_out:
        doc: dict[str, Any] = result.to_json_dict()
        doc.update({"image0": str(args.image0), "image1": str(args.image1), "matcher": info})
        Path(args.json_out).write_text(json.dumps(doc, indent=1))
    if args.png_out:
        import cv2

        from ..core.viz import draw_matches

        png = draw_matches(image0, image1, result.keypoints0, result.keypoints1, result.confidence,
                           max_lines=args.max_lines, title=f"{info['variant']} thr {info['threshold']:g}",
                           demo_model=info["is_demo_model"])
        if not cv2.imwrite(str(args.png_out), png[:, :, ::-1]):
            raise ConfigError(f"cannot write PNG {args.png_out}")
    print(summary, file=sys.stdout)
    return 0
