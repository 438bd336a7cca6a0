"""Offline bag processing: `matchanything bag IN OUT`.

Reads a rosbag2 (sqlite3 or mcap; rosbags, no ROS install needed), pairs the image topics with
the node's synchronizer and parameters, matches every pair (offline, nothing is dropped for
lateness), and writes KeypointMatches with the input stamps (header = image0's, image1's stamp
and frame explicit) to a new bag, plus optional debug images and one MatcherInfo. The output is
deterministic: records are written in input order with the input bag's timestamps.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

import numpy as np

from ..core.errors import ConfigError, InputImageError
from .image_conv import array_to_image_fields, compressed_msg_to_array, image_msg_to_array, to_rgb
from .message_fields import keypoint_matches_fields, matcher_info_fields
from .sync import StampOrderError, make_synchronizer, stamp_to_ns

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"  # jpeg/png, as image_transport's compressed topics
MATCHES_TYPE = "matchanything_ros/msg/KeypointMatches"
INFO_TYPE = "matchanything_ros/msg/MatcherInfo"


def msg_definition(name: str) -> str:
    """The text of one of our .msg files (install share dir, else the source checkout)."""
    candidates = []
    try:
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory("matchanything_ros")) / "msg" / f"{name}.msg")
    except (ImportError, LookupError):
        pass
    candidates.append(Path(__file__).resolve().parents[2] / "msg" / f"{name}.msg")
    for path in candidates:
        if path.is_file():
            return path.read_text()
    raise FileNotFoundError(f"{name}.msg not found (looked in {', '.join(map(str, candidates))})")


def make_typestore() -> Any:
    from rosbags.typesys import Stores, get_typestore, get_types_from_msg

    store = get_typestore(Stores.ROS2_KILTED)
    types: dict[str, Any] = {}
    for name, full in (("KeypointMatches", MATCHES_TYPE), ("MatcherInfo", INFO_TYPE)):
        types.update(get_types_from_msg(msg_definition(name), full))
    store.register(types)
    return store


@dataclass
class BagSummary:
    messages_read: int = 0
    pairs_synchronized: int = 0
    pairs_matched: int = 0
    pairs_skipped: int = 0  # bad input: unsupported encoding, malformed image, ...
    rejected_stamps: int = 0
    sync_failures: int = 0
    total_matches: int = 0
    debug_images: int = 0
    seconds: float = 0.0
    image0_topic: str = ""
    image1_topic: str = ""
    problems: list[str] = field(default_factory=list)

    def text(self) -> str:
        per_pair = self.total_matches / self.pairs_matched if self.pairs_matched else 0.0
        lines = [
            f"read {self.messages_read} images from {self.image0_topic}"
            + (f" and {self.image1_topic}" if self.image1_topic else " (sequential)"),
            f"pairs: {self.pairs_synchronized} synchronized, {self.pairs_matched} matched, "
            f"{self.pairs_skipped} skipped (bad input); {self.sync_failures} images without a partner, "
            f"{self.rejected_stamps} duplicate/out-of-order stamps",
            f"matches: {self.total_matches} ({per_pair:.1f} per pair); {self.debug_images} debug images; "
            f"{self.seconds:.1f} s",
        ]
        if self.sync_failures and not self.pairs_synchronized:
            lines.append("no pair was synchronized: stamps differ; try --approximate-sync")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Progress:
    """A dependency-free progress bar on a terminal stream (plain lines when not a terminal)."""

    def __init__(self, total: int, stream: TextIO | None, width: int = 30) -> None:
        self.total, self.stream, self.width = max(total, 1), stream, width
        self._last = -1.0
        self._tty = bool(stream is not None and stream.isatty())

    def update(self, done: int, note: str = "") -> None:
        if self.stream is None:
            return
        frac = min(done / self.total, 1.0)
        now = time.monotonic()
        if done < self.total and now - self._last < (0.2 if self._tty else 5.0):
            return
        self._last = now
        bar = "#" * int(frac * self.width)
        line = f"[{bar:<{self.width}}] {frac * 100:5.1f}% {done}/{self.total} images {note}"
        self.stream.write(("\r" + line) if self._tty else line + "\n")
        if self._tty and done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def select_topics(image_topics: list[str], image0: str | None, image1: str | None, mode: str) -> tuple[str, str]:
    """The image topics to pair: the given ones, or the bag's only one/two Image topics (sorted by name)."""
    for topic in (image0, image1):
        if topic and topic not in image_topics:
            raise ConfigError(f"topic {topic} is not an Image or CompressedImage topic of the bag "
                              f"(image topics: {', '.join(image_topics) or 'none'})")
    if mode == "sequential":
        if image0:
            return image0, ""
        if len(image_topics) == 1:
            return image_topics[0], ""
        raise ConfigError(f"sequential mode needs --image0 TOPIC (image topics: {', '.join(image_topics) or 'none'})")
    if image0 and image1:
        return image0, image1
    if not image0 and not image1 and len(image_topics) == 2:
        first, second = sorted(image_topics)
        return first, second
    raise ConfigError("give --image0 and --image1 (the bag has image topics: "
                      f"{', '.join(image_topics) or 'none'})")


