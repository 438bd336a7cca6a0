"""PyTorch backend: CPU fp32; CUDA fp32/fp16 on a dedicated stream.

fp16 = autocast: convolutions/matmuls in half, while the graphs themselves keep the dual softmax,
similarities and fine-level matching in float32 (they cast explicitly).

torch's numeric switches (cuDNN autotuning, TF32) are process-wide; a backend sets the ones its
precision needs only around its own runs (`numeric_flags`) and restores them after, so one matcher
never changes another's numerics or memory (an fp32 matcher after an fp16 one once autotuned its way
to 34 GB).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from ..device_wait import DEFAULT_HOST_WAIT, DeviceWait
from ..errors import BackendUnavailableError, ConfigError

log = logging.getLogger(__name__)


# torch's numeric switches per precision on CUDA, set for each run and restored after. fp32 is IEEE fp32
# (no TF32 anywhere: the parity bounds hold); fp16's fp32 islands run their convolutions in TF32, as
# measured for the fp16 promise. No cuDNN autotuning: it tried algorithms with up to 34 GB of workspace
# on an H200 for no measurable gain (2026-12-01, bench/results/README.md).
CUDA_NUMERICS: dict[str, dict[str, bool]] = {
    "fp32": {"cudnn_benchmark": False, "cudnn_tf32": False, "matmul_tf32": False},
    "fp16": {"cudnn_benchmark": False, "cudnn_tf32": True, "matmul_tf32": False},
}
@contextlib.contextmanager
def numeric_flags(device_type: str, precision: str) -> Iterator[None]:
    """Set torch's process-wide numeric switches for one run of this backend (CUDA_NUMERICS), restore them
    after: the result never depends on what the process set before. The CPU sets nothing."""
    if device_type != "cuda":
        yield
        return
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    wanted = CUDA_NUMERICS[precision]
    try:
        torch.backends.cudnn.benchmark = wanted["cudnn_benchmark"]
        torch.backends.cudnn.allow_tf32 = wanted["cudnn_tf32"]
        torch.backends.cuda.matmul.allow_tf32 = wanted["matmul_tf32"]
        yield
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_tf32) = saved


# GPU memory the warm-up of a capture may take beyond what the process holds (GiB). cuDNN picks each
# convolution's algorithm at its first run, among those whose workspace the allocator grants, and keeps it
# for the captures and replays. Unbounded, IEEE-fp32 convolutions on an H200 took an FFT algorithm with a
# 34 GB workspace that runs 2.5x slower (130 vs 52 ms a frame at 832²); bounded, cuDNN takes the implicit
# GEMM it takes on a device with less memory, such as a Jetson. Only the warm-up is bounded: the captures
# after it allocate their pools freely. A graph may ask for less (`warmup_headroom_gib`, e.g. RoMa fp32, whose
# cuDNN autotuning would otherwise take the memory): where its warm-up does not fit, it runs again with this.
WARMUP_MEMORY_HEADROOM_GIB = 6.0


@contextlib.contextmanager
def warmup_memory_cap(device: torch.device, headroom_gib: float = WARMUP_MEMORY_HEADROOM_GIB) -> Iterator[None]:
    if device.type != "cuda" or not headroom_gib:
        yield
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    saved = torch.cuda.get_per_process_memory_fraction(index)
    total = torch.cuda.get_device_properties(index).total_memory
    allowed = (torch.cuda.memory_reserved(index) + headroom_gib * 2**30) / total
    torch.cuda.set_per_process_memory_fraction(min(saved, allowed), index)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(saved, index)


def graph_input_names(module: torch.nn.Module) -> list[str]:
    """A graph's input names: its `input_names` attribute, else its forward() parameters."""
    names = getattr(module, "input_names", None)
    if names is None:
        names = [p for p in inspect.signature(module.forward).parameters]
    return list(names)


@dataclass
class _RowBuckets:
    """A row-bucketed graph's captures for one input size (TorchBackend._run_row_bucketed)."""
    state: tuple[torch.Tensor, ...]  # front's outputs (static buffers of its CUDA graph); the last is the header
    cap: int
    pool: Any  # the memory pool the back captures share
    # rows -> (captured back, its output, a pinned host buffer for it)
    backs: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    rows: int = 0  # the last frame's bucket: the next frame's guess
    header_host: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.header_host = torch.empty(self.state[-1].shape, dtype=self.state[-1].dtype, pin_memory=True)


