"""The compile-or-eager wrapper's mend for Inductor's `CantSplit`, which some torch versions build without
the two arguments its constructor requires (a bare `raise CantSplit` in the tiler, or unpickling it from a
compile worker): the TypeError escaped the tiler's `except CantSplit` and a whole graph ran uncompiled."""
from __future__ import annotations

import pickle

import pytest
import torch

from matchanything_ros.core.compiled import CompiledOrEager, bare_cantsplit_caught

simd = pytest.importorskip("torch._inductor.codegen.simd")
CantSplit = simd.CantSplit


def tiler_step() -> str:
    """What the tiler does: try a split, take another tiling when it cannot be made."""
    try:
        raise CantSplit
    except CantSplit:
        return "another tiling"


def test_bare_cantsplit_is_caught_as_the_tiler_means_inside_the_block() -> None:
    with bare_cantsplit_caught():
        assert tiler_step() == "another tiling"
        # from a compile worker: pickled there, rebuilt here without its arguments
        rebuilt = pickle.loads(pickle.dumps(CantSplit("s0", 32)))
        assert isinstance(rebuilt, CantSplit)
        assert str(CantSplit("s0", 32)) == "s0 not divisible by 32"  # built with arguments: as before


def test_torch_is_left_as_found() -> None:
    init = CantSplit.__init__
    with bare_cantsplit_caught():
        pass
    assert CantSplit.__init__ is init
    with pytest.raises(RuntimeError):
        with bare_cantsplit_caught():
            raise RuntimeError("a failing compile")
    assert CantSplit.__init__ is init
    # this torch's class requires the arguments outside the block (2.11 and 2.13 both do): the mend is needed
    with pytest.raises(TypeError, match="required positional argument"):
        tiler_step()


def test_compiled_part_runs_compiled_and_equals_eager() -> None:
    def scaled_softplus(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(x * 3.0) - x

    part = CompiledOrEager(scaled_softplus, dynamic=False)
    x = torch.linspace(-4, 4, 257)
    torch.testing.assert_close(part(x), scaled_softplus(x))
    assert part.fallback == ""


def test_overlapping_compiles_keep_the_mend_until_the_last_one_leaves() -> None:
    """Two threads compiling at once (two matchers built together): the first to finish must not take the
    mend from the other, which may still be in the tiler."""
    init = CantSplit.__init__
    first, second = bare_cantsplit_caught(), bare_cantsplit_caught()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert tiler_step() == "another tiling"  # the second is still compiling
    second.__exit__(None, None, None)
    assert CantSplit.__init__ is init