def decode_image(msg: Any, name: str) -> np.ndarray:
    """An Image or CompressedImage message (rosbags) as the array the matcher takes."""
    return compressed_msg_to_array(msg, name) if hasattr(msg, "format") else image_msg_to_array(msg, name)


def header_stamp_ns(msg: Any) -> int:
    return stamp_to_ns(msg.header.stamp.sec, msg.header.stamp.nanosec)


def process_bag(
    in_path: str | Path,
    out_path: str | Path,
    params: dict[str, Any],
    *,
    image0_topic: str | None = None,
    image1_topic: str | None = None,
    output_topic: str = "/matches",
    debug_topic: str = "",
    info_topic: str = "/matcher_info",
    storage: str = "",
    progress: TextIO | None = None,
    log: Callable[[str], None] | None = None,
    matcher: Any = None,
) -> BagSummary:
    """Match the image pairs of the bag at `in_path` and write the results to a new bag `out_path`.

    params: all `core.params` values (matcher settings and the node's sync settings).
    storage: "sqlite3" or "mcap" for the output (default: the input's).
    matcher: an existing `Matcher` to use (else one is made from params and closed afterwards).
    """
    from rosbags.highlevel import AnyReader
    from rosbags.rosbag2 import StoragePlugin, Writer

    log = log or (lambda text: print(text, file=sys.stderr))
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.exists():
        raise ConfigError(f"input bag {in_path} does not exist")
    if out_path.exists():
        raise ConfigError(f"output {out_path} already exists; remove it or choose another path")
    started = time.monotonic()
    summary = BagSummary()
    typestore = make_typestore()

    with AnyReader([in_path], default_typestore=typestore) as reader:
        raw_topics = sorted({c.topic for c in reader.connections if c.msgtype == IMAGE_TYPE})
        compressed_topics = sorted({c.topic for c in reader.connections if c.msgtype == COMPRESSED_TYPE})
        # named topics may be either type; otherwise the raw ones, or the compressed ones of a bag without raw
        image_topics = (raw_topics + compressed_topics if image0_topic or image1_topic
                        else raw_topics or compressed_topics)
        topic0, topic1 = select_topics(image_topics, image0_topic, image1_topic, params["mode"])
        summary.image0_topic, summary.image1_topic = topic0, topic1
        connections = [c for c in reader.connections if c.topic in (topic0, topic1)]
        total = sum(c.msgcount for c in connections)
        in_storage = _storage_of(in_path)
        plugin = StoragePlugin.MCAP if (storage or in_storage) == "mcap" else StoragePlugin.SQLITE3

        own_matcher = matcher is None
        if own_matcher:
            from ..core.matcher import Matcher, MatcherConfig
            from ..core.params import MATCHER_PARAM_NAMES

            matcher = Matcher(MatcherConfig.from_params({k: params[k] for k in MATCHER_PARAM_NAMES if k in params}))
        try:
            sync = make_synchronizer(params)
            bar = Progress(total, progress)
            with Writer(out_path, version=9, storage_plugin=plugin) as writer:
                out_conn = writer.add_connection(output_topic, MATCHES_TYPE, typestore=typestore)
                info_conn = debug_conn = None
                if info_topic:
                    info_conn = writer.add_connection(info_topic, INFO_TYPE, typestore=typestore)
                if debug_topic:
                    debug_conn = writer.add_connection(debug_topic, IMAGE_TYPE, typestore=typestore)
                wrote_info = False
                info = matcher.info  # fixed for the run (the property builds a dict)
                for connection, timestamp, raw in reader.messages(connections=connections):
                    summary.messages_read += 1
                    msg: Any = reader.deserialize(raw, connection.msgtype)
                    if info_conn is not None and not wrote_info:
                        info_msg = _info_msg(typestore, info, msg.header.frame_id, timestamp)
                        writer.write(info_conn, timestamp, typestore.serialize_cdr(info_msg, INFO_TYPE))
                        wrote_info = True
                    index = 0 if connection.topic == topic0 else 1
                    failures = sync.stats.sync_failures
                    try:
                        pairs = sync.add(index, header_stamp_ns(msg), msg)
                    except StampOrderError as exc:
                        summary.rejected_stamps += 1
                        _problem(summary, log, f"{connection.topic}: {exc}")
                        pairs = []
                    summary.sync_failures += sync.stats.sync_failures - failures
                    for pair in pairs:
                        summary.pairs_synchronized += 1
                        try:
                            img0 = decode_image(pair.msg0, "image0")
                            img1 = decode_image(pair.msg1, "image1")
                            result = matcher.match(img0, img1)
                        except InputImageError as exc:
                            summary.pairs_skipped += 1
                            _problem(summary, log, f"pair stamped {pair.stamp0} ns skipped: {exc}")
                            continue
                        out = _matches_msg(typestore, pair, img0, img1, result, info)
                        writer.write(out_conn, timestamp, typestore.serialize_cdr(out, MATCHES_TYPE))
                        summary.pairs_matched += 1
                        summary.total_matches += len(result)
                        if debug_conn is not None:
                            from ..core.viz import draw_matches

                            canvas = draw_matches(to_rgb(img0), to_rgb(img1), result.keypoints0, result.keypoints1,
                                                  result.confidence, demo_model=bool(info.get("is_demo_model")))
                            image = typestore.types[IMAGE_TYPE](header=pair.msg0.header, **_rosbags_image(canvas))
                            writer.write(debug_conn, timestamp, typestore.serialize_cdr(image, IMAGE_TYPE))
                            summary.debug_images += 1
                    bar.update(summary.messages_read, f"{summary.pairs_matched} pairs matched")
                if params["mode"] != "sequential":
                    summary.sync_failures += sum(sync.pending())  # still waiting for a partner at the end
        finally:
            if own_matcher:
                matcher.close()
    summary.seconds = time.monotonic() - started
    return summary


