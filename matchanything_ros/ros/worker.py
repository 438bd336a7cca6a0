"""The latest-only hand-over between ROS callbacks and the one thread that runs inference.

Callbacks `submit()` the newest synchronized pair into a one-slot buffer and return at once; a
pair still waiting when a newer one arrives is overwritten and counted as dropped, so the queue
never grows and latency stays bounded by about two inference times. One worker thread creates
the matcher, takes pairs, runs them, and rebuilds the matcher when the configuration changes, so
the executor stays free for `/clock`, parameter services and diagnostics whatever the inference
time (the TensorRT backend does its CUDA work on a thread of its own, core/engines/cuda_context.py).
No ROS imports.
"""
from __future__ import annotations

import logging
import threading
import traceback
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class LatestSlot(Generic[T]):
    """A one-item buffer: `put` overwrites (counting the overwritten item as dropped), `take` blocks."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: T | None = None
        self._closed = False
        self._wakeups = 0
        self.dropped = 0  # items overwritten before the consumer took them
        self.accepted = 0

    def put(self, item: T) -> bool:
        """Store `item`; return True when it replaced an item nobody had taken (a drop)."""
        with self._cond:
            overwritten = self._item is not None
            if overwritten:
                self.dropped += 1
            self._item = item
            self.accepted += 1
            self._cond.notify()
            return overwritten

    def take(self, timeout: float | None = None) -> T | None:
        """The stored item (removing it), or None on timeout, wake-up or close."""
        with self._cond:
            if self._item is None and not self._closed and not self._wakeups:
                self._cond.wait(timeout)
            self._wakeups = 0
            item, self._item = self._item, None
            return item

    def wake(self) -> None:
        """Make a waiting `take` return now (used to deliver control requests)."""
        with self._cond:
            self._wakeups += 1
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed


class MatcherWorker(Generic[T]):
    """Runs `build(config)` and then `process(matcher, item)` for each taken item, all on one thread.

    build(config) -> matcher          creates the matcher (may raise; the worker keeps running
                                      without a matcher and reports through `on_state`)
    process(matcher, item)            runs one pair and publishes (exceptions go to `on_error`)
    on_state(matcher | None, error)   called after every (re)build attempt, on the worker thread
    on_unprocessed(item)              an item taken while no matcher is available
    update(matcher, config) -> bool   optional: apply a new config to the running matcher (True), else rebuild
    """

    def __init__(
        self,
        build: Callable[[Any], Any],
        process: Callable[[Any, T], None],
        on_state: Callable[[Any | None, BaseException | None], None],
        on_error: Callable[[BaseException, str], None],
        on_unprocessed: Callable[[T], None] | None = None,
        close: Callable[[Any], None] | None = None,
        update: Callable[[Any, Any], bool] | None = None,
        name: str = "matcher_worker",
    ) -> None:
        self._build = build
        self._process = process
        self._on_state = on_state
        self._on_error = on_error
        self._on_unprocessed = on_unprocessed
        self._close = close or (lambda m: m.close())
        self._update = update  # update(matcher, config) -> True: taken without a rebuild
        self.slot: LatestSlot[T] = LatestSlot()
        self._lock = threading.Lock()
        self._pending_config: Any = None
        self._has_pending = False
        self._stop = False
        self.matcher: Any = None
        self.busy = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self, config: Any) -> None:
        self.reconfigure(config)
        self.thread.start()

    def submit(self, item: T) -> bool:
        """Hand over the newest pair; True when an unprocessed older pair was dropped for it."""
        return self.slot.put(item)

    def reconfigure(self, config: Any) -> None:
        """Rebuild the matcher with `config` on the worker thread before the next pair."""
        with self._lock:
            self._pending_config = config
            self._has_pending = True
        self.slot.wake()

    def stop(self, timeout: float = 5.0) -> bool:
        """Ask the thread to finish (after the pair in progress); True when it ended in time."""
        self._stop = True
        self.slot.close()
        if self.thread.is_alive():
            self.thread.join(timeout)
        return not self.thread.is_alive()

    def _take_config(self) -> tuple[bool, Any]:
        with self._lock:
            has, config = self._has_pending, self._pending_config
            self._has_pending, self._pending_config = False, None
            return has, config

    def _step(self) -> None:
        """One turn: a pending reconfiguration, then the next item (waiting up to 0.5 s for one, unless a
        reconfiguration is already pending). The reconfiguration is looked for after the wait too: its wake-up
        and a pair that arrives just after it reach `take` together, and that pair runs with the new config."""
        item = None if self._has_pending else self.slot.take(timeout=0.5)
        has_config, config = self._take_config()
        if has_config:
            self._rebuild(config)
        if item is None or self._stop:
            return
        if self.matcher is None:
            if self._on_unprocessed is not None:
                self._on_unprocessed(item)
            return
        self.busy = True
        try:
            self._process(self.matcher, item)
        except Exception as exc:
            self._on_error(exc, traceback.format_exc())
        finally:
            self.busy = False

    def _rebuild(self, config: Any) -> None:
        if self.matcher is not None and self._update is not None:
            try:
                updated = self._update(self.matcher, config)
            except Exception as exc:  # a failed update is reported and the matcher rebuilt for the config
                self._on_error(exc, traceback.format_exc())
                updated = False
            if updated:
                self._on_state(self.matcher, None)  # taken in place: the same graphs, as fast as before
                return
        if self.matcher is not None:
            old, self.matcher = self.matcher, None
            try:
                self._close(old)
            except Exception as exc:  # a failing close must not stop the worker
                self._on_error(exc, traceback.format_exc())
        try:
            self.matcher = self._build(config)
            error: BaseException | None = None
        except Exception as exc:
            self.matcher, error = None, exc
        self._on_state(self.matcher, error)

    def _run(self) -> None:
        try:
            while not self._stop:
                try:
                    self._step()
                except Exception:  # a reporting callback raised: say so (Python logging never raises), go on
                    log.exception("matcher worker: a callback raised; the worker goes on")
        finally:
            if self.matcher is not None:
                try:
                    self._close(self.matcher)
                except Exception:
                    pass
                self.matcher = None
