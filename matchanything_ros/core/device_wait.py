"""Waiting for the GPU from the host: a sleep for most of the expected time, then short polls.

A blocking-sync CUDA event puts the thread to sleep until the driver wakes it, which on the GPU machines we
measure takes a large part of a millisecond after the work is done; spinning on the event instead costs a whole
core for the frame's length. `DeviceWait` sleeps for a share of the previous wait, then polls the event every
POLL_S (about 0.1 ms of host CPU per wait, a wake-up at most one poll late). torch-free: any object with
`query()` will do.
"""
from __future__ import annotations

import time
from typing import Any

POLL_S = 5e-5  # between polls (Linux sleeps ~50-100 us for it)
FIRST_SLEEP_SHARE = 0.75  # of the previous wait, slept in one go before polling (a shorter frame pays that much)


class DeviceWait:
    """One wait site's waiting (its own history: different sites wait for different lengths)."""

    def __init__(self) -> None:
        self.last_s = 0.0  # how long the previous wait took

    def wait(self, event: Any) -> None:
        """Return once `event` (a CUDA event, or anything with `query()`) has completed."""
        start = time.perf_counter()
        if self.last_s > 2 * POLL_S and not event.query():
            time.sleep(self.last_s * FIRST_SLEEP_SHARE)
        while not event.query():
            time.sleep(POLL_S)
        self.last_s = time.perf_counter() - start
