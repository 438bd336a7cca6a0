"""Pairing of image streams by timestamp: ExactTime, ApproximateTime and sequential (VO).

No ROS imports: stamps are integer nanoseconds and messages are opaque objects, so the node and
the offline bag tool use the same code, and it is tested without ROS. (`message_filters` is not
installable on machines without a ROS distribution, and its Python ApproximateTime pairs the
first combination within the slop rather than the closest one.)

Every synchronizer keeps per-input queues of at most `queue_size` messages. A message that
leaves a queue without a partner is a *sync failure* (counted: the node reports it with a hint
to try approximate sync). Stamps must increase strictly per input; a duplicate or older stamp is
rejected with `StampOrderError` and does not disturb the queues.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..core.errors import ConfigError, InputImageError

M = TypeVar("M")

NS_PER_S = 1_000_000_000


class StampOrderError(InputImageError):
    """A message's stamp is not newer than the previous message on the same input."""


def format_stamp(stamp_ns: int) -> str:
    sign = "-" if stamp_ns < 0 else ""
    sec, nsec = divmod(abs(stamp_ns), NS_PER_S)
    return f"{sign}{sec}.{nsec:09d} s"


@dataclass(frozen=True)
class SyncedPair(Generic[M]):
    """Two messages to match. image0 gives the output header (left camera / current frame)."""

    stamp0: int
    msg0: M
    stamp1: int
    msg1: M

    @property
    def newest_stamp(self) -> int:
        return max(self.stamp0, self.stamp1)


@dataclass
class SyncStats:
    pairs: int = 0  # pairs emitted
    sync_failures: int = 0  # messages discarded without a partner
    rejected_stamps: int = 0  # duplicate / out-of-order messages refused