def _problem(summary: BagSummary, log: Callable[[str], None], text: str) -> None:
    summary.problems.append(text)
    log(text)


def _storage_of(path: Path) -> str:
    if path.is_file():
        return "mcap" if path.suffix == ".mcap" else "sqlite3"
    return "mcap" if any(path.glob("*.mcap")) else "sqlite3"


def _rosbags_image(array: np.ndarray) -> dict[str, Any]:
    fields = array_to_image_fields(array)
    fields["data"] = np.frombuffer(fields["data"], dtype=np.uint8)
    fields["is_bigendian"] = int(fields["is_bigendian"])
    return fields


def _matches_msg(typestore: Any, pair: Any, img0: np.ndarray, img1: np.ndarray, result: Any,
                 info: dict[str, Any]) -> Any:
    return typestore.types[MATCHES_TYPE](
        header=pair.msg0.header, image1_stamp=pair.msg1.header.stamp, image1_frame_id=pair.msg1.header.frame_id,
        # Wall-clock timings would make two runs differ: the output must be deterministic (timings 0).
        **keypoint_matches_fields(img0.shape, img1.shape, result, info, timings_ms={}))


def _info_msg(typestore: Any, info: dict[str, Any], frame_id: str, timestamp_ns: int) -> Any:
    types = typestore.types
    sec, nsec = divmod(int(timestamp_ns), 1_000_000_000)
    header = types["std_msgs/msg/Header"](stamp=types["builtin_interfaces/msg/Time"](sec=sec, nanosec=nsec),
                                          frame_id=frame_id)
    return types[INFO_TYPE](header=header, **matcher_info_fields(info))


def read_matches(path: str | Path, topic: str = "/matches") -> list[dict[str, Any]]:
    """The KeypointMatches of a bag as plain dicts (for tests and scripts)."""
    from rosbags.highlevel import AnyReader

    out = []
    with AnyReader([Path(path)], default_typestore=make_typestore()) as reader:
        conns = [c for c in reader.connections if c.topic == topic]
        for conn, timestamp, raw in reader.messages(connections=conns):
            msg: Any = reader.deserialize(raw, conn.msgtype)
            out.append({
                "timestamp": timestamp,
                "stamp0": header_stamp_ns(msg),
                "frame_id0": msg.header.frame_id,
                "stamp1": stamp_to_ns(msg.image1_stamp.sec, msg.image1_stamp.nanosec),
                "frame_id1": msg.image1_frame_id,
                "size0": (msg.image0_width, msg.image0_height),
                "size1": (msg.image1_width, msg.image1_height),
                "keypoints0": np.asarray(msg.keypoints0, np.float32).reshape(-1, 2),
                "keypoints1": np.asarray(msg.keypoints1, np.float32).reshape(-1, 2),
                "confidence": np.asarray(msg.confidence, np.float32),
                "raw": bytes(raw),
            })
    return out

