"""The batched torch verifier on the GPU against OpenCV's USAC_MAGSAC: agreement and time (prints a table).

    . ./env.sh && python bench/geometry_gpu.py                         # CUDA: eager, captured, compiled
    python bench/geometry_gpu.py --device cpu --sizes 10000 --repeat 10  # the same code on the CPU (no graph)

Inputs: two-view scenes (40 % outliers, 0.3 px noise, a plane for the homography) with 5,000 and 10,000
matches, and the demo model's real matches (test/fixtures/geometry). Every column is `TorchVerifier.verify`,
host arrays in, host verdict out (what the matcher's timings_ms["verify"] holds), the medians of --repeat
calls after the first: "eager" runs fit_padded op by op; "captured" replays it from a CUDA graph; "verify" is the
matcher's verifier, TorchVerifier() (on CUDA: torch.compile'd, fullgraph, fixed shapes, then captured; on the CPU:
eager; --no-compile: as captured), and "fit dev" its captured fit alone on the device (CUDA events around
back-to-back replays: no copies, no host work). "compile s": its first call (compile and capture), the stall of
the first frame of a model (later frames up to COMPILED_ROWS matches, at any threshold, reuse it). OpenCV on the
host CPU: "opencv ms" is the CPU path (`verify`: above geometry_usac_matches a fit on a spread subset, then every
match classified), "cv all ms" OpenCV on all matches, "J all" the Jaccard index of their inlier sets.
Targets (issue 23): <= 1 ms on an H100/H200 and <= 15 ms on the CPU for 10,000 matches in fp32.

    python bench/geometry_gpu.py --sizes 10000 --outliers 0,0.2,0.4 --opencv-only   # the CPU path only
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "test"))

from matchanything_ros.core.geometry import (GeometryOptions, fundamental_from_essential, sampson_error,  # noqa: E402
                                             transfer_error, verify)
from matchanything_ros.core.geometry_torch import DEFAULT_HYPOTHESES, TorchVerifier  # noqa: E402
from test_geometry import K_LEFT, K_RIGHT, two_view_scene  # noqa: E402

FIXTURE = REPO / "test" / "fixtures" / "geometry" / "demo_matches.npz"


def cases(sizes: list[int], outlier_shares: list[float],
          models: list[str]) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    out = []
    for n in sizes:
        for share in outlier_shares:
            for model in models:
                k0, k1, _ = two_view_scene(n, outlier_share=share, seed=n, planar=model == "homography")
                out.append((f"scene {n} {share:.0%}", model, k0, k1))
    with np.load(FIXTURE) as data:
        if "homography" in models:
            out.append(("coffee (real)", "homography", data["coffee_plain_k0"], data["coffee_plain_k1"]))
        if "fundamental" in models:
            out.append(("motorcycle (real)", "fundamental", data["motorcycle_k0"], data["motorcycle_k1"]))
    return out


def timed_ms(fn: Any, repeat: int) -> float:
    """Median wall-clock milliseconds of fn() (verify waits for the device: its verdict comes to the host)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="5000,10000")
    parser.add_argument("--outliers", default="0.4", help="outlier shares of the scenes (comma-separated)")
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--models", default="homography,fundamental,essential", help="comma-separated")
    parser.add_argument("--profile", action="store_true",
                        help="CUDA: then the compiled fit of each model at the largest size, uncaptured, under "
                             "torch.profiler: its kernel count and the kernels that take the most device time")
    parser.add_argument("--hypotheses", type=int, default=DEFAULT_HYPOTHESES)
    parser.add_argument("--threshold", type=float, default=1.0)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--opencv-only", action="store_true", help="time the CPU path only (no torch verifier)")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    print(f"device {torch.cuda.get_device_name(device) if cuda else 'cpu'}, torch {torch.__version__}"
          f", {args.hypotheses} hypotheses, threshold {args.threshold} px, fp32")
    product = TorchVerifier(device, args.hypotheses, compiled=args.compile if cuda and not args.opencv_only else False)
    verifiers = {"eager": TorchVerifier(device, args.hypotheses, compiled=False, cuda_graphs=False),
                 "captured": TorchVerifier(device, args.hypotheses, compiled=False) if cuda else None,
                 "verify": product}
    header = (f"{'pair':18s} {'model':11s} {'matches':>7s} {'opencv ms':>9s} {'cv all ms':>9s} {'J all':>6s} "
              f"{'eager ms':>8s} {'captured':>8s} {'verify ms':>9s} {'fit dev':>7s} {'compile s':>9s} {'inl cv':>6s} "
              f"{'inl ours':>8s} {'jaccard':>7s} {'agreement':>22s}")
    print(header + "\n" + "-" * len(header))
    sizes, models = [int(v) for v in args.sizes.split(",")], args.models.split(",")
    for name, model, k0, k1 in cases(sizes, [float(v) for v in args.outliers.split(",")], models):
        options = GeometryOptions(model, args.threshold, K0=K_LEFT, K1=K_RIGHT)
        on_all = GeometryOptions(model, args.threshold, usac_matches=len(k0), K0=K_LEFT, K1=K_RIGHT)
        cv_ms = timed_ms(lambda: verify(k0, k1, options), min(args.repeat, 15))
        cv_all_ms = timed_ms(lambda: verify(k0, k1, on_all), min(args.repeat, 15))
        cv, cv_all = verify(k0, k1, options), verify(k0, k1, on_all)
        assert cv is not None and cv_all is not None
        jac_all = float((cv.inliers & cv_all.inliers).sum() / max((cv.inliers | cv_all.inliers).sum(), 1))
        if args.opencv_only:
            print(f"{name:18s} {model:11s} {len(k0):7d} {cv_ms:9.2f} {cv_all_ms:9.2f} {jac_all:6.4f} {'-':>8s} "
                  f"{'-':>8s} {'-':>9s} {'-':>7s} {'-':>9s} {cv.num_inliers:6d}")
            continue
        ms: dict[str, float] = {}
        compile_s = float("nan")
        for what, verifier in verifiers.items():
            if verifier is None:
                ms[what] = float("nan")
                continue
            t0 = time.perf_counter()
            ours = verifier.verify(k0, k1, options)  # the first call: compile and capture (the verdict compared)
            if what == "verify":
                compile_s = time.perf_counter() - t0
            ms[what] = timed_ms(lambda: verifier.verify(k0, k1, options), args.repeat)  # noqa: B023
        device_ms = product.fit_device_ms(model, options.seed, len(k0), args.repeat) if cuda else None
        if product.compile_fallback:
            print(f"  note: compile fell back to eager: {product.compile_fallback}")
        assert ours is not None
        jac, agreement = float("nan"), f"no model (ours {ours.found}, cv {cv.found})"
        if ours.matrix is not None and cv.matrix is not None:
            jac = float((ours.inliers & cv.inliers).sum() / max((ours.inliers | cv.inliers).sum(), 1))
            common = ours.inliers & cv.inliers
            medians = [np.median(transfer_error(m, k0[common], k1[common]) if model == "homography" else
                                 sampson_error(m if model == "fundamental" else
                                               fundamental_from_essential(m, K_LEFT, K_RIGHT), k0[common], k1[common]))
                       for m in (ours.matrix, cv.matrix)]
            agreement = f"median {'transfer' if model == 'homography' else 'sampson'} {medians[0]:.3f}/{medians[1]:.3f}"
        print(f"{name:18s} {model:11s} {len(k0):7d} {cv_ms:9.2f} {cv_all_ms:9.2f} {jac_all:6.4f} {ms['eager']:8.2f} "
              f"{ms['captured']:8.3f} {ms['verify']:9.3f} {device_ms or float('nan'):7.3f} {compile_s:9.1f} "
              f"{cv.num_inliers:6d} {ours.num_inliers:8d} {jac:7.4f} {agreement:>22s}")
    print("agreement: ours (the product verifier)/OpenCV on the matches both call inliers (pixels)")
    if args.profile and cuda:
        for model in models:
            profile_fit(device, args, model, max(sizes))
    return 0


def profile_fit(device: torch.device, args: Any, model: str, n: int) -> None:
    """Where the compiled fit's device time goes: its kernels, launched one by one (no graph), counted and ranked."""
    from torch.profiler import ProfilerActivity, profile

    k0, k1, _ = two_view_scene(n, outlier_share=0.4, seed=n, planar=model == "homography")
    options = GeometryOptions(model, args.threshold, K0=K_LEFT, K1=K_RIGHT)
    verifier = TorchVerifier(device, args.hypotheses, compiled=True, cuda_graphs=False)
    for _ in range(3):
        verifier.verify(k0, k1, options)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        verifier.verify(k0, k1, options)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.device_time for e in kernels)
    print(f"\nprofile {model} {n}: {len(kernels)} device events, {total_us / 1e3:.3f} ms of device time in them")
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.device_time)
    ranked = sorted(by_name.items(), key=lambda item: -sum(item[1]))
    for name, times in ranked[:15]:
        print(f"  {sum(times):8.1f} us {len(times):4d}x  {name[:110]}")


if __name__ == "__main__":
    sys.exit(main())
