"""One CUDA worker thread: primary context, a dedicated stream, reusable pinned/device buffers (pycuda; no torch).

Why a worker thread: a ROS 2 executor calls back on whatever thread it likes, and pycuda objects
only work in a thread where their context is current (the classic "pycuda in a ROS callback"
`LogicError` / "context stack was not empty"). Every CUDA call of the TensorRT backend therefore
runs on this one thread: it retains the device's *primary* context (the one the CUDA runtime,
TensorRT and PyTorch share, so no second context competes for memory), pushes it for each task
and pops it afterwards, owns one non-blocking stream, and frees everything it allocated on the
same thread at `close()`.

Buffers are keyed by name; each holds a page-locked host buffer and a device buffer sized for the
largest request so far, so steady-state inference allocates nothing.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import numpy as np

from ..errors import BackendUnavailableError, MatchAnythingError

T = TypeVar("T")

# CU_STREAM_NON_BLOCKING: the stream does not synchronise with the legacy default stream,
# so other CUDA users in the process (torch, another node) do not serialise with it.
_STREAM_NON_BLOCKING = 1


def import_pycuda() -> Any:
    """`pycuda.driver`, or a BackendUnavailableError that says how to get it."""
    try:
        import pycuda.driver as cuda
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise BackendUnavailableError(
            "the TensorRT backend needs pycuda (pip install pycuda; it builds against your CUDA toolkit): "
            f"{exc}") from exc
    return cuda


@dataclass
class _Buffer:
    host: np.ndarray  # flat page-locked uint8 array of `capacity` bytes
    device: Any  # pycuda DeviceAllocation of `capacity` bytes
    capacity: int


class BufferPool:
    """Named page-locked host + device buffer pairs, grown on demand and otherwise reused."""

    def __init__(self, cuda: Any) -> None:
        self._cuda = cuda
        self._buffers: dict[str, _Buffer] = {}
        self._device_only: dict[str, tuple[Any, int]] = {}  # name -> (DeviceAllocation, capacity)
        self.allocations = 0  # how many (host, device) pairs were allocated in total

    def get(self, name: str, shape: tuple[int, ...], dtype: np.dtype | type) -> tuple[np.ndarray, int]:
        """A host array view of `shape`/`dtype` over the pinned buffer `name`, and the device pointer."""
        dt = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        buf = self._buffers.get(name)
        if buf is None or buf.capacity < nbytes:
            if buf is not None:
                self._free_one(buf)
            capacity = max(nbytes, 256)  # never a zero-size allocation (cuMemAlloc rejects 0)
            buf = _Buffer(self._cuda.pagelocked_empty(capacity, np.uint8), self._cuda.mem_alloc(capacity), capacity)
            self._buffers[name] = buf
            self.allocations += 1
        view = buf.host[:nbytes].view(dt).reshape(shape)
        return view, int(buf.device)

    def get_device(self, name: str, shape: tuple[int, ...], dtype: np.dtype | type) -> int:
        """Device pointer of a device-only buffer `name` (no pinned twin: its data never comes to the host)."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        held = self._device_only.get(name)
        if held is None or held[1] < nbytes:
            if held is not None:
                held[0].free()
            held = (self._cuda.mem_alloc(max(nbytes, 256)), max(nbytes, 256))
            self._device_only[name] = held
            self.allocations += 1
        return int(held[0])

    @property
    def bytes_allocated(self) -> int:
        return sum(b.capacity for b in self._buffers.values()) + sum(n for _, n in self._device_only.values())

    def _free_one(self, buf: _Buffer) -> None:
        buf.device.free()
        allocation: Any = buf.host.base  # pycuda PagelockedHostAllocation
        allocation.free()

    def free(self) -> None:
        for buf in self._buffers.values():
            self._free_one(buf)
        self._buffers.clear()
        for device, _ in self._device_only.values():
            device.free()
        self._device_only.clear()


