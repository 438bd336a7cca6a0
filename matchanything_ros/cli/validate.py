"""`matchanything validate`: run a backend and the torch fp32 reference on image pairs; compare per correspondence.

Example, after `matchanything build-engine` on the robot's GPU:
  matchanything validate --backend tensorrt --precision fp16 --device cuda --engine-file-path ENGINE_DIR \\
      --fixtures DIR_OF_NPZ --report validate.json
Exit code 0 when every pair meets the criteria (mean keypoint error <= 1 px, confidence
difference <= 0.01, match count within 5 %, confidence correlation > 0.95), 3 otherwise.
With --backend tensorrt it ends with a checklist (runtime, engines, loading, accuracy: PASS/FAIL
each, and the facts of the machine and the engines) to paste into an issue; exit code 4 when
TensorRT could not run at all.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

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
    from ..core.validate import format_table, load_pairs, write_report

    params = param_values(args, VALIDATE_PARAMS)
    if params["variant"] == "roma":
        params["sample_mode"] = "topk"  # correspondences need a deterministic sampler (same grid points)
    pairs = load_pairs([tuple(p) for p in args.pair], args.fixtures)
    if params["backend"] == "tensorrt":
        return _run_tensorrt_checklist(args, params, pairs)
    if args.reference_device == "cuda":
        _tf32_off()
    ref_params = dict(params, backend="torch", device=args.reference_device, precision="fp32")
    with Matcher(MatcherConfig.from_params(ref_params)) as ref, Matcher(MatcherConfig.from_params(params)) as test:
        report = _validate(ref, test, pairs)
    print(f"reference: torch fp32 on {report['reference']['device']}; test: {report['test']['backend']} on "
          f"{report['test']['device']} {report['test']['precision']}")
    print(format_table(report))
    if args.report:
        write_report(report, args.report)
        print(f"report: {args.report}", file=sys.stderr)
    return 0 if report["summary"]["passed"] else 3


def _tf32_off() -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _validate(ref: Any, test: Any, pairs: list) -> dict[str, Any]:
    from ..core.validate import validate_pairs

    report = validate_pairs((ref.pipeline, ref.backend), (test.pipeline, test.backend), pairs)
    report["reference"] = {"backend": ref.backend.name, "device": ref.backend.device,
                           "precision": ref.backend.precision}
    report["test"] = {"backend": test.backend.name, "device": test.backend.device,
                      "precision": test.backend.precision}
    report["matcher"] = test.info
    return report


def _run_tensorrt_checklist(args: argparse.Namespace, params: dict[str, Any], pairs: list) -> int:
    """validate --backend tensorrt: each stage a checklist step, so a failure says where it stopped."""
    from ..core.backends.factory import tensorrt_runtime_problem
    from ..core.errors import MatchAnythingError
    from ..core.matcher import Matcher, MatcherConfig
    from ..core.validate import CheckStep, engine_facts, format_checklist, format_table, platform_facts, write_report

    steps: list[CheckStep] = []
    facts = platform_facts()
    report: dict[str, Any] | None = None

    def finish(code: int) -> int:
        names = ("TensorRT runtime (tensorrt >= 10 and pycuda import)", "engines found, sidecars match this system",
                 "engines load and run (warm-up at the profile's opt shape)",
                 f"accuracy vs torch fp32 ({len(pairs)} pairs)")
        for name in names[len(steps):]:
            steps.append(CheckStep(name, None, "not run"))
        if report is not None and args.report:
            write_report({**report, "checklist": [vars(s) for s in steps], "facts": facts}, args.report)
        print(format_checklist(steps, facts))
        return code

    problem = tensorrt_runtime_problem()
    if problem is not None:
        steps.append(CheckStep("TensorRT runtime (tensorrt >= 10 and pycuda import)", False, problem))
        return finish(4)
    import tensorrt

    steps.append(CheckStep("TensorRT runtime (tensorrt >= 10 and pycuda import)", True,
                           f"TensorRT {tensorrt.__version__}"))
    try:
        test = Matcher(MatcherConfig.from_params(params))
    except MatchAnythingError as exc:  # no engine / stale engine / load failure: the message says which
        text = str(exc)
        found = "TensorRT backend unavailable" not in text
        steps.append(CheckStep("engines found, sidecars match this system", found, "yes" if found else text))
        if found:
            steps.append(CheckStep("engines load and run (warm-up at the profile's opt shape)", False, text))
        return finish(4)
    with test:
        steps.append(CheckStep("engines found, sidecars match this system", True, test.info["engine_file"]))
        steps.append(CheckStep("engines load and run (warm-up at the profile's opt shape)", True, test.backend.device))
        facts.update(engine_facts(test.backend))
        if args.reference_device == "cuda":
            _tf32_off()
        ref_params = dict(params, backend="torch", device=args.reference_device, precision="fp32")
        with Matcher(MatcherConfig.from_params(ref_params)) as ref:
            report = _validate(ref, test, pairs)
    print(format_table(report))
    s = report["summary"]
    steps.append(CheckStep(f"accuracy vs torch fp32 ({len(pairs)} pairs)", bool(s["passed"]),
                           f"{s['passed_pairs']}/{s['pairs']} pairs pass; jaccard min {s['jaccard_min']}, "
                           f"kp mean {s['kp_err_mean_px']} px, kp max {s['kp_err_max_px']} px, dconf max "
                           f"{s['conf_abs_max']}, count diff max {s['count_diff_pct_max']} %"))
    return finish(0 if s["passed"] else 3)
