"""A camera pair's way onto the GPU: the torch backend's upload (`TorchBackend._upload`: each image copied into a
reused pinned buffer, then sent asynchronously), timed until the copy has landed on the device, with 1..8 host
copy threads (`upload_threads`). Prints a table; needs CUDA.

    . ./env.sh && python bench/upload_copy.py [--threads 1,2,4,8] [--repeat 50]

Each call gets fresh camera arrays (a driver's new frame is not in the CPU's caches), the median of --repeat.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matchanything_ros.core.backends.torch_backend import TorchBackend  # noqa: E402

SIZES = ((640, 480), (848, 480), (832, 832), (1024, 768), (1280, 720), (1920, 1080))


def upload_ms(backend: TorchBackend, width: int, height: int, repeat: int) -> float:
    rng = np.random.default_rng(0)
    frames = [{f"rgb{k}": rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for k in (0, 1)}
              for _ in range(4)]  # 4 distinct pairs in turn: more than the CPU's caches hold at 1920x1080
    static = [torch.empty((height, width, 3), dtype=torch.uint8, device=backend.torch_device) for _ in range(2)]
    times = []
    for i in range(repeat + 3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        backend._upload("bench", static, ["rgb0", "rgb1"], frames[i % len(frames)])
        backend._uploaded.synchronize()
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2,4,8")
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    threads = [int(v) for v in args.threads.split(",")]
    backends = {n: TorchBackend({}, "cuda", upload_threads=n) for n in threads}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; pair upload ms (copy into pinned + transfer), "
          f"median of {args.repeat}")
    print(f"{'size':>10s} " + " ".join(f"{f'{n} thr':>8s}" for n in threads))
    for width, height in SIZES:
        row = [upload_ms(backends[n], width, height, args.repeat) for n in threads]
        print(f"{width}x{height:<5d} " + " ".join(f"{ms:8.3f}" for ms in row))
    for backend in backends.values():
        backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
