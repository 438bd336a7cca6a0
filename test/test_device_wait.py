"""The host's wait for the GPU (core/device_wait.py): it returns only once the work is done, however the work's
length changes from one wait to the next, and it does not burn a core for a long wait. Here the "device" is a
timer thread finishing a job; on the GPU the same waits sit in the torch backend, RoMa's sampler and the
verifier (test_gpu.py runs them end to end)."""
from __future__ import annotations

import threading
import time

import pytest

from matchanything_ros.core.device_wait import SPIN_LIMIT_S, DeviceWait
from matchanything_ros.core.eloftr.options import EloftrOptions
from matchanything_ros.core.errors import ConfigError


class ThreadJob:
    """Work another thread finishes after `seconds`; query() and synchronize() as a CUDA event's."""

    def __init__(self, seconds: float) -> None:
        self.finished = threading.Event()
        self.queries = 0
        self.synchronized = 0
        threading.Timer(seconds, self.finished.set).start()

    def query(self) -> bool:
        self.queries += 1
        return self.finished.is_set()

    def synchronize(self) -> None:
        self.synchronized += 1
        self.finished.wait()


@pytest.mark.parametrize("lengths", [(0.02, 0.02, 0.02), (0.03, 0.002, 0.03), (0.0, 0.01, 0.0), (0.001, 0.05)],
                         ids=["steady", "a_short_one_between", "starts_done", "a_long_one_after_short_ones"])
@pytest.mark.parametrize("sleep", [True, False], ids=["sleep_then_spin", "spin"])
def test_each_wait_returns_only_once_its_work_is_done(lengths: tuple[float, ...], sleep: bool) -> None:
    waiting = DeviceWait(sleep=sleep)
    for seconds in lengths:
        job = ThreadJob(seconds)
        waiting.wait(job)
        assert job.finished.is_set()


def test_frames_turning_faster_shorten_the_sleep_within_a_few_waits() -> None:
    """After 40-ms frames come 10-ms ones (a higher threshold, fewer matches): the first ones are overslept, but
    the wait learns from that (it does not take its own oversleeping for the frames' length) and is back near
    10 ms by the fourth (taking its oversleeping for the length, it would go on sleeping ~40 ms)."""
    waiting = DeviceWait()
    for _ in range(3):
        waiting.wait(ThreadJob(0.04))
    walls = []
    for _ in range(5):
        job = ThreadJob(0.01)
        t0 = time.perf_counter()
        waiting.wait(job)
        walls.append(time.perf_counter() - t0)
    assert max(walls[3:]) < 0.016, [round(w * 1e3, 1) for w in walls]


def test_a_steady_wait_sleeps_through_most_of_it() -> None:
    """After a few 30-ms frames the host spends a small part of the next one on the CPU, not the whole frame."""
    waiting = DeviceWait()
    for _ in range(3):
        waiting.wait(ThreadJob(0.03))
    job = ThreadJob(0.03)
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    waiting.wait(job)
    cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
    assert job.finished.is_set() and wall >= 0.025
    assert cpu < 0.4 * wall, f"{cpu * 1e3:.1f} ms of CPU in a {wall * 1e3:.1f} ms wait"


def test_a_wait_far_longer_than_the_recent_ones_stops_spinning_and_blocks() -> None:
    waiting = DeviceWait(sleep=False)  # spins from the start: only its limit keeps a long wait off the CPU
    job = ThreadJob(0.08)
    cpu0 = time.thread_time()
    waiting.wait(job)
    cpu = time.thread_time() - cpu0
    assert job.finished.is_set()
    assert job.synchronized == 1
    assert cpu < SPIN_LIMIT_S + 0.02, f"{cpu * 1e3:.1f} ms of CPU spinning on an 80-ms job"


def test_a_wait_for_finished_work_asks_once() -> None:
    waiting = DeviceWait()
    waiting.recent.append(10.0)  # a previous wait's length: work already done must not be slept on
    job = ThreadJob(0.0)
    job.finished.wait()
    t0 = time.perf_counter()
    waiting.wait(job)
    assert time.perf_counter() - t0 < 0.5
    assert (job.queries, job.synchronized) == (1, 0)
    assert list(waiting.recent) == [10.0]  # nothing learnt from it


def test_the_blocking_form_leaves_it_to_the_event() -> None:
    waiting = DeviceWait("blocking")
    job = ThreadJob(0.01)
    waiting.wait(job)
    assert job.finished.is_set()
    assert (job.queries, job.synchronized) == (0, 1)


def test_an_unknown_form_is_refused() -> None:
    with pytest.raises(ConfigError, match="DeviceWait.host_wait: 'busy' is not one of sleep_then_spin, blocking"):
        DeviceWait("busy")
    with pytest.raises(ConfigError, match="EloftrOptions.host_wait: 'spin'"):
        EloftrOptions(host_wait="spin")
