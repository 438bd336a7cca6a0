"""The host's wait for the GPU (core/device_wait.py): it returns only once the work is done, however the work's
length changes from one wait to the next. Here the "device" is a worker thread finishing a job; on the GPU the
same waits sit in the torch backend and the verifier (test_gpu.py runs them)."""
from __future__ import annotations

import threading

import pytest

from matchanything_ros.core.device_wait import DeviceWait


class ThreadJob:
    """Work done by another thread after `seconds`: query() as a CUDA event's (True once complete)."""

    def __init__(self, seconds: float) -> None:
        self.finished = threading.Event()
        self.queries = 0
        threading.Timer(seconds, self.finished.set).start()

    def query(self) -> bool:
        self.queries += 1
        return self.finished.is_set()


@pytest.mark.parametrize("lengths", [(0.02, 0.02, 0.02), (0.03, 0.002, 0.03), (0.0, 0.01, 0.0)],
                         ids=["steady", "a_short_one_between", "starts_done"])
def test_each_wait_returns_only_once_its_work_is_done(lengths: tuple[float, ...]) -> None:
    waiting = DeviceWait()
    for seconds in lengths:
        job = ThreadJob(seconds)
        waiting.wait(job)
        assert job.finished.is_set()
        assert waiting.last_s >= 0.0


def test_a_wait_for_finished_work_asks_once_and_does_not_sleep() -> None:
    waiting = DeviceWait()
    waiting.last_s = 10.0  # a previous wait's length: a wait for work already done must not sleep on it
    job = ThreadJob(0.0)
    job.finished.wait()
    waiting.wait(job)
    assert job.queries == 2  # once before the sleep (skipped: done), once in the poll loop: done
