"""`matchanything benchmark`: latency split, pairs/s and peak memory per backend and canvas size; JSON + PNG.

Sizes are canvas sides (ELoFTR: --resize-max per run, robot preset); backends are run in turn with
the --device/--precision given. Without --pair the bundled demo pair is used. With tensorrt among the
backends the output ends with the checklist to report back (docs/engines.md); a TensorRT configuration
that fails is a FAIL line there (exit status 4), the others still run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..core.params import BACKENDS, MATCHER_PARAM_NAMES
from . import add_param_args, param_values

BENCH_PARAMS = list(MATCHER_PARAM_NAMES)
DEMO_PAIR = Path(__file__).resolve().parent.parent / "data" / "demo_homography.npz"


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("benchmark", help="latency / throughput / memory per backend and size (JSON+PNG)",
                                   description=__doc__.splitlines()[0] if __doc__ else None)
    add_param_args(parser, BENCH_PARAMS)
    parser.add_argument("--backends", default=None,
                        help=f"comma-separated backends to run in turn (of {', '.join(BACKENDS[1:])}; "
                             "default: --backend)")
    parser.add_argument("--sizes", type=_int_list, default=None,
                        help="comma-separated canvas sides, e.g. 416,640,832 (ELoFTR; default: --resize-max)")
    parser.add_argument("--pair", nargs=2, action="append", metavar=("IMAGE0", "IMAGE1"), default=[],
                        help="an image pair (repeatable; runs cycle over the pairs)")
    parser.add_argument("--fixtures", metavar="DIR", help="directory of .npz pairs (as for validate)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (default: 3)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per configuration (default: 20)")
    parser.add_argument("--json", dest="json_out", default="benchmark.json", help="JSON output (default: %(default)s)")
    parser.add_argument("--png", dest="png_out", default="benchmark.png", help="PNG plot (default: %(default)s)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..core.benchmark import benchmark_config, configuration_label, format_table, write_report
    from ..core.matcher import Matcher, MatcherConfig
    from ..core.validate import benchmark_checklist, load_pairs

    params = param_values(args, BENCH_PARAMS)
    if args.runs < 1 or args.warmup < 0:
        raise ConfigError("--runs must be >= 1 and --warmup >= 0")
    backends = [b.strip() for b in (args.backends or params["backend"]).split(",") if b.strip()]
    for b in backends:
        if b not in BACKENDS:
            raise ConfigError(f"unknown backend {b!r}")
    if args.pair or args.fixtures:
        pairs = load_pairs([tuple(p) for p in args.pair], args.fixtures)
    else:
        pairs = _demo_pairs()
    # ELoFTR: one run per stage-1 size; RoMa's sizes are its coarse/upsample resolutions, one run
    sizes = (args.sizes or [params["resize_max"]]) if params["variant"] == "eloftr" else [
        f"{params['coarse_res']}/{params['upsample_res']}"]
    # with TensorRT in the list the run ends with the report-back checklist, and a configuration that fails
    # (no runtime, no engine, a build or run error) is a FAIL line in it instead of the end of the run
    checklist = "tensorrt" in backends
    configs: list[dict[str, Any]] = []
    failed: list[tuple[str, str]] = []
    for backend in backends:
        for size in sizes:
            run_params = dict(params, backend=backend)
            if params["variant"] == "eloftr":
                run_params["resize_max"] = size
            label = f"{backend} {params['device']} {params['precision']} @{size}"
            try:
                with Matcher(MatcherConfig.from_params(run_params)) as m:
                    base = f"{m.backend.name} {m.backend.device} {m.backend.precision}"
                    label = f"{base} @{size}"
                    print(f"benchmarking {label} ({args.warmup} warm-up + {args.runs} runs)", file=sys.stderr)
                    config = benchmark_config(m.pipeline, m.backend, pairs, warmup=args.warmup, runs=args.runs,
                                              label=label)
                    config["label"] = configuration_label(base, size, config["canvas"])  # the canvas that ran
                    configs.append(config)
            except Exception as exc:  # whatever TensorRT raises is what the user reports back
                if backend != "tensorrt":
                    raise
                why = f"{type(exc).__name__}: {exc}"
                print(f"{label} failed: {why}", file=sys.stderr)
                failed.append((label, why))
    if configs:
        print(format_table(configs))
    write_report(configs, args.json_out, args.png_out if configs else None, failures=failed)
    print(f"wrote {args.json_out}" + (f" and {args.png_out}" if configs else ""), file=sys.stderr)
    if checklist:
        print(benchmark_checklist(configs, failed))
    return 4 if failed else 0


def _demo_pairs() -> list:
    import numpy as np

    with np.load(DEMO_PAIR) as z:
        return [("demo_homography", z["image0"], z["image1"])]
