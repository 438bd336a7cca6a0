"""A rosbag2 replayer for machines without `ros2 bag play`: publishes a bag's messages in time
order at a rate factor, optionally with /clock (sim time), optionally looping.

Messages are published as the bag's serialized CDR bytes (no decode/re-encode); only the message
classes are needed to create the publishers. Importable (`replay_bag`) for tests and the demo,
and the `matchanything replay` command.
"""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from ..core.errors import ConfigError

CLOCK_TOPIC = "/clock"


@dataclass
class ReplayStats:
    published: int = 0
    loops: int = 0
    skipped_topics: tuple[str, ...] = ()
    bag_duration_s: float = 0.0


def message_class(msgtype: str) -> Any:
    """The rclpy class of 'pkg/msg/Name' (ImportError if the package's Python messages are missing)."""
    pkg, kind, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{pkg}.{kind}"), name)


def parse_remaps(items: Iterable[str]) -> dict[str, str]:
    remap = {}
    for item in items:
        src, sep, dst = item.partition(":=")
        if not sep or not src or not dst:
            raise ConfigError(f"remap {item!r} is not FROM:=TO")
        remap[src] = dst
    return remap


def replay_bag(
    bag_path: str | Path,
    node: Any,
    *,
    rate: float = 1.0,
    publish_clock: bool = False,
    loop: bool = False,
    topics: Iterable[str] | None = None,
    remap: dict[str, str] | None = None,
    wait_for_subscribers_s: float = 0.0,
    clock_hz: float = 100.0,
    should_stop: Callable[[], bool] = lambda: False,
    log: Callable[[str], None] = print,
) -> ReplayStats:
    """Publish the bag's messages on `node` (an rclpy Node) in bag-time order.

    rate: playback speed factor (2 = twice as fast). publish_clock: publish rosgraph_msgs/Clock
    with the bag time (before each message and at `clock_hz` in between). wait_for_subscribers_s:
    wait up to this long until every replayed topic has a subscriber before starting.
    """
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rosbags.highlevel import AnyReader

    from .bag import make_typestore

    if rate <= 0:
        raise ConfigError(f"rate must be > 0, got {rate}")
    remap = remap or {}
    wanted = set(topics) if topics else None
    stats = ReplayStats()
    with AnyReader([Path(bag_path)], default_typestore=make_typestore()) as reader:
        publishers: dict[int, Any] = {}
        by_topic: dict[str, Any] = {}
        skipped = []
        for conn in reader.connections:
            if wanted is not None and conn.topic not in wanted:
                continue
            try:
                cls = message_class(conn.msgtype)
            except (ImportError, AttributeError, ValueError):
                skipped.append(conn.topic)
                log(f"replay: skipping {conn.topic}: no Python message class for {conn.msgtype}")
                continue
            topic = remap.get(conn.topic, conn.topic)
            if topic not in by_topic:
                by_topic[topic] = node.create_publisher(cls, topic, QoSProfile(depth=10))
            publishers[conn.id] = by_topic[topic]
        stats.skipped_topics = tuple(skipped)
        if not publishers:
            raise ConfigError(f"nothing to replay in {bag_path}")
        clock_pub = None
        if publish_clock:
            from rosgraph_msgs.msg import Clock

            clock_pub = node.create_publisher(
                Clock, CLOCK_TOPIC, QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE))
        if wait_for_subscribers_s > 0:
            waited = dict(by_topic)
            if clock_pub is not None:
                waited[CLOCK_TOPIC] = clock_pub
            end = time.monotonic() + wait_for_subscribers_s
            while time.monotonic() < end and not should_stop():
                if all(p.get_subscription_count() > 0 for p in waited.values()):
                    # Discovery is two-way: seeing the subscriber does not mean it has matched us yet,
                    # and best-effort subscribers (sensor-data QoS) would silently miss the first frames.
                    time.sleep(0.5)
                    break
                time.sleep(0.05)
            else:
                missing = [t for t, p in waited.items() if p.get_subscription_count() == 0]
                if missing:
                    log(f"replay: no subscriber on {', '.join(missing)} after {wait_for_subscribers_s} s; "
                        "starting anyway")
        connections = [c for c in reader.connections if c.id in publishers]
        stats.bag_duration_s = (reader.end_time - reader.start_time) / 1e9

        def publish_clock_ns(t_ns: int) -> None:
            if clock_pub is not None:
                msg = clock_pub.msg_type()
                msg.clock.sec, msg.clock.nanosec = divmod(int(t_ns), 1_000_000_000)
                clock_pub.publish(msg)

        while True:
            wall0 = time.monotonic()
            bag0: int | None = None
            for conn, timestamp, raw in reader.messages(connections=connections):
                if should_stop():
                    return stats
                if bag0 is None:
                    bag0 = timestamp
                    if stats.loops and clock_pub is not None:
                        # The clock goes back: let subscribers see it before the first message.
                        publish_clock_ns(bag0)
                        time.sleep(0.05)
                        wall0 = time.monotonic()
                target = wall0 + (timestamp - bag0) / 1e9 / rate
                # Sleep until the message is due, ticking /clock so sim-time timers keep running.
                while (now := time.monotonic()) < target:
                    publish_clock_ns(bag0 + int((now - wall0) * rate * 1e9))
                    time.sleep(min(target - now, 1.0 / clock_hz))
                publish_clock_ns(timestamp)
                publishers[conn.id].publish(bytes(raw))
                stats.published += 1
            stats.loops += 1
            if not loop or should_stop():
                _flush(list(by_topic.values()), log)
                return stats


def _flush(publishers: list[Any], log: Callable[[str], None], timeout_s: float = 5.0) -> None:
    """Let the last messages reach the subscribers before the caller tears the node down.

    publish() returns before DDS has delivered a large (fragmented) message; destroying the writer
    right after loses it, reliable or not. Reliable subscribers acknowledge; best-effort ones get a
    short grace period.
    """
    from rclpy.duration import Duration

    deadline = time.monotonic() + timeout_s
    for pub in publishers:
        left = max(deadline - time.monotonic(), 0.0)
        if not pub.wait_for_all_acked(Duration(nanoseconds=int(left * 1e9))):
            log(f"replay: the last messages on {pub.topic_name} were not acknowledged within {timeout_s:.0f} s")
    time.sleep(0.2)
