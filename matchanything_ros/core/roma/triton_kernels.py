"""Triton kernels of RoMa's CUDA speed form. Imported only where Triton is (`refiner_kernel.triton_available`):
importing this module imports Triton. Under TRITON_INTERPRET=1 they run on CPU tensors (checks by hand)."""
from __future__ import annotations

import triton  # type: ignore[import-not-found, unused-ignore]
import triton.language as tl  # type: ignore[import-not-found, unused-ignore]


@triton.jit  # type: ignore[untyped-decorator, unused-ignore]
def dw5_bias_relu(x_ptr, w_ptr, b_ptr, ib_ptr, y_ptr, C, H, W,  # type: ignore[no-untyped-def]
                  HAS_INPUT_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y = relu(depthwise_conv5x5(x + ib, zero padding 2) + b), fp32 accumulation; NCHW contiguous.
    Program (plane = batch * C + channel, tile of BLOCK pixels of that plane)."""
    plane = tl.program_id(0)
    tile = tl.program_id(1)
    c = plane % C
    hw = H * W
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    inside = offs < hw
    oy = offs // W
    ox = offs % W
    base = x_ptr + plane.to(tl.int64) * hw
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    ib = tl.load(ib_ptr + c).to(tl.float32)
    for ky in tl.static_range(5):
        iy = oy + (ky - 2)
        row_ok = inside & (iy >= 0) & (iy < H)
        for kx in tl.static_range(5):
            ix = ox + (kx - 2)
            m = row_ok & (ix >= 0) & (ix < W)
            v = tl.load(base + iy * W + ix, mask=m, other=0.0).to(tl.float32)
            if HAS_INPUT_BIAS:
                v = tl.where(m, v + ib, 0.0)  # the bias belongs to the input, not to its zero padding
            acc += v * tl.load(w_ptr + c * 25 + ky * 5 + kx).to(tl.float32)
    acc += tl.load(b_ptr + c).to(tl.float32)
    acc = tl.maximum(acc, 0.0)
    tl.store(y_ptr + plane.to(tl.int64) * hw + offs, acc.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["P"])  # type: ignore[untyped-decorator, unused-ignore]
def bias_relu_nhwc(x_ptr, b_ptr, scale_ptr, shift_ptr, P, C,  # type: ignore[no-untyped-def]
                   HAS_AFFINE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """In place: x = relu(affine(x + b)) over channels-last memory seen as [P pixels, C channels]; affine =
    y * scale + shift (an unfolded eval BatchNorm) where HAS_AFFINE; fp32 arithmetic. Program (tile of
    BLOCK_P pixels, tile of BLOCK_C channels): the channel vectors load once a program, no index division."""
    rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    m = (rows < P)[:, None] & c_ok[None, :]
    ptrs = x_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :]
    bias = tl.load(b_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
    v = tl.load(ptrs, mask=m, other=0.0).to(tl.float32) + bias[None, :]
    if HAS_AFFINE:
        v = v * tl.load(scale_ptr + cols, mask=c_ok, other=1.0)[None, :] + tl.load(shift_ptr + cols, mask=c_ok,
                                                                                  other=0.0)[None, :]
    tl.store(ptrs, tl.maximum(v, 0.0).to(x_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["n"])  # type: ignore[untyped-decorator, unused-ignore]
def kde(xt_ptr, out_ptr, n, neg_scale,  # type: ignore[no-untyped-def]
        BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """out[i] = sum_j exp(neg_scale * |x_i - x_j|^2) for the points x given as xt [4, n] fp32 contiguous (each
    coordinate a row: coalesced loads); BLOCK_I points a program. Each lane sums its own column of terms and
    the lanes are added once at the end, not after every tile of BLOCK_J points (the form before; the two not
    yet timed against each other on a GPU: bench/roma_stages.py)."""
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    mi = i < n
    a0 = tl.load(xt_ptr + i, mask=mi, other=0.0)
    a1 = tl.load(xt_ptr + n + i, mask=mi, other=0.0)
    a2 = tl.load(xt_ptr + 2 * n + i, mask=mi, other=0.0)
    a3 = tl.load(xt_ptr + 3 * n + i, mask=mi, other=0.0)
    acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    j0 = n * 0  # a while loop over a run-time int: Triton's interpreter cannot range() over a scalar argument
    while j0 < n:
        j = j0 + tl.arange(0, BLOCK_J)
        mj = j < n
        d = a0[:, None] - tl.load(xt_ptr + j, mask=mj, other=0.0)[None, :]
        d2 = d * d
        d = a1[:, None] - tl.load(xt_ptr + n + j, mask=mj, other=0.0)[None, :]
        d2 += d * d
        d = a2[:, None] - tl.load(xt_ptr + 2 * n + j, mask=mj, other=0.0)[None, :]
        d2 += d * d
        d = a3[:, None] - tl.load(xt_ptr + 3 * n + j, mask=mj, other=0.0)[None, :]
        d2 += d * d
        acc += tl.where(mj[None, :], tl.exp(d2 * neg_scale), 0.0)
        j0 += BLOCK_J
    tl.store(out_ptr + i, tl.sum(acc, axis=1), mask=mi)


@triton.jit(do_not_specialize=["P"])  # type: ignore[untyped-decorator, unused-ignore]
def window_dots(f1_ptr, f2_ptr, rows_ptr, out_ptr, P,  # type: ignore[no-untyped-def]
                C: tl.constexpr, NN: tl.constexpr, NNP: tl.constexpr, BLOCK_P: tl.constexpr,
                BLOCK_C: tl.constexpr):
    """out[p, k] = sum_c f1[p, c] * f2[rows[p, k], c] for p < P, k < NN, fp32 accumulation: each pixel's
    dot products with the f2 rows of its window, the window never written to memory (neighbouring pixels'
    windows overlap: their rows come from the caches). f1 [P, C], f2 [R, C] contiguous rows, rows [P, NN]
    int64; NNP = NN rounded up to a power of two. Program: BLOCK_P pixels, all their NN rows."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    k = tl.arange(0, NNP)
    m_pk = (p < P)[:, None] & (k < NN)[None, :]
    p64 = p.to(tl.int64)
    rows = tl.load(rows_ptr + p64[:, None] * NN + k[None, :], mask=m_pk, other=0)
    acc = tl.zeros([BLOCK_P, NNP], dtype=tl.float32)
    for c0 in tl.static_range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        c_ok = cc < C
        a = tl.load(f1_ptr + p64[:, None] * C + cc[None, :], mask=(p < P)[:, None] & c_ok[None, :],
                    other=0.0).to(tl.float32)
        v = tl.load(f2_ptr + rows[:, :, None] * C + cc[None, None, :], mask=m_pk[:, :, None] & c_ok[None, None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(a[:, None, :] * v, axis=2)
    tl.store(out_ptr + p64[:, None] * NN + k[None, :], acc, mask=m_pk)
