"""Waiting for the GPU from the host: sleep through most of the expected time, spin on the event for the rest.

A blocking-sync CUDA event puts the thread to sleep until the driver's interrupt wakes it; on the GPU machines
we measure that wake-up comes 0.1-0.25 ms after the work is done (the idle core has dropped into a deep sleep
state, which the kernel cannot foresee for an interrupt). Spinning on the event the whole time costs a core
for the frame's length; polling with short sleeps (tried: 50-us polls) overshoots a sub-millisecond wait.
`DeviceWait` sleeps for the shortest of the site's recent waits less a margin (a timer the kernel sees coming,
so it picks a light sleep state), then spins on `query()` — yielding the GIL between queries — until the work
is done, for at most SPIN_LIMIT_S, after which it falls back to the event's own blocking wait. Only a wait seen
ending while spinning teaches it a length; one found done on waking teaches half its nap. torch-free: any
object with `query()` and `synchronize()` will do.
"""
from __future__ import annotations

import os
import time
from collections import deque
from typing import Any

from .errors import ConfigError

# How the host waits for the device (EloftrOptions.host_wait, RomaOptions.host_wait): DeviceWait's sleep then
# spin, or the blocking-sync event's own sleep (the form before; kept to compare)
HOST_WAITS = ("sleep_then_spin", "blocking")
DEFAULT_HOST_WAIT = "sleep_then_spin"
SLEEP_MARGIN_S = 3e-4  # woken this long before the shortest recent wait ends (Linux oversleeps ~0.05-0.1 ms)
SPIN_LIMIT_S = 2e-3  # spin no longer than this (a frame far slower than the recent ones), then block
RECENT_WAITS = 4  # the waits remembered per site
# releases the GIL (the node's callback threads run meanwhile); where the OS has no sched_yield, a zero sleep
_yield = getattr(os, "sched_yield", None) or (lambda: time.sleep(0))


def check_host_wait(value: str, owner: str) -> None:
    """Refuse a host wait that is not one of HOST_WAITS (ConfigError naming `owner`, e.g. "EloftrOptions")."""
    if value not in HOST_WAITS:
        raise ConfigError(f"{owner}.host_wait: {value!r} is not one of {', '.join(HOST_WAITS)}")


class DeviceWait:
    """One wait site's waiting, with its own history (different sites wait for different lengths).

    mode "blocking": the event's own synchronize(). sleep=False: spin from the start (a wait known to be short,
    e.g. the verifier's fit, where any sleep's wake-up costs more than the spin)."""

    def __init__(self, mode: str = DEFAULT_HOST_WAIT, sleep: bool = True) -> None:
        check_host_wait(mode, type(self).__name__)
        self.mode, self.sleep = mode, sleep
        self.recent: deque[float] = deque(maxlen=RECENT_WAITS)  # seconds from wait() to done, latest last

    def wait(self, event: Any) -> None:
        """Return once `event` (a CUDA event, or anything with `query()` and `synchronize()`) has completed."""
        if self.mode == "blocking":
            event.synchronize()
            return
        if event.query():
            return  # done before we asked: nothing learnt about its length
        start = time.perf_counter()
        nap = min(self.recent) - SLEEP_MARGIN_S if self.sleep and self.recent else 0.0
        if nap > 0:
            time.sleep(nap)
            if event.query():
                # done before we woke: its length is unknown (at most the nap and the oversleep); remember half
                # the nap, so that a faster frame than the recent ones (or a host that oversleeps by more than the
                # margin) shortens the next naps quickly instead of setting them by our own oversleeping
                self.recent.append(nap / 2)
                return
        deadline = time.perf_counter() + SPIN_LIMIT_S
        while not event.query():
            if time.perf_counter() > deadline:
                event.synchronize()
                break
            _yield()
        self.recent.append(time.perf_counter() - start)  # seen done while spinning: its length, to microseconds
