"""The ways to send a camera pair to the GPU, timed from the arrays to a finished copy.

A pair is two uint8 HxWx3 arrays in pageable memory, new arrays every frame as a ROS message gives them.

At 1920x1080 (12.4 MB a pair) the upload is the part of the end-to-end time that grows with the camera size;
this puts the ways to do it side by side on one machine (the matcher's default: "pageable"; its
`pinned_upload` option: "pinned"):

* pinned      copy both into pinned buffers, then both copies to the device
* overlapped  the first image's copy to the device runs while the second is copied into its pinned buffer
* pageable    copies straight from the arrays (the driver stages them through its own pinned buffers)
* registered  the arrays themselves pinned for the copy (cudaHostRegister), then unregistered
* threads=N   the copies into the pinned buffers split in N row blocks over N threads

    python3 bench/upload_paths.py [--size 1920x1080] [--runs 30]
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("upload_paths.py times copies to a CUDA GPU: torch finds none on this machine")
    w, h = (int(v) for v in args.size.split("x"))
    dev = torch.device("cuda")
    stream = torch.cuda.Stream()
    rng = np.random.default_rng(0)
    source = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(2)]
    pinned = [torch.empty((h, w, 3), dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    device = [torch.empty((h, w, 3), dtype=torch.uint8, device=dev) for _ in range(2)]
    cudart = torch.cuda.cudart()
    pools = {n: ThreadPoolExecutor(n) for n in (2, 4)}

    def pinned_way(images: list[np.ndarray]) -> None:
        for img, pin in zip(images, pinned):
            np.copyto(pin.numpy(), img)
        for pin, d in zip(pinned, device):
            d.copy_(pin, non_blocking=True)

    def overlapped(images: list[np.ndarray]) -> None:
        for img, pin, d in zip(images, pinned, device):
            np.copyto(pin.numpy(), img)
            d.copy_(pin, non_blocking=True)

    def pageable(images: list[np.ndarray]) -> None:
        for img, d in zip(images, device):
            d.copy_(torch.from_numpy(img), non_blocking=True)

    def registered(images: list[np.ndarray]) -> None:
        for img in images:
            assert int(cudart.cudaHostRegister(img.ctypes.data, img.nbytes, 0)) == 0
        for img, d in zip(images, device):
            d.copy_(torch.from_numpy(img), non_blocking=True)
        torch.cuda.current_stream().synchronize()
        for img in images:
            cudart.cudaHostUnregister(img.ctypes.data)

    def threaded(n: int) -> Callable[[list[np.ndarray]], None]:
        def run(images: list[np.ndarray]) -> None:
            jobs = []
            for img, pin in zip(images, pinned):
                rows = np.array_split(np.arange(h), n // 2 if n > 2 else 1)
                for r in rows:
                    jobs.append((pin.numpy()[r[0]:r[-1] + 1], img[r[0]:r[-1] + 1]))
            list(pools[n].map(lambda j: np.copyto(j[0], j[1]), jobs))
            for pin, d in zip(pinned, device):
                d.copy_(pin, non_blocking=True)
        return run

    ways: dict[str, Callable[[list[np.ndarray]], None]] = {
        "pinned": pinned_way, "overlapped": overlapped, "pageable": pageable, "registered": registered,
        "threads=2": threaded(2), "threads=4": threaded(4)}
    print(f"device {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, {w}x{h} pair "
          f"{2 * h * w * 3 / 1e6:.1f} MB, median of {args.runs}, new arrays each run")
    for name, way in ways.items():
        try:
            wall, cpu = time_way(way, source, stream, device, args.runs)
        except Exception as exc:  # noqa: BLE001  (a way this machine cannot take: say so, time the others)
            print(f"  {name:11s} failed: {type(exc).__name__}: {exc}")
            continue
        med = statistics.median(wall)
        print(f"  {name:11s} {med:6.3f} ms (p90 {sorted(wall)[int(0.9 * len(wall))]:6.3f}) host cpu "
              f"{statistics.median(cpu):6.3f} ms  {2 * h * w * 3 / med / 1e6:5.1f} GB/s")
    return 0


def time_way(way: Callable[[list[np.ndarray]], None], source: list[np.ndarray], stream: torch.cuda.Stream,
             device: list[torch.Tensor], runs: int) -> tuple[list[float], list[float]]:
    h = source[0].shape[0]
    wall: list[float] = []
    cpu: list[float] = []
    for i in range(runs + 3):
        images = [s.copy() for s in source]  # fresh pages, as a new message's
        torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.cuda.stream(stream):
            way(images)
        stream.synchronize()
        t1, c1 = time.perf_counter(), time.process_time()
        if i >= 3:
            wall.append((t1 - t0) * 1e3)
            cpu.append((c1 - c0) * 1e3)
        if not torch.equal(device[1][h // 2].cpu(), torch.from_numpy(images[1][h // 2])):
            raise AssertionError("the device buffer does not hold the image")
    return wall, cpu


if __name__ == "__main__":
    raise SystemExit(main())
