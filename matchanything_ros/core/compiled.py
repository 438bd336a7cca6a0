"""torch.compile with a way back: the compiled parts of the graphs (ELoFTR's features and fine level, the geometric
verifier's fit) run eager when compiling fails, and say why."""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import threading
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


class _CantSplitMend:
    """Inductor's CantSplit with its constructor's arguments defaulting to None while at least one compile in
    the process is inside `bare_cantsplit_caught` (counted: two threads compiling at once keep it until both
    are done), its own constructor back when none is."""

    def __init__(self, cls: Any, init: Any, n_required: int) -> None:
        self.cls, self.init = cls, init
        self.lock = threading.Lock()
        self.users = 0

        def init_with_defaults(exc: Any, *args: Any) -> None:
            init(exc, *args, *[None] * (n_required - len(args)))

        self.init_with_defaults = init_with_defaults

    def enter(self) -> None:
        with self.lock:
            if self.users == 0:
                self.cls.__init__ = self.init_with_defaults
            self.users += 1

    def leave(self) -> None:
        with self.lock:
            self.users -= 1
            if self.users == 0:
                self.cls.__init__ = self.init


@functools.cache
def _cantsplit_mend() -> _CantSplitMend | None:
    """The mend for this torch's Inductor CantSplit, or None when the class can be built bare already (or there
    is no Inductor, or the class moved)."""
    try:
        from torch._inductor.codegen.simd import CantSplit
    except Exception:  # noqa: BLE001
        return None
    init = CantSplit.__dict__.get("__init__")
    if init is None:
        return None
    required = [p for p in list(inspect.signature(init).parameters.values())[1:]
                if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return _CantSplitMend(CantSplit, init, len(required)) if required else None


@contextlib.contextmanager
def bare_cantsplit_caught() -> Iterator[None]:
    """While compiling: Inductor's tiler may construct its control-flow exception `CantSplit` without arguments
    (`raise CantSplit`, or on unpickling it from a compile worker) while the class's constructor requires two;
    the TypeError then escapes the tiler's own `except CantSplit` and the whole graph fails to compile (torch
    2.11 on an H100: ELoFTR's feature stack at 640x480 ran uncompiled, 7.98 instead of ~4.3 ms). Inside this
    block the arguments default to None, so the raise means what the tiler meant ("not this split: try
    another tiling"); the class is restored after, leaving torch as it was found."""
    mend = _cantsplit_mend()
    if mend is None:
        yield
        return
    mend.enter()
    try:
        yield
    finally:
        mend.leave()


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