class _Input(Generic[M]):
    """One input's queue, sorted by stamp (stamps are strictly increasing per input)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stamps: list[int] = []
        self.msgs: list[M] = []
        self.last_stamp: int | None = None
        self.min_gap: int | None = None  # smallest gap seen between consecutive stamps

    def check_and_push(self, stamp: int, msg: M, stats: SyncStats) -> None:
        if self.last_stamp is not None and stamp <= self.last_stamp:
            stats.rejected_stamps += 1
            what = "duplicate stamp" if stamp == self.last_stamp else "stamp older than the previous one"
            raise StampOrderError(
                f"{self.name}: {what} ({format_stamp(stamp)} after {format_stamp(self.last_stamp)}); "
                "message dropped")
        if self.last_stamp is not None:
            gap = stamp - self.last_stamp
            self.min_gap = gap if self.min_gap is None else min(self.min_gap, gap)
        self.last_stamp = stamp
        self.stamps.append(stamp)
        self.msgs.append(msg)

    def pop_front(self, count: int = 1) -> None:
        del self.stamps[:count]
        del self.msgs[:count]

    def clear(self) -> None:
        self.stamps.clear()
        self.msgs.clear()
        self.last_stamp = None
        self.min_gap = None


class _TwoInputSync(Generic[M]):
    def __init__(self, queue_size: int) -> None:
        if queue_size < 1:
            raise ConfigError(f"queue_size must be >= 1, got {queue_size}")
        self.queue_size = queue_size
        self.inputs = (_Input[M]("image0"), _Input[M]("image1"))
        self.stats = SyncStats()

    def add(self, index: int, stamp_ns: int, msg: M) -> list[SyncedPair[M]]:
        """Add a message on input `index` (0 or 1); return the pairs that became complete."""
        if index not in (0, 1):
            raise ValueError(f"input index must be 0 or 1, got {index}")
        self.inputs[index].check_and_push(int(stamp_ns), msg, self.stats)
        pairs = self._match()
        for q in self.inputs:
            overflow = len(q.stamps) - self.queue_size
            if overflow > 0:
                q.pop_front(overflow)
                self.stats.sync_failures += overflow
        self.stats.pairs += len(pairs)
        return pairs

    def reset(self) -> None:
        """Forget queued messages and stamp history (e.g. after the clock jumped back)."""
        for q in self.inputs:
            q.clear()

    def pending(self) -> tuple[int, int]:
        return len(self.inputs[0].stamps), len(self.inputs[1].stamps)

    def _emit(self, i0: int, i1: int) -> SyncedPair[M]:
        """Pair inputs[0][i0] with inputs[1][i1] and discard everything older than them."""
        q0, q1 = self.inputs
        pair = SyncedPair(q0.stamps[i0], q0.msgs[i0], q1.stamps[i1], q1.msgs[i1])
        self.stats.sync_failures += i0 + i1
        q0.pop_front(i0 + 1)
        q1.pop_front(i1 + 1)
        return pair

    def _match(self) -> list[SyncedPair[M]]:
        raise NotImplementedError


class ExactTimeSync(_TwoInputSync[M]):
    """Pairs messages whose stamps are equal (message_filters ExactTime policy)."""

    def _match(self) -> list[SyncedPair[M]]:
        q0, q1 = self.inputs
        pairs = []
        while q0.stamps and q1.stamps:
            # Common stamps are found oldest first; the queues are sorted, so a merge walk works.
            i0 = i1 = 0
            found = False
            while i0 < len(q0.stamps) and i1 < len(q1.stamps):
                a, b = q0.stamps[i0], q1.stamps[i1]
                if a == b:
                    found = True
                    break
                if a < b:
                    i0 += 1
                else:
                    i1 += 1
            if not found:
                break
            pairs.append(self._emit(i0, i1))
        return pairs


class ApproximateTimeSync(_TwoInputSync[M]):
    """Pairs each message with the nearest-stamped message of the other input (mutual nearest).

    The oldest queued message `x` is paired with the other input's oldest message `y` (all of the
    other input's messages are newer than `x`, so `y` is its nearest) once it is certain that no
    later message of x's input can be nearer to `y`: a newer message on x's input is already
    queued, or the smallest inter-frame gap seen so far on x's input proves the next one will be
    farther. If a later message of x's input is nearer to `y`, `x` has no partner and is dropped
    (a sync failure). With `tolerance_s` > 0, pairs whose stamps differ by more are refused.
    """

    def __init__(self, queue_size: int, tolerance_s: float = 0.0) -> None:
        super().__init__(queue_size)
        if tolerance_s < 0:
            raise ConfigError(f"approximate_sync_tolerance_seconds must be >= 0, got {tolerance_s}")
        self.tolerance_ns = int(round(tolerance_s * NS_PER_S))

    def _match(self) -> list[SyncedPair[M]]:
        pairs = []
        while True:
            q0, q1 = self.inputs
            if not q0.stamps or not q1.stamps:
                break
            xi = 0 if q0.stamps[0] <= q1.stamps[0] else 1
            qx, qy = self.inputs[xi], self.inputs[1 - xi]
            x, y = qx.stamps[0], qy.stamps[0]
            gap = y - x  # >= 0
            if self.tolerance_ns > 0 and gap > self.tolerance_ns:
                # x's nearest partner is already too far: it can never be paired.
                qx.pop_front()
                self.stats.sync_failures += 1
                continue
            if gap > 0:
                if len(qx.stamps) > 1:
                    x_next = qx.stamps[1]
                    if abs(x_next - y) < gap:
                        qx.pop_front()  # a later x is nearer to y: x has no partner
                        self.stats.sync_failures += 1
                        continue
                elif qx.min_gap is None or x + qx.min_gap - y < gap:
                    break  # the next x might be nearer to y: wait for it
            pair = self._emit(0, 0)
            pairs.append(pair)
        return pairs


class SequentialPairer(Generic[M]):
    """Visual-odometry pairing on one input: each frame (image0) with the previous one (image1)."""

    def __init__(self) -> None:
        self.input = _Input[M]("image0")
        self.stats = SyncStats()
        self._prev: tuple[int, M] | None = None

    def add(self, index: int, stamp_ns: int, msg: M) -> list[SyncedPair[M]]:
        if index != 0:
            raise ValueError("sequential mode has a single input (index 0)")
        self.input.check_and_push(int(stamp_ns), msg, self.stats)
        self.input.pop_front()  # no queue: only the previous frame is kept
        prev, self._prev = self._prev, (int(stamp_ns), msg)
        if prev is None:
            return []
        self.stats.pairs += 1
        return [SyncedPair(int(stamp_ns), msg, prev[0], prev[1])]

    def reset(self) -> None:
        self.input.clear()
        self._prev = None

    def pending(self) -> tuple[int, int]:
        return (0 if self._prev is None else 1, 0)


Synchronizer = ExactTimeSync[Any] | ApproximateTimeSync[Any] | SequentialPairer[Any]


# The parameters make_synchronizer reads (node and bag tool): a change of one makes a new synchronizer.
SYNC_PARAMS = ("mode", "approximate_sync", "approximate_sync_tolerance_seconds", "queue_size")


def make_synchronizer(params: dict[str, Any]) -> Synchronizer:
    """The synchronizer the node and the bag tool use for these parameter values."""
    if params["mode"] == "sequential":
        return SequentialPairer()
    if params["approximate_sync"]:
        return ApproximateTimeSync(int(params["queue_size"]), float(params["approximate_sync_tolerance_seconds"]))
    return ExactTimeSync(int(params["queue_size"]))


def stamp_to_ns(sec: int, nanosec: int) -> int:
    return int(sec) * NS_PER_S + int(nanosec)

