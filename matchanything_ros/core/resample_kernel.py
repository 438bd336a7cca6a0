"""A separable resize's axis on a CUDA device as one Triton kernel: each output value a sum of taps in registers.

Used by ELoFTR's stage 1 (`eloftr/product.py`: the same sums and roundings as `product.replay_taps`, whose torch
ops cost a 1920x1080 camera pair ~50 kernels and 0.55 ms on an H100, against 0.06 ms here; 0.02-0.04 ms at the
smaller camera sizes; bench/stage1_device.py, H100, 2026-12-07) and by RoMa's stretch-resize (`roma/device_graph.py`:
a resize matrix's band, where a dense MatMul would sum the whole row). It folds in the uint8 -> float32 cast, the
division by 255 and, where asked, the final uint8 truncation. ELoFTR's bytes equal the torch form's on the CPU at
every camera size and preset (test_gpu.py); the torch form run on the GPU differed from both at every size measured
(a few values; not traced: torch's CUDA arithmetic is not the CPU's in every rounding).

Bit-exactness rests on three things, each written out: products and sums are rounded separately
(`enable_fp_fusion=False`: the compiler may not contract them into fused multiply-adds), except where the host
kernel itself fuses them (`tl.fma`: one rounding, as the host CPU's AVX2/AVX-512 kernel); and the division by
255 is IEEE round-to-nearest (`div_rn`), as numpy's and torch's.

Imported only where Triton is (`kernels.resample_kernel`): importing this module imports Triton. Under
TRITON_INTERPRET=1 the kernel runs on CPU tensors (checks by hand: with Triton 3.9's interpreter, whose `tl.fma`
rounds once, it gave `preprocess.stage2_rgb`'s bytes at every camera size and preset on our CPU).
"""
from __future__ import annotations

import math

import torch
import triton  # type: ignore[import-not-found, unused-ignore]
import triton.language as tl  # type: ignore[import-not-found, unused-ignore]

BLOCK = 1024  # output values per program


@triton.jit  # type: ignore[untyped-decorator, unused-ignore]
def resample_axis(src, dst, index, weight, total, length_out, length_in, inner,  # type: ignore[no-untyped-def]
                  TAPS: tl.constexpr, FMA: tl.constexpr, DIVIDE_FIRST: tl.constexpr, TO_U8: tl.constexpr,
                  DIVIDE_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """dst[o, k, i] = sum over t of f(src[o, index[k, t], i]) * weight[k, t], t in order; contiguous tensors
    seen as [outer, length, inner]. Program: BLOCK consecutive output values."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < total
    i = offs % inner
    k = (offs // inner) % length_out
    row = (offs // inner) // length_out * (length_in * inner) + i
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for t in tl.static_range(TAPS):
        s = tl.load(index + k * TAPS + t, mask=live, other=0)
        w = tl.load(weight + k * TAPS + t, mask=live, other=0.0)
        v = tl.load(src + row + s * inner, mask=live, other=0).to(tl.float32)
        if DIVIDE_FIRST:
            v = tl.math.div_rn(v, 255.0)
        if t == 0:
            acc = v * w
        elif FMA:
            acc = tl.fma(v, w, acc)
        else:
            acc = acc + v * w
    if TO_U8:
        if DIVIDE_LAST:
            acc = tl.math.div_rn(acc, 255.0)
        tl.store(dst + offs, (acc * 255.0).to(tl.uint8), mask=live)  # truncation, as astype(uint8)
    else:
        tl.store(dst + offs, acc, mask=live)


def resample(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, dim: int, fma: bool,
             divide_first: bool = False, to_u8: bool = False, divide_last: bool = False) -> torch.Tensor:
    """One axis of a separable resize of the contiguous tensor `x` (uint8 or float32): index int32 and weight
    float32 [out, T] on its device. `divide_first`: each source value is divided by 255 before its product;
    `to_u8`: the sums (divided by 255 first with `divide_last`) times 255, truncated to uint8."""
    dim = dim % x.dim()
    shape = list(x.shape)
    length_in, inner = shape[dim], math.prod(shape[dim + 1:])
    length_out, taps = int(index.shape[0]), int(index.shape[1])
    shape[dim] = length_out
    out = torch.empty(shape, dtype=torch.uint8 if to_u8 else torch.float32, device=x.device)
    total = out.numel()
    resample_axis[(-(-total // BLOCK),)](
        x, out, index, weight, total, length_out, length_in, inner, TAPS=taps, FMA=fma, DIVIDE_FIRST=divide_first,
        TO_U8=to_u8, DIVIDE_LAST=divide_last, BLOCK=BLOCK, enable_fp_fusion=False)
    return out