class CudaWorker:
    """A thread that owns the CUDA context, stream and buffers; `call(fn)` runs fn(worker) on it.

    Inside `fn` the primary context is current; use `stream`, `buffers`, `upload`, `download`.
    Calls from any thread are serialised; exceptions raised in `fn` are re-raised in the caller.
    """

    def __init__(self, device_index: int = 0, thread_name: str = "matchanything-cuda") -> None:
        self._cuda = import_pycuda()
        self.device_index = device_index
        self._tasks: queue.Queue[tuple[Callable[[CudaWorker], Any], Future[Any]] | None] = queue.Queue()
        self._ready: Future[None] = Future()
        self._closed = False
        self._lock = threading.Lock()
        self.stream: Any = None
        self.buffers: BufferPool = BufferPool(self._cuda)
        self.device_name = ""
        self.compute_capability: tuple[int, int] = (0, 0)
        self.driver_version = 0
        self._thread = threading.Thread(target=self._main, name=thread_name, daemon=True)
        self._thread.start()
        self._ready.result()  # re-raises a failed initialisation here, in the constructing thread

    # --- worker thread -------------------------------------------------------------------------
    def _main(self) -> None:
        cuda = self._cuda
        try:
            cuda.init()
            if self.device_index >= cuda.Device.count():
                raise BackendUnavailableError(
                    f"CUDA device {self.device_index} requested but only {cuda.Device.count()} present")
            device = cuda.Device(self.device_index)
            self.device_name = device.name()
            self.compute_capability = tuple(device.compute_capability())  # type: ignore[assignment]
            context = device.retain_primary_context()
            context.push()
            try:
                self.stream = cuda.Stream(flags=_STREAM_NON_BLOCKING)
                self.driver_version = int(cuda.get_driver_version())
            finally:
                cuda.Context.pop()
        except BaseException as exc:  # noqa: BLE001 - handed to the constructing thread
            self._ready.set_exception(exc if isinstance(exc, MatchAnythingError)
                                      else BackendUnavailableError(f"CUDA initialisation failed: {exc}"))
            return
        self._ready.set_result(None)
        while True:
            item = self._tasks.get()
            if item is None:
                break
            fn, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            context.push()
            try:
                fut.set_result(fn(self))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
                fut.set_exception(exc)
            finally:
                cuda.Context.pop()
        # teardown, on this thread with the context current: buffers, then the stream, then our
        # reference to the primary context (it is destroyed when its last user releases it)
        context.push()
        try:
            if self.stream is not None:
                self.stream.synchronize()
            self.buffers.free()
            self.stream = None
        finally:
            cuda.Context.pop()
            context.detach()

    def _check_thread(self) -> None:
        if threading.current_thread() is not self._thread:
            raise MatchAnythingError("CUDA work must run on the worker thread: use CudaWorker.call(fn)")

    # --- helpers for fn (worker thread only) ---------------------------------------------------------
    def upload(self, name: str, array: np.ndarray) -> int:
        """Stage `array` in the pinned buffer `name`, copy it to the device asynchronously; device pointer."""
        self._check_thread()
        array = np.ascontiguousarray(array)
        host, dev = self.buffers.get(name, array.shape, array.dtype)
        host[...] = array
        if host.nbytes:
            self._cuda.memcpy_htod_async(dev, host, self.stream)
        return dev

    def device_buffer(self, name: str, shape: tuple[int, ...], dtype: np.dtype | type) -> int:
        """Device pointer of buffer `name` sized for shape/dtype (e.g. an output)."""
        self._check_thread()
        return self.buffers.get(name, shape, dtype)[1]

    def download(self, name: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        """Queue an async device->host copy of buffer `name`; the returned pinned view is valid after
        `synchronize()` and until the buffer's next use (copy it to keep it)."""
        self._check_thread()
        host, dev = self.buffers.get(name, shape, dtype)
        if host.nbytes:
            self._cuda.memcpy_dtoh_async(host, dev, self.stream)
        return host

    def synchronize(self) -> None:
        self._check_thread()
        self.stream.synchronize()

    def memory_info(self) -> tuple[int, int]:
        """(free, total) device bytes."""
        self._check_thread()
        free, total = self._cuda.mem_get_info()
        return int(free), int(total)

    # --- any thread ---------------------------------------------------------------------------------
    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def call(self, fn: Callable[["CudaWorker"], T]) -> T:
        """Run fn(worker) on the worker thread with the context current; return its result."""
        if threading.current_thread() is self._thread:
            return fn(self)  # already inside a task (nested helper call)
        with self._lock:
            if self._closed:
                raise MatchAnythingError("CUDA worker is closed")
            fut: Future[T] = Future()
            self._tasks.put((fn, fut))
        return fut.result()

    def close(self) -> None:
        """Free buffers and the stream, release the context, stop the thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._tasks.put(None)
        self._thread.join()

    def __enter__(self) -> "CudaWorker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def gpu_identity(device_index: int = 0) -> tuple[str, str]:
    """(GPU name, "major.minor" compute capability) of a device, without creating a context."""
    cuda = import_pycuda()
    try:
        cuda.init()
        device = cuda.Device(device_index)
        major, minor = device.compute_capability()
        return str(device.name()), f"{major}.{minor}"
    except Exception as exc:  # pycuda raises its own error types
        raise BackendUnavailableError(f"cannot query CUDA device {device_index}: {exc}") from exc
