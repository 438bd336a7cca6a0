"""A camera pair's way onto the GPU: the torch backend's upload (`TorchBackend._upload`: each image copied into a
reused pinned buffer and sent asynchronously; larger than `upload_chunk_bytes`, in row blocks whose transfers
overlap the copy of the next block), timed until the last byte has landed on the device. Prints a table; needs
CUDA.

    . ./env.sh && python bench/upload_copy.py [--chunks 0,1,2,4] [--repeat 50]

--chunks: block sizes in MiB (0: one copy an image). "cold": a fresh pair each call, as a camera's new frame
(four pairs in turn: more than the CPU's caches hold at 1920x1080); "hot": the same pair again (what a
benchmark that matches one pair over and over sees). Medians of --repeat calls.
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


def upload_ms(backend: TorchBackend, width: int, height: int, repeat: int, hot: bool) -> float:
    rng = np.random.default_rng(0)
    frames = [{f"rgb{k}": rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for k in (0, 1)}
              for _ in range(1 if hot else 4)]
    static = [torch.empty((height, width, 3), dtype=torch.uint8, device=backend.torch_device) for _ in range(2)]
    times = []
    with torch.cuda.stream(backend.stream):
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
    parser.add_argument("--chunks", default="0,1,2,4", help="block sizes in MiB, comma-separated (0: whole images)")
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    chunks = [float(v) for v in args.chunks.split(",")]
    backends = {c: TorchBackend({}, "cuda", upload_chunk_bytes=int(c * (1 << 20))) for c in chunks}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; pair upload ms (copy into pinned + transfer), "
          f"median of {args.repeat}; columns: block MiB (0: whole image), cold / hot source")
    print(f"{'size':>10s} " + " ".join(f"{f'{c:g} cold':>8s} {f'{c:g} hot':>8s}" for c in chunks))
    for width, height in SIZES:
        cells = []
        for c in chunks:
            cells += [upload_ms(backends[c], width, height, args.repeat, hot) for hot in (False, True)]
        print(f"{width}x{height:<5d} " + " ".join(f"{ms:8.3f}" for ms in cells))
    for backend in backends.values():
        backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