class TorchBackend:
    name = "torch"

    def __init__(self, graphs: dict[str, torch.nn.Module], device: str = "cpu", precision: str = "fp32",
                 cuda_graphs: bool = True, keep_on_device: Iterable[str] = (), row_buckets: bool = True,
                 predict_rows: bool = True, host_wait: str = DEFAULT_HOST_WAIT, pinned_upload: bool = False) -> None:
        if precision not in ("fp32", "fp16"):
            raise ConfigError(f"precision must be fp32 or fp16, got {precision!r}")
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError("device cuda requested but torch finds no CUDA GPU")
        if dev.type == "cpu" and precision == "fp16":
            raise BackendUnavailableError("fp16 needs CUDA; use precision fp32 on the CPU")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.torch_device = dev
        self.device = str(dev)
        self.precision = precision
        self.graphs = {k: g.to(dev).eval() for k, g in graphs.items()}
        self.stream = torch.cuda.Stream(device=dev) if dev.type == "cuda" else None
        # outputs returned as device tensors (fed to a later graph or step): the pipeline's device_outputs
        self.keep_on_device: set[str] = set(keep_on_device)
        # CUDA graphs for graphs that support capture (fixed shapes, no host sync): one replay instead of
        # ~1000 kernel launches, which otherwise cost more CPU time than the GPU spends computing
        self.cuda_graphs = cuda_graphs and dev.type == "cuda"
        # captured graphs with a `rows_for` run in two halves (EloftrOptions.row_buckets), the back half on the
        # previous frame's bucket without waiting for the count (EloftrOptions.predict_rows)
        self.row_buckets, self.predict_rows = row_buckets, predict_rows
        self._captured: dict[tuple[Any, ...], tuple[Any, list[torch.Tensor], Any]] = {}
        # (graph, output, shape, dtype) -> pinned host buffer
        self._pinned: dict[tuple[str, str, tuple[int, ...], torch.dtype], torch.Tensor] = {}
        self._done: Any = torch.cuda.Event(blocking=True) if self.stream is not None else None
        self._uploaded: Any = torch.cuda.Event(blocking=True) if self.stream is not None else None
        # the host's waits for _done, one per site (device_wait: sleep, then spin; or the event's blocking wait)
        self.host_wait = host_wait
        self.pinned_upload = pinned_upload
        self._waits: dict[str, DeviceWait] = {}
        self._closed = False

    def _to_tensor(self, value: Any) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value.to(self.torch_device, non_blocking=True)
        return torch.from_numpy(np.ascontiguousarray(value)).to(self.torch_device, non_blocking=True)

    def run(self, graph: str, inputs: dict[str, Any]) -> dict[str, Any]:
        if self._closed:
            raise BackendUnavailableError("torch backend is closed")
        module = self.graphs[graph]
        names = graph_input_names(module)
        stream_ctx = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        autocast = (torch.autocast("cuda", dtype=torch.float16) if self.precision == "fp16"
                    else contextlib.nullcontext())
        with numeric_flags(self.torch_device.type, self.precision):
            if self.cuda_graphs and self.row_buckets and hasattr(module, "rows_for"):
                return self._run_row_bucketed(graph, module, names, inputs)  # its outputs come back on the host
            if self.cuda_graphs and hasattr(module, "capture_key"):
                outs = self._run_captured(graph, module, names, inputs)
            else:
                with torch.inference_mode(), stream_ctx, autocast:
                    args = [self._to_tensor(inputs[n]) for n in names]
                    outs = module(*args)
        if isinstance(outs, dict):
            items = list(outs.items())
        else:
            outs = (outs,) if isinstance(outs, torch.Tensor) else outs
            items = list(zip(getattr(module, "output_names"), outs))
        result: dict[str, Any] = {}
        if self.stream is None:
            for n, t in items:
                result[n] = t if n in self.keep_on_device else t.numpy()
            return result
        # CUDA: every host-bound output goes down by an async copy into a reused pinned buffer, on the
        # backend's stream after the graph; one synchronisation, then numpy copies of the small results
        pending: list[tuple[str, torch.Tensor]] = []
        with torch.inference_mode(), torch.cuda.stream(self.stream):
            for n, t in items:
                if n in self.keep_on_device:
                    result[n] = t
                    continue
                t = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
                host = self._pinned.get((graph, n, tuple(t.shape), t.dtype))  # one per row bucket too
                if host is None:
                    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                    self._pinned[(graph, n, tuple(t.shape), t.dtype)] = host
                host.copy_(t, non_blocking=True)
                pending.append((n, host))
            self._done.record(self.stream)
        self._wait_done("outputs")
        for n, host in pending:
            result[n] = host.numpy().copy()  # the pinned buffer is reused by the next run
        return result

    def _wait_done(self, site: str) -> None:
        """Wait for `_done` (recorded after the device work and the copies down) at one of the wait sites."""
        wait = self._waits.get(site)
        if wait is None:
            wait = self._waits[site] = DeviceWait(self.host_wait)
        wait.wait(self._done)

    def _autocast(self) -> Any:
        # the autocast weight cache must be off while capturing (its casts would be baked in as stale tensors)
        return (torch.autocast("cuda", dtype=torch.float16, cache_enabled=False) if self.precision == "fp16"
                else contextlib.nullcontext())

    def _entry(self, graph: str, module: Any, names: list[str], inputs: dict[str, Any], capture: Any) -> Any:
        """The captures for these inputs' shapes: found, or made by `capture(static input buffers)` (a new
        camera size drops the old ones: bounded memory)."""
        key = (graph, module.capture_key(inputs))
        entry = self._captured.get(key)
        if entry is None:
            if len(self._captured) >= 4:
                self._captured.clear()
            entry = self._captured[key] = capture([self._to_tensor(inputs[n]).clone() for n in names])
        return entry

    def _upload(self, graph: str, static: list[torch.Tensor], names: list[str], inputs: dict[str, Any]) -> None:
        """Host inputs into a captured graph's static buffers. By default straight from the arrays: the driver
        stages pageable memory through its own pinned buffers in pieces, sending each while it stages the next,
        and returns once the array may change (H100 host, 2026-12-07: a 1920x1080 pair 1.40 ms, 832² 0.31,
        against 1.83 / 0.43 through our pinned buffers; ELoFTR end to end 0.3-0.5 ms faster at 1920x1080,
        alternated runs). `pinned_upload`: numpy's copy into reused pinned buffers first, then one asynchronous
        copy each (the form before). Also measured and not taken, H100 hosts: 2-8 copying threads (faster alone
        at 1920x1080, slower end to end), row blocks of 1-4 MiB sent as each is copied (no faster), the arrays
        registered as pinned for the copy (cudaHostRegister: 1.33 ms at 1920x1080, 0.79 at 1280x720, slower
        there than pinned buffers)."""
        if self.pinned_upload:
            self._uploaded.synchronize()  # the previous upload has left the pinned buffers (normally long since)
        for buf, name in zip(static, names):
            value = inputs[name]
            if isinstance(value, torch.Tensor) and value.is_cuda:
                buf.copy_(value, non_blocking=True)
                continue
            host = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
            if not self.pinned_upload:
                buf.copy_(host, non_blocking=True)  # pageable: returns once staged (the array may then change)
                continue
            key = (graph, "in:" + name, tuple(host.shape), host.dtype)
            pinned = self._pinned.get(key)
            if pinned is None:
                pinned = self._pinned[key] = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
            # numpy's single-threaded copy: torch's CPU copy of a few MB runs on its OpenMP pool, whose
            # threads then spin-wait for ~all cores x the frame time (89 ms of CPU per 11 ms frame, H200 host)
            np.copyto(pinned.numpy(), host.numpy())
            buf.copy_(pinned, non_blocking=True)
        if self.pinned_upload:
            self._uploaded.record(torch.cuda.current_stream())

    def _run_captured(self, graph: str, module: Any, names: list[str], inputs: dict[str, Any]) -> Any:
        """Run `module` through a CUDA graph captured for these input shapes/masks (captured on first use).

        The outputs are the graph's static buffers: valid until the next run of the same graph.
        """
        assert self.stream is not None

        def capture(static: list[torch.Tensor]) -> tuple[Any, ...]:
            with module.static_crop(inputs):
                cuda_graph, outs = self._capture(module, tuple(static),
                                                 headroom_gib=getattr(module, "warmup_headroom_gib", None))
            return cuda_graph, static, outs

        with torch.inference_mode():
            cuda_graph, static, outs = self._entry(graph, module, names, inputs, capture)
            with torch.cuda.stream(self.stream):
                self._upload(graph, static, names, inputs)
                cuda_graph.replay()
        return outs

    def _capture(self, fn: Any, args: tuple[Any, ...], pool: Any = None,
                 headroom_gib: float | None = None) -> tuple[Any, Any]:
        """Warm `fn(*args)` up twice (cuDNN autotuning, compilation, lazy init), then capture it: (graph, outs).
        headroom_gib: the warm-up's memory bound beyond what the process holds (None: WARMUP_MEMORY_HEADROOM_GIB)."""
        assert self.stream is not None
        headroom = WARMUP_MEMORY_HEADROOM_GIB if headroom_gib is None else headroom_gib
        try:
            self._warm_up(fn, args, headroom)
        except torch.OutOfMemoryError:
            if headroom >= WARMUP_MEMORY_HEADROOM_GIB:
                raise
            log.warning("torch backend: the warm-up did not fit in %.2f GiB beyond what the process holds; "
                        "again with %.1f GiB", headroom, WARMUP_MEMORY_HEADROOM_GIB)
            torch.cuda.empty_cache()
            self._warm_up(fn, args, WARMUP_MEMORY_HEADROOM_GIB)
        # the warm-up's cached blocks are not reused by the capture's private pool: release them
        torch.cuda.empty_cache()
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph, stream=self.stream, pool=pool), self._autocast():
            outs = fn(*args)
        return cuda_graph, outs

    def _warm_up(self, fn: Any, args: tuple[Any, ...], headroom_gib: float) -> None:
        assert self.stream is not None
        with warmup_memory_cap(self.torch_device, headroom_gib), torch.cuda.stream(self.stream), self._autocast():
            for _ in range(2):
                fn(*args)
        self.stream.synchronize()

    def _run_row_bucketed(self, graph: str, module: Any, names: list[str], inputs: dict[str, Any]
                          ) -> dict[str, np.ndarray]:
        """A graph in two captured halves: `front` once per input shapes, `back` once per row bucket.

        `back` on the smallest bucket that holds a frame's rows costs what the frame's matches cost (the fine
        level costs per row, padded or not). Which bucket is known only after `front`, so `back` runs on
        the previous frame's bucket straight after `front` — one replay pair, one synchronisation — and
        only a frame with more rows than that runs the larger bucket after it (`predict_rows`; off: one
        synchronisation for the count in between, always). Every bucket is captured on the first frame of a
        size, so no later frame waits for a capture; the buckets share one memory pool (they run one at a
        time on one stream). Returns the outputs on the host.
        """
        assert self.stream is not None

        def capture_front(static: list[torch.Tensor]) -> tuple[Any, ...]:
            front_graph, state = self._capture(module.front, tuple(static))
            return front_graph, static, _RowBuckets(state, module.cap_of(module.stage2_shape(static[0])),
                                                    torch.cuda.graph_pool_handle())

        with torch.inference_mode():
            front_graph, static, rb = self._entry(graph, module, names, inputs, capture_front)
            with torch.cuda.stream(self.stream):
                self._upload(graph, static, names, inputs)
                front_graph.replay()
                rows = rb.rows if self.predict_rows else 0
                if rows:
                    host = self._replay_back(rb, rows)
                else:
                    host = rb.header_host
                    host.copy_(rb.state[-1], non_blocking=True)
                    self._done.record(self.stream)
            self._wait_done("front")
            # first frame of this size (or one whose captures failed part way): front's outputs now hold real
            # indices for the warm-ups
            for r in [r for r in module.row_buckets(rb.cap) if r not in rb.backs]:
                back_graph, matches = self._capture(lambda r=r: module.back(rb.state, r), (), rb.pool)
                rb.backs[r] = (back_graph, matches, torch.empty(matches.shape, dtype=matches.dtype, pin_memory=True))
            needed = module.rows_for(host[:1].numpy(), rb.cap)
            if module.over_cap(host[:1].numpy(), rb.cap):
                # more matches pass than the cap: front selected the first rows; select the most confident
                # (eager, on this frame only) and run the fine level on them
                with torch.cuda.stream(self.stream), self._autocast():
                    module.keep_most_confident(rb.state, rb.cap)
                    host = self._replay_back(rb, needed)
                self._wait_done("over_cap")
            elif needed > rows:  # the prediction was short (or there was none): the bucket that holds them all
                with torch.cuda.stream(self.stream):
                    host = self._replay_back(rb, needed)
                self._wait_done("back")
            rb.rows = needed
        return {module.output_names[0]: host.numpy().copy()}  # the pinned buffer is reused by the next frame

    def _replay_back(self, rb: "_RowBuckets", rows: int) -> torch.Tensor:
        """Replay the `rows` bucket and queue its outputs' copy down (on the current stream) -> pinned buffer."""
        back_graph, matches, host = rb.backs[rows]
        back_graph.replay()
        host.copy_(matches, non_blocking=True)
        self._done.record(self.stream)
        return host

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.graphs.clear()
        self._captured.clear()
        self._pinned.clear()
        self.stream = None
        if self.torch_device.type == "cuda":
            torch.cuda.empty_cache()
