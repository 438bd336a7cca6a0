"""`matchanything bag IN OUT`: match the image pairs of a rosbag2 (sqlite3 or mcap) into a new bag."""
from __future__ import annotations

import argparse
import json
import sys

from ..core.params import PARAMS
from ..ros.sync import SYNC_PARAMS
from . import add_param_args, param_values

# The node's settings minus max_input_age: offline, nothing is late.
BAG_PARAMS = [p.name for p in PARAMS if p.group != "node"] + list(SYNC_PARAMS)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bag", help="match the image pairs of a bag and write KeypointMatches to a new bag",
        description="Reads IN (rosbag2, sqlite3 or mcap), pairs two image topics (or consecutive frames in "
                    "sequential mode) exactly as matcher_node does, and writes KeypointMatches with the input "
                    "stamps to OUT. Deterministic: the same input and settings give the same output.")
    parser.add_argument("input", metavar="IN", help="input bag (directory or .mcap/.db3 file)")
    parser.add_argument("output", metavar="OUT", help="output bag directory (must not exist)")
    parser.add_argument("--image0", default=None, help="first image topic (default: the first of the bag's two "
                                                       "Image topics by name, or CompressedImage topics when the "
                                                       "bag has no Image topics)")
    parser.add_argument("--image1", default=None, help="second image topic (default: the second by name)")
    parser.add_argument("--output-topic", default="/matches", help="KeypointMatches topic in OUT")
    parser.add_argument("--debug-images", nargs="?", const="/debug_image", default="", metavar="TOPIC",
                        help="also write side-by-side debug images (default topic /debug_image)")
    parser.add_argument("--storage", choices=("sqlite3", "mcap"), default="", help="OUT storage (default: IN's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    add_param_args(parser, BAG_PARAMS)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..ros.bag import process_bag

    params = param_values(args, BAG_PARAMS)
    if params["variant"] == "roma" and params["sample_mode"] == "balanced" and params["sample_seed"] == -1:
        # The balanced sampler is random; a bag tool promises identical output on every run.
        params["sample_seed"] = 0
        print("note: RoMa balanced sampling seeded with 0 for a deterministic output (set --sample-seed)",
              file=sys.stderr)
    summary = process_bag(
        args.input, args.output, params, image0_topic=args.image0, image1_topic=args.image1,
        output_topic=args.output_topic, debug_topic=args.debug_images, storage=args.storage,
        progress=None if args.no_progress else sys.stderr)
    if args.json:
        print(json.dumps({k: v for k, v in summary.as_dict().items()}, indent=1))
    else:
        print(summary.text())
    return 0 if summary.pairs_matched else 1
