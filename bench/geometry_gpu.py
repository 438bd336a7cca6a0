"""The batched torch verifier on the GPU against OpenCV's USAC_MAGSAC: agreement and time (prints a table).

    . ./env.sh && python bench/geometry_gpu.py                 # CUDA: eager and one CUDA-graph replay
    python bench/geometry_gpu.py --device cpu --sizes 5000     # the same code on the CPU (no graph)

Inputs: two-view scenes (40 % outliers, 0.3 px noise, a plane for the homography) with 5,000 and 10,000
matches, and the demo model's real matches (test/fixtures/geometry). `fit_padded` runs on fixed-shape
device tensors; on CUDA it is captured once in a CUDA graph (which fails if anything in it waits for the
host) and replayed ("graph"), and for the largest scenes also compiled with torch.compile (fullgraph) and
then captured ("compiled"; --no-compile skips it). Times: medians; OpenCV on the host CPU.
Target (issue 23): <= 1 ms on an H100/H200 for 10,000 matches in fp32.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "test"))

from matchanything_ros.core.geometry import (GeometryOptions, fundamental_from_essential, sampson_error,  # noqa: E402
                                             transfer_error, verify)
from matchanything_ros.core.geometry_torch import (DEFAULT_HYPOTHESES, TORCH_MINIMAL_SAMPLE, fit_padded,  # noqa: E402
                                                   padded_size, sample_tables)
from test_geometry import K_LEFT, K_RIGHT, two_view_scene  # noqa: E402

FIXTURE = REPO / "test" / "fixtures" / "geometry" / "demo_matches.npz"


def cases(sizes: list[int]) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    out = []
    for n in sizes:
        for model in ("homography", "fundamental", "essential"):
            k0, k1, _ = two_view_scene(n, outlier_share=0.4, seed=n, planar=model == "homography")
            out.append((f"scene {n}", model, k0, k1))
    with np.load(FIXTURE) as data:
        out.append(("coffee (real)", "homography", data["coffee_plain_k0"], data["coffee_plain_k1"]))
        out.append(("motorcycle (real)", "fundamental", data["motorcycle_k0"], data["motorcycle_k1"]))
    return out


def timed(fn, device: torch.device, repeat: int) -> float:  # type: ignore[no-untyped-def]
    """Median milliseconds of fn() (CUDA events on the GPU)."""
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_time(fn, reference, device: torch.device, repeat: int, what: str) -> float:  # type: ignore[no-untyped-def]
    """Capture fn() in a CUDA graph (which fails if anything in it waits for the host) and time its replay."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = fn()
        graph.replay()
        if not (torch.equal(captured[1], reference[1]) and torch.allclose(captured[0], reference[0], 1e-3, 1e-3)):
            print(f"  note: {what}: the graph's inliers or matrix differ from eager's")
        return timed(graph.replay, device, repeat)
    except Exception as exc:  # say what could not be captured
        print(f"  CUDA graph capture failed for {what}: {type(exc).__name__}: {exc}")
        return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="5000,10000")
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--hypotheses", type=int, default=DEFAULT_HYPOTHESES)
    parser.add_argument("--threshold", type=float, default=1.0)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    args = parser.parse_args()
    device = torch.device(args.device)
    repeat = args.repeat if device.type == "cuda" else max(3, args.repeat // 10)
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}"
          f", {args.hypotheses} hypotheses, threshold {args.threshold} px, fp32")
    header = (f"{'pair':18s} {'model':11s} {'matches':>7s} {'opencv ms':>9s} {'eager ms':>8s} {'graph ms':>8s} "
              f"{'compiled':>8s} {'inl cv':>6s} {'inl ours':>8s} {'jaccard':>7s} {'agreement':>22s}")
    print(header + "\n" + "-" * len(header))
    sizes = [int(v) for v in args.sizes.split(",")]
    for name, model, k0, k1 in cases(sizes):
        options = GeometryOptions(model, args.threshold, K0=K_LEFT, K1=K_RIGHT)
        cv_times = []
        for _ in range(3):
            t0 = time.perf_counter()
            cv = verify(k0, k1, options)
            cv_times.append((time.perf_counter() - t0) * 1e3)
        n, rows = len(k0), padded_size(len(k0))
        data = torch.zeros(rows, 4, device=device)
        data[:n] = torch.from_numpy(np.hstack([k0, k1])).float().to(device)
        count = torch.full((), n, dtype=torch.int64, device=device)
        samples, preview = sample_tables(args.hypotheses, TORCH_MINIMAL_SAMPLE[model], 0, device)
        kinv = ([torch.from_numpy(np.linalg.inv(K)).float().to(device) for K in (K_LEFT, K_RIGHT)]
                if model == "essential" else [None, None])

        def run() -> tuple[torch.Tensor, ...]:
            with torch.no_grad():
                return fit_padded(model, data[:, :2], data[:, 2:], count, samples, args.threshold, kinv[0], kinv[1],
                                  preview_u=preview)

        outputs = run()  # warm-up (and the reference for the graph)
        eager_ms = timed(run, device, repeat)
        graph_ms = compiled_ms = float("nan")
        if device.type == "cuda":
            graph_ms = graph_time(run, outputs, device, repeat, f"{name} {model}")
            if args.compile and name == f"scene {max(sizes)}":
                compiled = torch.compile(run, fullgraph=True, dynamic=False)
                compiled()  # compiles
                compiled_ms = graph_time(compiled, outputs, device, repeat, f"{name} {model} compiled")
        matrix, inliers, _, found = (t.cpu().numpy() for t in outputs)
        inliers, jac, agreement = inliers[:n], float("nan"), f"no model (ours {bool(found)}, cv {cv.found})"
        if found and cv.found:
            jac = float((inliers & cv.inliers).sum() / max((inliers | cv.inliers).sum(), 1))
            common = inliers & cv.inliers
            medians = [np.median(transfer_error(m, k0[common], k1[common]) if model == "homography" else
                                 sampson_error(m if model == "fundamental" else
                                               fundamental_from_essential(m, K_LEFT, K_RIGHT), k0[common], k1[common]))
                       for m in (matrix.astype(np.float64), cv.matrix)]
            agreement = f"median {'transfer' if model == 'homography' else 'sampson'} {medians[0]:.3f}/{medians[1]:.3f}"
        print(f"{name:18s} {model:11s} {n:7d} {statistics.median(cv_times):9.2f} {eager_ms:8.2f} {graph_ms:8.3f} "
              f"{compiled_ms:8.3f} {cv.num_inliers:6d} {int(inliers.sum()):8d} {jac:7.4f} {agreement:>22s}")
    print("agreement: ours/OpenCV on the matches both call inliers (pixels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
