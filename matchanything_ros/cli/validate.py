"""`matchanything validate`: run a backend and the torch fp32 reference on image pairs; compare per correspondence.

Example, after `matchanything build-engine` on the robot's GPU:
  matchanything validate --backend tensorrt --precision fp16 --device cuda --engine-file-path ENGINE_DIR \\
      --fixtures DIR_OF_NPZ --report validate.json
Exit code 0 when every pair meets the criteria (mean keypoint error <= 1 px, confidence
difference <= 0.01, match count within 5 %, confidence correlation > 0.95), 3 otherwise.
"""
from __future__ import annotations

import argparse
import sys

from ..core.params import DEVICES, MATCHER_PARAM_NAMES
from . import add_param_args, param_values

VALIDATE_PARAMS = list(MATCHER_PARAM_NAMES)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("validate", help="compare a backend with the torch fp32 reference "
                                   "(correspondence level, JSON report)",
                                   description=__doc__.splitlines()[0] if __doc__ else None,
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_param_args(parser, VALIDATE_PARAMS)
    parser.add_argument("--pair", nargs=2, action="append", metavar=("IMAGE0", "IMAGE1"), default=[],
                        help="an image pair (repeatable)")
    parser.add_argument("--fixtures", metavar="DIR", help="directory of .npz pairs (input_image0_rgb_u8/"
                        "input_image1_rgb_u8, the reference fixture format, or image0/image1)")
    parser.add_argument("--reference-device", choices=[d for d in DEVICES if d != "auto"], default="cpu",
                        help="device of the torch fp32 reference (default: cpu; cuda runs with TF32 off)")
    parser.add_argument("--report", metavar="OUT.json", help="write the JSON report here")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..core.matcher import Matcher, MatcherConfig
    from ..core.validate import format_table, load_pairs, validate_pairs, write_report

    params = param_values(args, VALIDATE_PARAMS)
    if params["variant"] == "roma":
        params["sample_mode"] = "topk"  # correspondences need a deterministic sampler (same grid points)
    pairs = load_pairs([tuple(p) for p in args.pair], args.fixtures)
    if args.reference_device == "cuda":
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    ref_params = dict(params, backend="torch", device=args.reference_device, precision="fp32")
    with Matcher(MatcherConfig.from_params(ref_params)) as ref, Matcher(MatcherConfig.from_params(params)) as test:
        report = validate_pairs((ref.pipeline, ref.backend), (test.pipeline, test.backend), pairs)
        report["reference"] = {"backend": ref.backend.name, "device": ref.backend.device,
                               "precision": ref.backend.precision}
        report["test"] = {"backend": test.backend.name, "device": test.backend.device,
                          "precision": test.backend.precision}
        report["matcher"] = test.info
    print(f"reference: torch fp32 on {report['reference']['device']}; test: {report['test']['backend']} on "
          f"{report['test']['device']} {report['test']['precision']}")
    print(format_table(report))
    if args.report:
        write_report(report, args.report)
        print(f"report: {args.report}", file=sys.stderr)
    return 0 if report["summary"]["passed"] else 3
