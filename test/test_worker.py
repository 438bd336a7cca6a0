"""The latest-only buffer and the single inference thread (no ROS needed).

The worker is generic over what it builds; here it builds a small object that records which
thread touched it, which is exactly the property the node relies on (a CUDA context/stream
created on one thread and used only there). The real matcher runs through it in test_node.py.
"""
from __future__ import annotations

import threading
import time

from matchanything_ros.core.errors import CheckpointError
from matchanything_ros.ros.worker import LatestSlot, MatcherWorker


class ThreadRecorder:
    def __init__(self, config):
        if config == "missing.ckpt":
            raise CheckpointError("checkpoint 'missing.ckpt' does not exist")
        self.config = config
        self.created_on = threading.get_ident()
        self.used_on: set[int] = set()
        self.closed = False

    def close(self):
        self.closed = True


def make_worker(process_delay=0.0):
    events = {"processed": [], "states": [], "errors": [], "unprocessed": []}
    done = threading.Event()

    def process(matcher, item):
        matcher.used_on.add(threading.get_ident())
        if item == "boom":
            raise RuntimeError("inference failed")
        time.sleep(process_delay)
        events["processed"].append((matcher.config, item))
        if item == "last":
            done.set()

    worker = MatcherWorker(
        build=ThreadRecorder,
        process=process,
        on_state=lambda m, e: events["states"].append((m, e)),
        on_error=lambda e, tb: events["errors"].append(e),
        on_unprocessed=lambda item: events["unprocessed"].append(item),
    )
    return worker, events, done


def wait_for(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.005)


def test_slot_keeps_only_the_newest_item_and_counts_drops():
    slot: LatestSlot[int] = LatestSlot()
    assert slot.put(1) is False
    assert slot.put(2) is True
    assert slot.put(3) is True
    assert slot.take(timeout=0) == 3
    assert slot.take(timeout=0) is None
    assert (slot.dropped, slot.accepted) == (2, 3)


def test_matcher_is_created_and_used_on_the_worker_thread_only():
    worker, events, done = make_worker()
    worker.start("a.ckpt")
    worker.submit("last")
    assert done.wait(5)
    matcher = worker.matcher
    assert matcher.created_on == worker.thread.ident != threading.get_ident()
    assert matcher.used_on == {worker.thread.ident}
    assert worker.stop()
    assert matcher.closed


def test_burst_faster_than_inference_drops_old_pairs_and_processes_the_newest():
    worker, events, done = make_worker(process_delay=0.05)
    worker.start("a.ckpt")
    wait_for(lambda: worker.matcher is not None)
    for i in range(99):
        worker.submit(i)
    worker.submit("last")
    assert done.wait(5)
    processed = [item for _, item in events["processed"]]
    assert processed[-1] == "last"
    assert len(processed) < 10  # no queue: most of the burst was overwritten
    assert worker.slot.dropped == 100 - len(processed)
    worker.stop()


def test_failed_build_keeps_the_worker_alive_and_reconfiguring_recovers():
    worker, events, done = make_worker()
    worker.start("missing.ckpt")
    wait_for(lambda: events["states"])
    matcher, error = events["states"][0]
    assert matcher is None and isinstance(error, CheckpointError)
    worker.submit("p1")
    wait_for(lambda: events["unprocessed"] == ["p1"])
    worker.reconfigure("good.ckpt")
    wait_for(lambda: len(events["states"]) == 2)
    worker.submit("last")
    assert done.wait(5)
    assert events["processed"] == [("good.ckpt", "last")]
    worker.stop()


def test_an_exception_while_processing_does_not_stop_the_worker():
    worker, events, done = make_worker()
    worker.start("a.ckpt")
    wait_for(lambda: worker.matcher is not None)
    worker.submit("boom")
    wait_for(lambda: events["errors"])
    worker.submit("last")
    assert done.wait(5)
    assert str(events["errors"][0]) == "inference failed"
    worker.stop()


def test_reconfigure_closes_the_old_matcher_on_the_worker_thread():
    worker, events, done = make_worker()
    worker.start("a.ckpt")
    wait_for(lambda: worker.matcher is not None)
    first = worker.matcher
    worker.reconfigure("b.ckpt")
    wait_for(lambda: worker.matcher is not None and worker.matcher is not first)
    assert first.closed
    worker.submit("last")
    assert done.wait(5)
    assert events["processed"] == [("b.ckpt", "last")]
    worker.stop()


def test_a_pair_submitted_right_after_a_reconfiguration_runs_with_the_new_config():
    """A parameter change (reconfigure) and the next pair can reach the waiting worker in one hand-over (its
    wake-up and the pair together, as on a loaded machine): the pair runs with the new config, not the old."""
    worker, events, done = make_worker()
    worker.start("first.ckpt")
    wait_for(lambda: worker.matcher is not None)
    time.sleep(0.05)  # the worker waits on the slot
    with worker.slot._cond:  # both land before the worker thread can look
        worker.reconfigure("second.ckpt")
        worker.submit("last")
    assert done.wait(5.0)
    assert events["processed"] == [("second.ckpt", "last")]
    assert worker.stop()
