"""torch.compile with a way back: the compiled parts of the graphs (ELoFTR's features and fine level, the geometric
verifier's fit) run eager when compiling fails, and say why."""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# The recompile limit of the fixed-shape parts (the product graph's feature stack and head, the verifier's fit):
# they compile once per shape (camera size and precision; verifier model and seed), and TorchDynamo counts a
# function's compilations for the whole process, so a process serving several passes torch's default of 8.
# Past this many a new one runs uncompiled, logged and shown in Matcher.info.
FIXED_SHAPE_COMPILES = 64


@functools.cache
def _cantsplit_needing_defaults() -> tuple[Any, Any, int] | None:
    """(Inductor's CantSplit class, its own __init__, how many arguments that requires) or None when it can be
    built bare already (or there is no Inductor, or the class moved)."""
    try:
        from torch._inductor.codegen.simd import CantSplit
    except Exception:  # noqa: BLE001
        return None
    init = CantSplit.__dict__.get("__init__")
    if init is None:
        return None
    required = [p for p in list(inspect.signature(init).parameters.values())[1:]
                if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return (CantSplit, init, len(required)) if required else None


@contextlib.contextmanager
def bare_cantsplit_caught() -> Iterator[None]:
    """While compiling: Inductor's tiler may construct its control-flow exception `CantSplit` without arguments
    (`raise CantSplit`, or on unpickling it from a compile worker) while the class's constructor requires two;
    the TypeError then escapes the tiler's own `except CantSplit` and the whole graph fails to compile (torch
    2.11 on an H100: ELoFTR's feature stack at 640x480 ran uncompiled, 7.98 instead of ~4.3 ms). Inside this
    block the arguments default to None, so the raise means what the tiler meant ("not this split: try
    another tiling"); the class is restored after, leaving torch as it was found."""
    found = _cantsplit_needing_defaults()
    if found is None:
        yield
        return
    cls, init, n_required = found

    def init_with_defaults(self: Any, *args: Any) -> None:
        init(self, *args, *[None] * (n_required - len(args)))

    cls.__init__ = init_with_defaults
    try:
        yield
    finally:
        cls.__init__ = init


class CompiledOrEager:
    """`torch.compile(fn)`, falling back to `fn` for good if compiling fails (e.g. a torch without Triton,
    as some Jetson wheels are), said once in the log. The first call is a warm-up run outside any CUDA
    graph capture, so the choice is made before a capture.

    `recompile_limit` (None: torch's, 8): how many compilations of fn's code a process keeps before falling
    back. TorchDynamo counts them per code object, so every instance wrapping the same function shares the
    count: a fixed-shape part compiled once per camera size and precision needs more than 8 in a process that
    serves several."""

    def __init__(self, fn: Any, dynamic: bool, fullgraph: bool = False, recompile_limit: int | None = None) -> None:
        self.fn = fn
        self.compiled: Any = torch.compile(fn, dynamic=dynamic, fullgraph=fullgraph)
        self.fallback = ""  # why this runs uncompiled ("" while compiled): Matcher.info shows it
        # a recompile limit hit raises instead of silently running eager from then on
        self._config: dict[str, Any] = {"fail_on_recompile_limit_hit": True}
        if recompile_limit is not None:
            self._config["recompile_limit"] = int(recompile_limit)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                with torch._dynamo.config.patch(**self._config), bare_cantsplit_caught():
                    return self.compiled(*args, **kwargs)
            except torch.OutOfMemoryError:
                raise  # not a compiler failure: the eager function would need the memory too
            except Exception as exc:  # noqa: BLE001  (any compiler failure: the eager function is the same maths)
                name = getattr(self.fn, "__name__", str(self.fn))
                self.fallback = f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                log.warning("torch.compile of %s failed (%s); running it uncompiled", name, self.fallback)
                log.debug("torch.compile of %s: where it failed", name, exc_info=True)  # for a bug report
                self.compiled = None
        return self.fn(*args, **kwargs)


def compile_fallbacks(module: Any) -> list[str]:
    """The `CompiledOrEager` parts of a graph (attributes of it and of its submodules) that fell back to eager."""
    if not isinstance(module, nn.Module):
        return []
    return [v.fallback for m in module.modules() for v in vars(m).values()
            if isinstance(v, CompiledOrEager) and v.fallback]
