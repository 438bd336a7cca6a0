"""The fused depthwise kernel of RoMa's CUDA speed form (core/roma/refiner_kernel.py), checked on the CPU.

The shift-and-add form is what the "inductor" mode compiles and what the Triton kernel computes; here it
must equal F.conv2d + bias + ReLU within fp32 rounding on each refiner's channel count (small spatial
sizes, odd sizes, sides below the kernel size, batch 2), and the refiner's fused block chain (each 1x1
conv's bias moved into the next block's kernel) must equal the plain blocks. The Triton kernel itself
runs only on the device (bench/roma_refiner_speed.py checks its max |delta| there; its --dry-run
runs it under TRITON_INTERPRET=1 where Triton is installed).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from matchanything_ros.core.roma.model import REFINER_DIMS, ConvRefiner, RomaNet, _fold_pairs
from matchanything_ros.core.roma.refiner_kernel import depthwise_bias_relu_shifted, resolve_mode

# (channels of each refiner scale, small spatial sizes): odd, even, non-square, sides under 5
SHAPES = [(REFINER_DIMS["16"][0], 5, 7), (REFINER_DIMS["8"][0], 9, 6), (REFINER_DIMS["4"][0], 11, 13),
          (REFINER_DIMS["2"][0], 17, 15), (REFINER_DIMS["1"][0], 33, 31), (REFINER_DIMS["4"][0], 3, 4),
          (REFINER_DIMS["1"][0], 1, 2)]


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
              input_bias: torch.Tensor | None = None) -> torch.Tensor:
    if input_bias is not None:
        x = x + input_bias.view(1, -1, 1, 1)
    return torch.relu(F.conv2d(x, w, b, padding=2, groups=x.shape[1]))


def random_conv(c: int, h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c, h, w, generator=g)
    weight = torch.randn(c, 1, 5, 5, generator=g) / 5
    return x, weight, torch.randn(c, generator=g) / 3, torch.randn(c, generator=g)


@pytest.mark.parametrize("c,h,w", SHAPES)
def test_shifted_equals_conv2d(c: int, h: int, w: int) -> None:
    x, weight, bias, _ = random_conv(c, h, w, seed=c * 1000 + h)
    got = depthwise_bias_relu_shifted(x, weight, bias)
    want = reference(x, weight, bias)
    assert got.shape == want.shape and got.dtype == torch.float32
    # 26 fp32 products summed in another order: a few ulps of the largest partial sums
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    assert (got == 0).float().mean() > 0.2  # the ReLU cut real negatives (the test would notice a missing ReLU)


@pytest.mark.parametrize("c,h,w", SHAPES[:3] + SHAPES[-2:])
def test_input_bias_belongs_to_the_input_not_its_padding(c: int, h: int, w: int) -> None:
    x, weight, bias, input_bias = random_conv(c, h, w, seed=c + h)
    got = depthwise_bias_relu_shifted(x, weight, bias, input_bias)
    torch.testing.assert_close(got, reference(x, weight, bias, input_bias), rtol=0, atol=4e-6)
    # adding the bias to the zero padding too would change every border pixel
    padded_wrong = torch.relu(F.conv2d(F.pad(x, (2, 2, 2, 2)) + input_bias.view(1, -1, 1, 1), weight, bias,
                                       groups=c))
    assert (got - padded_wrong).abs().max() > 1e-2


def test_half_input_accumulates_in_fp32_and_returns_half() -> None:
    x, weight, bias, input_bias = random_conv(REFINER_DIMS["4"][0], 12, 10, seed=5)
    got = depthwise_bias_relu_shifted(x.half(), weight.half(), bias.half(), input_bias.half())
    assert got.dtype == torch.float16
    want = reference(x.half().float(), weight.half().float(), bias.half().float(), input_bias.half().float())
    # one fp16 rounding of the result, no fp16 partial sums
    torch.testing.assert_close(got.float(), want, rtol=2**-10, atol=1e-6)


@pytest.mark.parametrize("scale", ["4", "1"])
def test_fused_block_chain_equals_the_refiner_blocks(scale: str) -> None:
    torch.manual_seed(int(scale))
    in_dim, emb_dim, radius = REFINER_DIMS[scale]
    refiner = ConvRefiner(in_dim, emb_dim, radius).eval()
    for blk in refiner.blocks():  # BatchNorm statistics that are not the identity
        bn = blk[1]
        assert isinstance(bn, torch.nn.BatchNorm2d)
        assert bn.running_mean is not None and bn.running_var is not None
        with torch.no_grad():
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    x = torch.randn(2, in_dim, 9, 11)
    with torch.no_grad():
        plain = refiner.hidden_blocks(refiner.block1(x))
        for blk in refiner.blocks():
            _fold_pairs(blk)
        fused = refiner._fused_blocks(x, "shifted")
    assert fused.abs().max() > 0
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)


def test_cpu_net_keeps_cudnn_form() -> None:
    net = RomaNet()
    net.fold_batchnorms()
    assert net.use_fused_depthwise("triton") is None  # the CPU path never takes the fused kernel
    assert all(r.fused_depthwise is None for r in net.decoder.conv_refiner.values())  # type: ignore[union-attr]
    assert resolve_mode(None, "cuda") is None
    with pytest.raises(ValueError):
        resolve_mode("winograd", "cuda")


def test_exponential_race_draws_what_torch_multinomial_draws() -> None:
    """The CUDA sampler's draws without host checks (sampling.exponential_race): the same indices as
    torch.multinomial without replacement from the same generator state, which it leaves in the same state."""
    from matchanything_ros.core.roma.sampling import exponential_race

    for seed, (n, k) in enumerate(((5000, 800), (100_000, 20_000), (30, 30))):
        g = torch.Generator().manual_seed(seed)
        w = torch.rand(n, generator=g)
        w = torch.where(w > 0.5, torch.ones_like(w), torch.where(w < 0.2, torch.zeros_like(w), w))  # as the sampler
        g1, g2 = torch.Generator().manual_seed(seed + 7), torch.Generator().manual_seed(seed + 7)
        drawn = torch.multinomial(w, k, replacement=False, generator=g1)
        raced = exponential_race(w, k, g2)
        assert torch.equal(drawn, raced)
        assert torch.equal(g1.get_state(), g2.get_state())


@pytest.mark.parametrize("scale", ["16", "4", "1"])
def test_padded_channels_change_nothing(scale: str) -> None:
    """The speed form's zero channels (ConvRefiner.pad_channels, for aligned 1x1-conv GEMMs): the refiner's
    output equals the unpadded one within fp32 rounding, with the plain blocks and the fused chain."""
    torch.manual_seed(10 + int(scale))
    in_dim, emb_dim, radius = REFINER_DIMS[scale]
    refiner = ConvRefiner(in_dim, emb_dim, radius).eval()
    for blk in refiner.blocks():
        _fold_pairs(blk)
    feat = in_dim - emb_dim - (2 * radius + 1) ** 2 * (radius > 0)
    f1, f2 = torch.randn(2, feat // 2, 7, 9), torch.randn(2, feat // 2, 7, 9)
    flow = torch.rand(2, 2, 7, 9) * 1.6 - 0.8
    with torch.no_grad():
        want = refiner(f1, f2, flow, 1.0)
        added = refiner.pad_channels(16)
        assert added > 0 and (in_dim + added) % 16 == 0
        assert refiner.pad_channels(16) == 0  # idempotent
        got = refiner(f1, f2, flow, 1.0)
        blocks_in = torch.randn(2, in_dim + added, 5, 6)
        blocks_in[:, in_dim:] = 0
        chain = refiner._fused_blocks(blocks_in, "shifted")
        plain = refiner.hidden_blocks(refiner.block1(blocks_in))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert chain[:, in_dim:].abs().max() == 0  # the extra channels stay exactly zero
    torch.testing.assert_close(chain, plain, rtol=1e-4, atol=1e-5)


def test_classes_last_flow_equals_the_original_order() -> None:
    """cls_to_flow_refine's CUDA form (softmax/argmax/gather over the last dimension) gives the original's
    flows, also where the argmax cell sits at either end of the 4096 classes (the clamped neighbours)."""
    from matchanything_ros.core.roma.model import cls_to_flow_refine

    g = torch.Generator().manual_seed(4)
    cls = torch.randn(2, 4096, 6, 7, generator=g) * 3
    cls[0, 0, 0, 0] = cls[1, 4095, 2, 3] = cls[0, 64, 5, 6] = 40.0  # argmax at both ends and next to a row end
    want = cls_to_flow_refine(cls, classes_last=False)
    got = cls_to_flow_refine(cls, classes_last=True)
    assert got.shape == want.shape == (2, 2, 6, 7)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert torch.equal(cls_to_flow_refine(cls), want)  # the CPU default keeps the original's order
