"""The refiner blocks' depthwise 5x5 conv + bias + ReLU as one fused kernel on CUDA (speed form only).

cuDNN runs the depthwise 5x5 conv of the ConvRefiners (channels 1377/1137/569/144/24, batch 2) far
from the memory-traffic floor, and PyTorch adds each conv's bias in a separate broadcast pass. Here
the conv, its bias, the ReLU after it and the bias of the 1x1 conv before it (`input_bias`: that conv
then runs without bias) are one pass over the tensor, accumulated in fp32 and cast back:

* "triton": a hand-written Triton kernel, one program per (batch x channel plane, tile of BLOCK
  pixels), 25 masked loads per output pixel (neighbours come from L1/L2);
* "inductor": the shift-and-add form below under `torch.compile(dynamic=False)`, which inductor fuses
  into one kernel per shape.

Both compile on their first call (the torch backend's eager warm-up), then launch on the current
stream, so a CUDA graph captures them. Where neither is available (torch without Triton, e.g. some
Jetson wheels) `resolve_mode` says so once in the log and the refiners keep cuDNN. The CPU path and
the parity path never use this module.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F

from .options import REFINER_BLOCK_MODES

log = logging.getLogger(__name__)

KERNEL = 5  # the refiner blocks' depthwise kernel size
PAD = KERNEL // 2
MODES = REFINER_BLOCK_MODES  # the refiner blocks' fused forms (options.py says what each is)
TRITON_BLOCK = 1024  # output pixels per Triton program (a few rows of one channel plane)
# dynamo keeps at most `recompile_limit` compiled shapes per function; the refiners have 9 (pass 1:
# 5 scales, pass 2: 4), each in one dtype
INDUCTOR_RECOMPILE_LIMIT = 32


def depthwise_bias_relu_shifted(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                input_bias: torch.Tensor | None = None) -> torch.Tensor:
    """relu(depthwise_conv5x5(x + input_bias, zero padding 2) + bias) by shift and add, in fp32, cast back.

    x [B, C, H, W]; weight [C, 1, 5, 5]; bias, input_bias [C]. The 25 taps are shifted slices of the
    zero-padded input times one weight per channel (F.conv2d's cross-correlation order)."""
    b, c, h, w = x.shape
    xf = x.float()
    if input_bias is not None:
        xf = xf + input_bias.float().view(1, c, 1, 1)
    xp = F.pad(xf, (PAD, PAD, PAD, PAD))
    wf = weight.float().reshape(c, KERNEL * KERNEL)
    acc = bias.float().view(1, c, 1, 1).expand(b, c, h, w)
    for ky in range(KERNEL):
        for kx in range(KERNEL):
            acc = acc + xp[:, :, ky:ky + h, kx:kx + w] * wf[:, ky * KERNEL + kx].view(1, c, 1, 1)
    return torch.relu(acc).to(x.dtype)


_triton_ok: bool | None = None


def triton_available() -> bool:
    """Whether Triton imports and our kernels (triton_kernels.py) define; decided once per process."""
    global _triton_ok
    if _triton_ok is None:
        try:
            from . import triton_kernels  # noqa: F401
            _triton_ok = True
        except Exception:  # noqa: BLE001 - any failure to import means no Triton here
            _triton_ok = False
    return _triton_ok


def depthwise_bias_relu_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                               input_bias: torch.Tensor | None = None) -> torch.Tensor:
    """`depthwise_bias_relu_shifted` by the Triton kernel (CUDA tensors; CPU ones under TRITON_INTERPRET=1)."""
    from .triton_kernels import dw5_bias_relu

    b, c, h, w = x.shape
    assert weight.shape == (c, 1, KERNEL, KERNEL), weight.shape
    x = x.contiguous()
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    grid = (b * c, -(-(h * w) // TRITON_BLOCK))
    dw5_bias_relu[grid](x, weight.contiguous(), bias.contiguous(), bias if input_bias is None else input_bias, y,
                        c, h, w, HAS_INPUT_BIAS=input_bias is not None, BLOCK=TRITON_BLOCK, num_warps=4)
    return y


def bias_relu_nhwc_(x: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor | None = None,
                    shift: torch.Tensor | None = None) -> torch.Tensor:
    """In place on a channels-last x [B, C, H, W]: relu((x + bias) * scale + shift), one pass over x
    (torch's broadcast add over channels-last memory runs a slow generic kernel: 14 ms a pair in the refiners,
    H200). scale/shift: fp32 [C], an unfolded eval BatchNorm (None: folded already). Returns x."""
    from .triton_kernels import bias_relu_nhwc

    assert x.is_contiguous(memory_format=torch.channels_last)
    c = x.shape[1]
    pixels = x.numel() // c
    block_c = min(64, max(16, 1 << (c - 1).bit_length()))
    block_p = NHWC_TILE // block_c
    grid = (-(-pixels // block_p), -(-c // block_c))
    bias_relu_nhwc[grid](x, bias, bias if scale is None else scale, bias if shift is None else shift, pixels, c,
                         HAS_AFFINE=scale is not None, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)
    return x


NHWC_TILE = 4096  # elements per program of bias_relu_nhwc (64 channels x 64 pixels, 128 B rows in fp16)

WINDOW_DOTS_TILE = 8192  # elements (pixels x window rows x channels) a program of window_dots loads per step


def window_dots(f1: torch.Tensor, f2: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """out[p, k] = <f1[p], f2[rows[p, k]]> in fp32: f1 [P, C], f2 [R, C], rows [P, K] int64 (CUDA tensors; CPU
    ones under TRITON_INTERPRET=1)."""
    from .triton_kernels import window_dots as kernel

    f1, f2, rows = f1.contiguous(), f2.contiguous(), rows.contiguous()
    p, c = f1.shape
    k = rows.shape[1]
    k_pow2 = 1 << (k - 1).bit_length()
    block_c = min(32, 1 << (c - 1).bit_length())
    block_p = max(1, WINDOW_DOTS_TILE // (k_pow2 * block_c))
    out = torch.empty(p, k, dtype=torch.float32, device=f1.device)
    kernel[(-(-p // block_p),)](f1, f2, rows, out, p, C=c, NN=k, NNP=k_pow2, BLOCK_P=block_p, BLOCK_C=block_c,
                                num_warps=4)
    return out


_inductor_fn: Callable[..., torch.Tensor] | None = None


def depthwise_bias_relu_inductor(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                 input_bias: torch.Tensor | None = None) -> torch.Tensor:
    """`depthwise_bias_relu_shifted` under torch.compile(dynamic=False): one fused kernel per shape."""
    global _inductor_fn
    if _inductor_fn is None:
        _inductor_fn = torch.compile(depthwise_bias_relu_shifted, dynamic=False)
    import torch._dynamo as dynamo

    # the limit only for these calls: the process's own torch.compile settings stay as they are
    name = "recompile_limit" if hasattr(dynamo.config, "recompile_limit") else "cache_size_limit"  # older torch
    with dynamo.config.patch(name, INDUCTOR_RECOMPILE_LIMIT):
        return _inductor_fn(x, weight, bias, input_bias)


KERNELS: dict[str, Callable[..., torch.Tensor]] = {"triton": depthwise_bias_relu_triton,
                                                   "inductor": depthwise_bias_relu_inductor,
                                                   "shifted": depthwise_bias_relu_shifted}

_said: set[str] = set()


def resolve_mode(mode: str | None, device: torch.device | str) -> str | None:
    """The fused-kernel mode that can run on `device` (None: cuDNN). Says once in the log when a mode
    asked for cannot run and the refiners fall back to cuDNN."""
    if mode is None or torch.device(device).type != "cuda":
        return None
    if mode not in MODES:
        raise ValueError(f"fused depthwise mode must be one of {MODES} or None, got {mode!r}")
    if mode == "shifted" or triton_available():  # inductor emits Triton kernels on CUDA too
        return mode
    if mode not in _said:
        _said.add(mode)
        log.warning("RoMa refiners: the fused depthwise conv (%s) needs Triton, which this torch lacks; "
                    "using cuDNN's depthwise conv", mode)
    return None


_runs_here: dict[tuple[str, str], bool] = {}


def kernel_runs_here(mode: str, device: torch.device | str) -> bool:
    """Run `mode`'s kernel ("window_dots" or a refiner-block mode) once on small tensors of `device` against
    the eager form; decided once per device (said once in the log where it fails: Triton may import yet have
    no kernel for this GPU). Asked before a kernel is first used, so a forward never has to fall back half way
    (the refiners hand their input over, freed once read)."""
    key = (mode, str(torch.device(device)))
    found = _runs_here.get(key)
    if found is None:
        found = _runs_here[key] = _smoke_test(mode, device)
    return found


def _smoke_test(mode: str, device: torch.device | str) -> bool:
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 16, 6, 6, generator=g).to(device)
        bias = torch.randn(16, generator=g).to(device)
        if mode == "window_dots":
            f1, f2 = x.reshape(16, 36).t(), torch.randn(40, 16, generator=g).to(device)  # [36 pixels, 16 channels]
            rows = torch.randint(0, 40, (36, 9), generator=g).to(device)
            got = window_dots(f1, f2, rows)
            want = torch.einsum("pc,pkc->pk", f1, f2[rows])
        elif mode == "cudnn_nhwc":
            got = bias_relu_nhwc_(x.contiguous(memory_format=torch.channels_last), bias)
            want = torch.relu(x + bias.view(1, -1, 1, 1))
        else:
            weight = torch.randn(16, 1, KERNEL, KERNEL, generator=g).to(device)
            got = fused_depthwise_bias_relu(mode, x, weight, bias)
            want = depthwise_bias_relu_shifted(x, weight, bias)
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            raise RuntimeError(f"max deviation {float((got - want).abs().max()):.3g} from the eager form")
        return True
    except Exception as exc:  # noqa: BLE001 - any failure means: not this kernel on this device
        if mode not in _said:
            _said.add(mode)
            log.warning("RoMa: the Triton kernel (%s) does not run here (%s: %s); using torch's form",
                        mode, type(exc).__name__, exc)
        return False


def fused_depthwise_bias_relu(mode: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                              input_bias: torch.Tensor | None = None) -> torch.Tensor:
    return KERNELS[mode](x, weight, bias, input_bias)
