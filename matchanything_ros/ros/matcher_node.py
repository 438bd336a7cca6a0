"""`matcher_node`: matches synchronized image pairs and publishes KeypointMatches.

Threads: the executor (main thread) runs the image callbacks, which only synchronize stamps and
put the newest pair into a one-slot buffer, plus parameters, /clock and the 1 Hz diagnostics
timer. ONE worker thread owns the Matcher (created there, so a CUDA context/stream belongs to it),
converts the images, matches and publishes. The executor is never blocked by inference.
"""
from __future__ import annotations

import array
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.clock import Clock, ClockType, JumpThreshold, TimeJump
from rclpy.duration import Duration
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException, ParameterException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.qos_overriding_options import QoSOverridingOptions
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from ..core.errors import ConfigError, InputImageError, MatchAnythingError
from ..core.params import MATCHER_PARAM_NAMES, PARAMS, PARAMS_BY_NAME, ParamSpec
from .dds_profile import profile_in_effect
from .image_conv import (array_to_image_msg, check_compressed_msg, check_image_msg, compressed_msg_to_array,
                         image_msg_to_array, to_rgb)
from .intrinsics import IntrinsicsStore
from .message_fields import MATCH_ARRAY_FIELDS, keypoint_matches_fields, matcher_info_fields
from .sync import (NS_PER_S, SYNC_PARAMS, StampOrderError, SyncedPair, format_stamp, make_synchronizer,
                   stamp_to_ns)
from .worker import MatcherWorker

NODE_NAME = "matcher_node"
# Parameters that need a restart: the subscriptions depend on them.
READ_ONLY_PARAMS = frozenset({"mode", "image_transport"})
MATCHER_PARAMS = frozenset(MATCHER_PARAM_NAMES)  # a change rebuilds the matcher
LOG_REPEAT_S = 5.0  # the same warning text is logged at most once per this period
JUMP_GRACE_S = 1.0  # after the clock jumped back, older stamps restart the synchronizer for this long
DIAG_WINDOW_S = 5.0  # diagnostics' rates, means and WARN conditions cover this many seconds
# A pair this much older than the wall clock while use_sim_time is off looks like a replayed bag
# (live cameras are at most seconds behind, even with unsynchronised clocks).
BAG_HINT_AGE_S = 60.0
SIGNAL_POLL_S = 0.1  # the spin loop's period: how soon SIGINT/SIGTERM is acted on
SHUTDOWN_JOIN_S = 1.0  # how long shutdown waits for an inference in progress before exiting without it (the
# promise is an exit within 2 s; the rest is process teardown, slower on a loaded machine)
# Counters whose increase within the diagnostics window makes the status WARN, and how to say it.
WARN_COUNTERS = (("bad_inputs", "bad input images"), ("pairs_rejected", "pairs that failed to decode"),
                 ("pairs_stale", "stale pairs"), ("pairs_dropped", "pairs dropped (the matcher is slower than "
                                                                     "the input)"),
                 ("match_errors", "matching errors"), ("pairs_without_matcher", "pairs without a matcher"),
                 ("camera_info_missing", "pairs without camera_info (geometry essential)"),
                 ("camera_info_inconsistent", "pairs whose camera_info does not fit the image"),
                 ("frames_capped", "frames over engine_max_matches (the most confident kept; raise the threshold "
                                   "or the cap)"))


def parameter_descriptor(spec: ParamSpec) -> ParameterDescriptor:
    """A ROS ParameterDescriptor (description, ranges, read-only) for one PARAMS entry."""
    desc = ParameterDescriptor(name=spec.name, description=spec.description, read_only=spec.name in READ_ONLY_PARAMS)
    desc.type = Parameter.Type.from_parameter_value(spec.default).value
    if spec.choices:
        desc.additional_constraints = "one of: " + ", ".join(map(str, spec.choices))
    if spec.type is float and spec.min is not None and spec.max is not None:
        desc.floating_point_range = [FloatingPointRange(from_value=float(spec.min), to_value=float(spec.max), step=0.0)]
    elif spec.type is int and spec.min is not None and spec.max is not None:
        desc.integer_range = [IntegerRange(from_value=int(spec.min), to_value=int(spec.max), step=1)]
    return desc


def matcher_config(params: dict[str, Any]) -> Any:
    from ..core.matcher import MatcherConfig  # torch etc. load here, not at node import

    return MatcherConfig.from_params({k: params[k] for k in MATCHER_PARAMS})


LOG_LEVELS = {"error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}
# Python loggers whose records the node logs through its ROS logger: the matcher core's, and Python warnings.
BRIDGED_LOGGERS = ("matchanything_ros", "py.warnings")


class PythonLogBridge(logging.Handler):
    """Python logging records of the matcher core (e.g. "backend auto: not using TensorRT ...") -> the
    node's ROS logger: the ROS log format, /rosout and the node's log level, instead of bare lines on
    stderr. Warnings and errors with the same text template repeat at most once per LOG_REPEAT_S, like
    the node's own (a per-frame warning of the core would otherwise flood the log at the input rate)."""

    def __init__(self, node: "MatcherNode") -> None:
        super().__init__(logging.DEBUG)
        self.node = node
        self._saved: list[tuple[logging.Logger, int]] = []
        # ROS severities have Python's numbers (DEBUG 10 ... ERROR 40): --log-level applies to both
        ros_level = int(node.get_logger().get_effective_level()) or logging.INFO
        for name in BRIDGED_LOGGERS:
            logger = logging.getLogger(name)
            self._saved.append((logger, logger.level))
            if logger.level == logging.NOTSET:
                logger.setLevel(ros_level)
            logger.addHandler(self)
        logging.captureWarnings(True)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if record.levelno >= logging.WARNING and self.node._recently_logged(f"py:{record.name}:{record.msg}"):
                return
            self.node.log_at(record.levelno, self.format(record))
        except Exception:
            self.handleError(record)  # logging never raises into the code that logged

    def close(self) -> None:
        for logger, level in self._saved:
            logger.removeHandler(self)
            logger.setLevel(level)
        self._saved = []
        logging.captureWarnings(False)
        super().close()


@dataclass
class WorkItem:
    pair: SyncedPair[Any]  # sensor_msgs Image or CompressedImage (image_transport)
    received_ns: int  # node clock when the pair was complete


class Counters:
    """Thread-safe counters and latency samples behind the diagnostics."""

    # Images: received = paired + sync_failures + bad_inputs (+ waiting for a partner).
    # Pairs: pairs_synchronized = matched + dropped + stale + rejected + match_errors + without_matcher
    # (+ at most one waiting and one in inference).
    NAMES = ("image0_received", "image1_received", "pairs_synchronized", "pairs_matched", "pairs_dropped",
             "pairs_stale", "pairs_rejected", "sync_failures", "bad_inputs", "match_errors",
             "pairs_without_matcher", "debug_images_built", "matcher_builds", "clock_jumps_back",
             # geometric verification: pairs with a model / without one (any reason), and why not for essential
             "pairs_verified", "verification_failures", "camera_info_missing", "camera_info_inconsistent",
             # frames whose passing matches exceeded the cap (only the most confident published)
             "frames_capped")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values = dict.fromkeys(self.NAMES, 0)
        self.timings: deque[tuple[float, float, float]] = deque()  # (monotonic s, latency ms, inference ms)
        self.last_timing: tuple[float, float] | None = None
        self.verdicts: deque[tuple[float, int, int]] = deque()  # (monotonic s, inliers, matches) of verified pairs

    def add_verdict(self, num_inliers: int, num_matches: int) -> None:
        with self.lock:
            self.verdicts.append((time.monotonic(), num_inliers, num_matches))

    def verdicts_since(self, since: float) -> list[tuple[float, int, int]]:
        """Verified pairs after monotonic time `since` (older ones are forgotten)."""
        with self.lock:
            while self.verdicts and self.verdicts[0][0] <= since - DIAG_WINDOW_S:
                self.verdicts.popleft()
            return [v for v in self.verdicts if v[0] > since]

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.values[name] += n

    def add_timing(self, latency_ms: float, inference_ms: float) -> None:
        with self.lock:
            self.timings.append((time.monotonic(), latency_ms, inference_ms))
            self.last_timing = (latency_ms, inference_ms)

    def snapshot(self, window_s: float) -> tuple[dict[str, int], list[tuple[float, float, float]]]:
        """The counters, and the timings of the last `window_s` seconds (older ones are forgotten)."""
        with self.lock:
            cutoff = time.monotonic() - window_s
            while self.timings and self.timings[0][0] < cutoff:
                self.timings.popleft()
            return dict(self.values), list(self.timings)


class MatcherNode(Node):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self._log_times: dict[str, float] = {}
        self._log_lock = threading.Lock()
        self._python_log_bridge = PythonLogBridge(self)  # the core's Python logging -> this node's ROS logger
        self.counters = Counters()
        self.add_on_set_parameters_callback(self._validate_parameters)
        for spec in PARAMS:
            self.declare_parameter(spec.name, spec.default, parameter_descriptor(spec))
        self.params: dict[str, Any] = {p.name: self.get_parameter(p.name).value for p in PARAMS}
        self.sync = make_synchronizer(self.params)
        self._jumped_back_at = -1e9
        # A looping bag sets the clock back: forget the stamp history, or every frame is "older".
        self._jump_handle = self.get_clock().create_jump_callback(
            JumpThreshold(min_forward=None, min_backward=Duration(nanoseconds=-1)), post_callback=self._on_time_jump)
        self._image0_frame_id = ""

        # matcher state, written by the worker thread
        self.matcher_state = "loading"
        self.matcher_error = ""
        self.matcher_info: dict[str, Any] = {}
        self.last_error = ""
        self._last_verification_failure = ""  # why the last pair without a model has none

        qos_override = QoSOverridingOptions.with_default_policies()
        self.matches_pub = self.create_publisher(
            self._msg_types()[0], "matches", QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE),
            qos_overriding_options=qos_override)
        self.info_pub = self.create_publisher(
            self._msg_types()[1], "matcher_info", QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        self.debug_pub = self.create_publisher(Image, "debug_image", QoSProfile(depth=1))
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", QoSProfile(depth=10))

        self.compressed = self.params["image_transport"] == "compressed"
        self.input_topics = [self._input_topic(i) for i in range(2 if self.params["mode"] == "stereo" else 1)]
        input_type = CompressedImage if self.compressed else Image
        self.subscriptions_ = [
            self.create_subscription(input_type, topic, lambda m, i=i: self._on_image(i, m), qos_profile_sensor_data,
                                     qos_overriding_options=qos_override)
            for i, topic in enumerate(self.input_topics)]
        # intrinsics for geometry essential: camera_info0 (image0's camera), camera_info1 (image1's; stereo only)
        self.intrinsics = IntrinsicsStore([self.resolve_topic_name(f"camera_info{i}")
                                           for i in range(len(self.input_topics))])
        self.camera_info_subscriptions = [
            self.create_subscription(CameraInfo, topic, lambda m, i=i: self._on_camera_info(i, m),
                                     qos_profile_sensor_data)
            for i, topic in enumerate(self.intrinsics.topics)]
        self.add_post_set_parameters_callback(self._apply_parameters)

        self.worker: MatcherWorker[WorkItem] = MatcherWorker(
            build=self._build_matcher, process=self._process, on_state=self._on_matcher_state,
            on_error=self._on_worker_error, on_unprocessed=self._on_unprocessed,
            update=lambda matcher, params: matcher.update(matcher_config(params)))
        self.worker.start(dict(self.params))

        self._steady = Clock(clock_type=ClockType.STEADY_TIME)
        self._diag_history: deque[tuple[float, dict[str, int]]] = deque([(time.monotonic(),
                                                                          dict(self.counters.values))])
        # Steady clock: diagnostics keep flowing under use_sim_time even when /clock is paused.
        self.diag_timer = self.create_timer(1.0, self._publish_diagnostics, clock=self._steady)
        self.get_logger().info(
            f"{NODE_NAME} up: mode={self.params['mode']}, sync={self.sync_policy()}, "
            f"inputs {' + '.join(self.input_topics)} ({input_type.__name__}), "
            f"output {self.resolve_topic_name('matches')}; transport: {profile_in_effect()}")
        if not self.params["checkpoint_path"] and self.params["variant"] == "eloftr":
            self.get_logger().warning("checkpoint_path is empty: running the bundled demo model (not MatchAnything's "
                                      "weights); set checkpoint_path for real matching")

    def _input_topic(self, index: int) -> str:
        """image0/image1, resolved (namespace, remapping); `<that>/compressed` like image_transport."""
        base = self.resolve_topic_name(f"image{index}")
        return f"{base}/compressed" if self.compressed else base

    @staticmethod
    def _msg_types() -> tuple[Any, Any]:
        from ..msg import KeypointMatches, MatcherInfo  # generated by rosidl into the package

        return KeypointMatches, MatcherInfo

    # ------------------------------------------------------------------ logging
    def _warn(self, key: str, text: str, level: str = "warning") -> None:
        """Log `text` at `level` ("error", "warning", "info"), but the same `key` at most once per
        LOG_REPEAT_S (bad input can arrive at 30 Hz)."""
        if not self._recently_logged(key):
            self.log_at(LOG_LEVELS.get(level, logging.WARNING), text)

    def _recently_logged(self, key: str) -> bool:
        """True when `key` was logged less than LOG_REPEAT_S ago; else remember now and return False."""
        now = time.monotonic()
        with self._log_lock:
            if now - self._log_times.get(key, -1e9) < LOG_REPEAT_S:
                return True
            self._log_times[key] = now
            return False

    def log_at(self, level: int, text: str) -> None:
        """Log `text` through the node's ROS logger at a Python logging level.

        rclpy binds each line that calls its logger to the first severity logged there and raises
        ValueError ("Logger severity cannot be changed between calls") on another one, so each
        severity has its own call below: never one call with a severity chosen at run time."""
        logger = self.get_logger()
        if level >= logging.ERROR:
            logger.error(text)
        elif level >= logging.WARNING:
            logger.warning(text)
        elif level >= logging.INFO:
            logger.info(text)
        else:
            logger.debug(text)

    def destroy_node(self) -> None:
        self._python_log_bridge.close()
        super().destroy_node()

    def sync_policy(self) -> str:
        if self.params["mode"] == "sequential":
            return "sequential"
        if self.params["approximate_sync"]:
            tol = self.params["approximate_sync_tolerance_seconds"]
            return f"approximate (tolerance {tol} s)" if tol > 0 else "approximate"
        return "exact"

    # ------------------------------------------------------------------ parameters
    def _validate_parameters(self, params: list[Parameter]) -> SetParametersResult:
        merged = dict(getattr(self, "params", {}))
        for p in params:
            spec = PARAMS_BY_NAME.get(p.name)
            if spec is None:
                continue  # use_sim_time, qos_overrides.* are validated by rclpy
            try:
                merged[p.name] = spec.validate(p.value)
            except ConfigError as exc:
                return SetParametersResult(successful=False, reason=str(exc))
        if hasattr(self, "params") and any(p.name in MATCHER_PARAMS for p in params):
            try:
                matcher_config(merged)
            except ConfigError as exc:
                return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

    def _apply_parameters(self, params: list[Parameter]) -> None:
        changed = {p.name for p in params if p.name in PARAMS_BY_NAME}
        for name in changed:
            self.params[name] = self.get_parameter(name).value
        if changed & set(SYNC_PARAMS):
            self.sync = make_synchronizer(self.params)
            self.get_logger().info(f"synchronizer is now {self.sync_policy()}, queue_size {self.params['queue_size']}")
        if changed & MATCHER_PARAMS:
            self.matcher_state = "loading"
            self.get_logger().info(f"reconfiguring the matcher ({', '.join(sorted(changed & MATCHER_PARAMS))})")
            self.worker.reconfigure(dict(self.params))

    # ------------------------------------------------------------------ input (executor thread)
    def _now_ns(self) -> int:
        return int(self.get_clock().now().nanoseconds)

    def _on_time_jump(self, jump: TimeJump) -> None:
        if jump.delta.nanoseconds < 0:
            self._warn("jump", f"the clock jumped back by {-jump.delta.nanoseconds / NS_PER_S:.3f} s (bag looped?): "
                               "resetting the synchronizer (counted in clock_jumps_back)")
            self.sync.reset()
            self._jumped_back_at = time.monotonic()
            self.counters.add("clock_jumps_back")

    def _on_image(self, index: int, msg: Any) -> None:
        """Validate, then synchronise, then age: bad input is reported as bad input, never as stale."""
        self.counters.add(f"image{index}_received")
        now = self._now_ns()
        try:
            (check_compressed_msg if self.compressed else check_image_msg)(msg, f"image{index}")
        except InputImageError as exc:
            self.counters.add("bad_inputs")
            self.last_error = str(exc)
            stamp_text = format_stamp(stamp_to_ns(msg.header.stamp.sec, msg.header.stamp.nanosec))
            self._warn(f"bad:{exc}", f"image stamped {stamp_text} skipped: {exc}")
            return
        if not msg.header.frame_id:
            self._warn(f"frame{index}", f"image{index} has an empty frame_id: matched, but the keypoints cannot be "
                                        "placed in a TF frame (set the camera driver's frame_id)")
        if index == 0:
            self._image0_frame_id = msg.header.frame_id
        stamp = stamp_to_ns(msg.header.stamp.sec, msg.header.stamp.nanosec)
        failures_before = self.sync.stats.sync_failures
        try:
            try:
                pairs = self.sync.add(index, stamp, msg)
            except StampOrderError:
                # Right after the clock jumped back, frames of the old and the new pass can arrive
                # in either order around the jump: start over from this frame.
                if time.monotonic() - self._jumped_back_at > JUMP_GRACE_S:
                    raise
                self.sync.reset()
                pairs = self.sync.add(index, stamp, msg)
        except StampOrderError as exc:
            self.counters.add("bad_inputs")
            self.last_error = str(exc)
            self._warn(f"order{index}", str(exc))
            return
        finally:
            self.counters.add("sync_failures", self.sync.stats.sync_failures - failures_before)
        if not pairs:
            return
        self.counters.add("pairs_synchronized", len(pairs))
        self.counters.add("pairs_dropped", len(pairs) - 1)  # more than one complete at once: keep the newest
        pair = pairs[-1]
        if self._is_stale(pair, now):
            return
        if self.worker.submit(WorkItem(pair, now)):
            self.counters.add("pairs_dropped")

    def _is_stale(self, pair: SyncedPair[Any], now_ns: int) -> bool:
        max_age = float(self.params["max_input_age"])
        age_s = (now_ns - pair.newest_stamp) / NS_PER_S
        if max_age > 0 and age_s > max_age:
            self.counters.add("pairs_stale")
            self.last_error = f"stale input: {age_s:.3f} s old (max_input_age {max_age} s)"
            kind, hint = self._stale_hint(age_s)
            self._warn(f"stale:{kind}", f"dropping a pair stamped {format_stamp(pair.stamp0)}: {age_s:.3f} s old "
                                             f"against the node clock (max_input_age {max_age} s); {hint}")
            return True
        return False

    def _stale_hint(self, age_s: float) -> tuple[str, str]:
        """(kind, text): why a pair may be old; a bag hint only when the evidence points there."""
        sim_time = bool(self.get_parameter("use_sim_time").value)
        if not sim_time and age_s > BAG_HINT_AGE_S:
            return "bag", (f"stamps {age_s:.0f} s behind the wall clock look recorded: replaying a bag? set "
                           "use_sim_time:=true and publish /clock")
        if sim_time:
            return "sim", "under use_sim_time the node clock is /clock: is the bag player publishing it (--clock)?"
        return "live", ("the camera's clock may be behind this computer's (synchronise them, e.g. chrony/PTP), or "
                        "transport/inference lags; raise max_input_age if this delay is acceptable")

    # ------------------------------------------------------------------ worker thread
    def _build_matcher(self, params: dict[str, Any]) -> Any:
        from ..core.matcher import Matcher

        self.get_logger().info(
            f"loading the matcher: variant={params['variant']} backend={params['backend']} device={params['device']} "
            f"checkpoint={params['checkpoint_path'] or '(bundled demo model)'} "
            f"engine={params['engine_file_path'] or '(default location)'}")
        return Matcher(matcher_config(params))

    def _on_matcher_state(self, matcher: Any, error: BaseException | None) -> None:
        if error is not None:
            self.matcher_state = "error"
            self.matcher_error = f"{type(error).__name__}: {error}"
            self.matcher_info = {}
            self.get_logger().error(f"the matcher could not be created: {self.matcher_error}. The node keeps running "
                                    "and drops pairs until a parameter change fixes it")
            return
        info = dict(matcher.info)
        self.matcher_info, self.matcher_state, self.matcher_error = info, "ready", ""
        self.counters.add("matcher_builds")
        self.get_logger().info(
            f"matcher ready: variant={info.get('variant')} backend={info.get('backend')} device={info.get('device')} "
            f"precision={info.get('precision')}" + (" -- demo model (not MatchAnything's weights)"
                                                    if info.get("is_demo_model") else ""))
        self.info_pub.publish(self._info_msg(info))

    def _info_msg(self, info: dict[str, Any]) -> Any:
        msg = self.info_pub.msg_type(**matcher_info_fields(info))
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = self._image0_frame_id
        return msg

    def _on_unprocessed(self, item: WorkItem) -> None:
        self.counters.add("pairs_without_matcher")
        self._warn("nomatcher", f"pair stamped {format_stamp(item.pair.stamp0)} not matched: the matcher is "
                                f"{self.matcher_state}" + (f" ({self.matcher_error})" if self.matcher_error else ""))

    def _on_worker_error(self, exc: BaseException, trace: str) -> None:
        if not self.context.ok():
            return  # shutting down: the publishers are gone, nothing to report
        self.counters.add("match_errors")
        self.last_error = f"{type(exc).__name__}: {exc}"
        self._warn(f"error:{type(exc).__name__}", f"matching failed: {self.last_error}\n{trace}", level="error")

    def _process(self, matcher: Any, item: WorkItem) -> None:
        # Aged once, when the pair was complete: the latest-only slot bounds its wait here.
        pair = item.pair
        decode = compressed_msg_to_array if self.compressed else image_msg_to_array
        t0 = time.perf_counter()
        try:
            img0 = decode(pair.msg0, "image0")
            img1 = decode(pair.msg1, "image1")
        except InputImageError as exc:
            self.counters.add("pairs_rejected")
            self.last_error = str(exc)
            self._warn(f"bad:{exc}", f"pair stamped {format_stamp(pair.stamp0)} skipped: {exc}")
            return
        if img0.shape[:2] != img1.shape[:2]:
            h0, w0 = img0.shape[:2]
            h1, w1 = img1.shape[:2]
            self._warn(f"sizes:{img0.shape}:{img1.shape}",
                       f"image0 is {w0}x{h0} but image1 is {w1}x{h1}: matching images of different sizes "
                       "(keypoints are in each image's own pixels)")
        convert_ms = (time.perf_counter() - t0) * 1e3
        K0, K1, no_intrinsics = self._intrinsics_for(matcher, pair, img0, img1)
        try:
            result = matcher.match(img0, img1, K0, K1)
        except InputImageError as exc:
            self.counters.add("pairs_rejected")
            self.last_error = str(exc)
            self._warn(f"bad:{exc}", f"pair stamped {format_stamp(pair.stamp0)} skipped: {exc}")
            return
        self._account_verdict(result, no_intrinsics)
        out = self._matches_msg(pair, img0, img1, result, convert_ms)
        self.matches_pub.publish(out)
        now = self._now_ns()
        inference_ms = float(result.timings_ms.get("inference", float("nan")))
        self.counters.add("pairs_matched")
        if result.extras.get("matches_capped"):
            self.counters.add("frames_capped")
        self.counters.add_timing((now - pair.stamp0) / 1e6, inference_ms)
        if self.debug_pub.get_subscription_count() > 0:
            self._publish_debug(pair, img0, img1, result)

    def _on_camera_info(self, index: int, msg: Any) -> None:
        self.intrinsics.add(index, stamp_to_ns(msg.header.stamp.sec, msg.header.stamp.nanosec), list(msg.k),
                            msg.width, msg.height)

    def _intrinsics_for(self, matcher: Any, pair: SyncedPair[Any], img0: np.ndarray,
                        img1: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None, str]:
        """(K0, K1, why not) for geometry essential: each image's camera_info (sequential mode: both frames are
        image0's camera). A missing or unfitting one is counted and logged; the pair is still published,
        with no model and the reason in the message."""
        if matcher.config.geometry != "essential":
            return None, None, ""
        second = 1 if self.params["mode"] == "stereo" else 0
        lookups = [self.intrinsics.lookup(0, pair.stamp0, img0.shape[1], img0.shape[0]),
                   self.intrinsics.lookup(second, pair.stamp1, img1.shape[1], img1.shape[0])]
        problems = [lk for lk in lookups if lk.K is None]
        for lk in problems[:1]:  # one count per pair
            self.counters.add(lk.code)
            self.last_error = lk.reason
            self._warn(f"camera_info:{lk.reason}", f"pair stamped {format_stamp(pair.stamp0)}: {lk.reason}")
        return lookups[0].K, lookups[1].K, problems[0].reason if problems else ""

    def _account_verdict(self, result: Any, no_intrinsics: str) -> None:
        """Count the geometric verification's verdict (diagnostics: inlier ratio, failures and why)."""
        geometry = result.geometry
        if geometry is None:
            return
        if no_intrinsics and not geometry.found:
            geometry.reason = no_intrinsics  # the node knows better than "K0 is missing": which topic, what is wrong
        if geometry.found:
            self.counters.add("pairs_verified")
            # with publish_inliers_only the result holds the inliers alone: the ratio is of the matches verified
            self.counters.add_verdict(geometry.num_inliers, geometry.extras.get("num_matches", len(geometry.inliers)))
        else:
            self.counters.add("verification_failures")
            self._last_verification_failure = geometry.reason

    def _matches_msg(self, pair: SyncedPair[Any], img0: np.ndarray, img1: np.ndarray, result: Any,
                     convert_ms: float) -> Any:
        return build_matches_msg(self.matches_pub.msg_type, pair.msg0.header, pair.msg1.header, img0.shape, img1.shape,
                                 result, self.matcher_info, convert_ms)

    def _publish_debug(self, pair: SyncedPair[Any], img0: np.ndarray, img1: np.ndarray, result: Any) -> None:
        from ..core.viz import draw_matches

        geometry = result.geometry  # with geometric verification: inliers and outliers in two colours
        canvas = draw_matches(to_rgb(img0), to_rgb(img1), result.keypoints0, result.keypoints1, result.confidence,
                              demo_model=bool(self.matcher_info.get("is_demo_model")), inliers=result.inliers,
                              labels=(f"{geometry.model} inliers" if geometry else "inliers", "outliers"))
        self.debug_pub.publish(array_to_image_msg(canvas, pair.msg0.header))
        self.counters.add("debug_images_built")

    # ------------------------------------------------------------------ diagnostics (executor, steady timer)
    def _publish_diagnostics(self) -> None:
        values, timings = self.counters.snapshot(2 * DIAG_WINDOW_S)
        now = time.monotonic()
        history = self._diag_history
        history.append((now, values))
        while len(history) > 2 and now - history[1][0] >= DIAG_WINDOW_S:
            history.popleft()  # keep the newest snapshot at least DIAG_WINDOW_S old as the window's start
        then, before = history[0]
        timings = [t for t in timings if t[0] > then]  # the same window as the counters' differences
        window = max(now - then, 1e-6)
        delta = {name: values[name] - before[name] for name in values}
        status = DiagnosticStatus(name=self.get_fully_qualified_name(), hardware_id=self._hardware_id())
        status.level, status.message = self._diagnostic_level(values, delta, window)

        fields: list[tuple[str, Any]] = [
            ("window_s", f"{window:.1f}"),
            ("image0_rate_hz", f"{delta['image0_received'] / window:.2f}"),
            ("image1_rate_hz", f"{delta['image1_received'] / window:.2f}"),
            ("pair_rate_hz", f"{delta['pairs_synchronized'] / window:.2f}"),
            ("output_rate_hz", f"{delta['pairs_matched'] / window:.2f}"),
            *[(k, v) for k, v in values.items()],
            # who publishes the inputs now (a camera driver that died or restarted shows here)
            *[(f"image{i}_publishers", sub.get_publisher_count()) for i, sub in enumerate(self.subscriptions_)],
        ]
        if timings:  # means over the window; nothing matched in it: the keys are left out, saying why
            latencies, inferences = np.array([t[1] for t in timings]), np.array([t[2] for t in timings])
            fields += [("latency_ms_mean", f"{latencies.mean():.1f}"), ("latency_ms_max", f"{latencies.max():.1f}"),
                       ("inference_ms_mean", f"{np.nanmean(inferences) if np.isfinite(inferences).any() else 0:.1f}")]
        else:
            fields.append(("timing", f"no pair matched in the last {window:.1f} s"))
        if self.counters.last_timing is not None:
            fields += [("latency_ms_last", f"{self.counters.last_timing[0]:.1f}"),
                       ("inference_ms_last", f"{self.counters.last_timing[1]:.1f}")]
        fields += self._geometry_diagnostics(then, window)
        fields += [
            ("worker_busy", self.worker.busy),
            ("matcher_state", self.matcher_state),
            ("backend", self.matcher_info.get("backend", self.params["backend"])),
            ("device", self.matcher_info.get("device", self.params["device"])),
            ("variant", self.params["variant"]),
            ("precision", self.matcher_info.get("precision", self.params["precision"])),
            ("checkpoint", self.matcher_info.get("checkpoint", self.params["checkpoint_path"])),
            ("mode", self.params["mode"]),
            ("image_transport", self.params["image_transport"]),
            ("sync_policy", self.sync_policy()),
            ("last_error", self.matcher_error or self.last_error),
        ]
        status.values = [KeyValue(key=k, value=str(v)) for k, v in fields]
        diag = DiagnosticArray(status=[status])
        diag.header.stamp = self.get_clock().now().to_msg()
        self.diag_pub.publish(diag)

    def _geometry_diagnostics(self, since: float, window: float) -> list[tuple[str, Any]]:
        """The verification's share of inliers over the window (mean of the pairs' ratios) and the last one."""
        geometry = self.params["geometry"]
        if geometry == "none":
            return [("geometry", geometry)]
        fields: list[tuple[str, Any]] = [("geometry", geometry)]
        ratios = [inliers / max(matches, 1) for _t, inliers, matches in self.counters.verdicts_since(since)]
        if ratios:
            fields += [("inlier_ratio_mean", f"{np.mean(ratios):.3f}"), ("inlier_ratio_last", f"{ratios[-1]:.3f}")]
        else:
            fields.append(("inlier_ratio", f"no pair verified in the last {window:.1f} s"))
        fields.append(("last_verification_failure", self._last_verification_failure))
        return fields

    def _hardware_id(self) -> str:
        """The device inference runs on (what the matcher reports once built, else the parameter)."""
        return str(self.matcher_info.get("device", self.params["device"]))

    def _diagnostic_level(self, values: dict[str, int], delta: dict[str, int], window: float) -> tuple[bytes, str]:
        """ERROR: the backend cannot run. WARN: trouble within the window (or still loading). OK otherwise."""
        if self.matcher_state == "error":
            return DiagnosticStatus.ERROR, f"matcher unavailable: {self.matcher_error}"
        problems = [f"{delta[name]} {what}" for name, what in WARN_COUNTERS if delta[name] > 0]
        if delta["sync_failures"] > 0 and delta["pairs_synchronized"] == 0:
            hint = ("try approximate_sync" if self.params["mode"] == "stereo" and not self.params["approximate_sync"]
                    else "raise approximate_sync_tolerance_seconds or queue_size")
            problems.insert(0, f"{delta['sync_failures']} images found no partner; {hint}")
        if problems:
            detail = f" (last: {self.last_error})" if self.last_error else ""
            return DiagnosticStatus.WARN, f"in the last {window:.0f} s: " + "; ".join(problems) + detail
        if self.matcher_state == "loading":
            return DiagnosticStatus.WARN, "loading the matcher"
        if values["image0_received"] == 0:
            return DiagnosticStatus.OK, "waiting for images"
        return DiagnosticStatus.OK, "matching"

    def shutdown(self) -> bool:
        """Stop the worker: True when it ended, False when an inference is still running after
        SHUTDOWN_JOIN_S (it cannot be interrupted; main() then exits without waiting for it)."""
        if self.worker.stop(timeout=SHUTDOWN_JOIN_S):
            return True
        self.get_logger().info(f"an inference is still running after {SHUTDOWN_JOIN_S} s: exiting without its result")
        return False


def build_matches_msg(msg_type: Any, header0: Any, header1: Any, shape0: tuple[int, ...], shape1: tuple[int, ...],
                      result: Any, info: dict[str, Any], convert_ms: float = 0.0) -> Any:
    """A KeypointMatches for `result`: header = image0's, image1's stamp and frame explicit."""
    timings = dict(result.timings_ms)
    timings["preprocess"] = float(timings.get("preprocess", 0.0)) + convert_ms  # + the Image -> array conversion
    fields = keypoint_matches_fields(shape0, shape1, result, info, timings)
    for name in MATCH_ARRAY_FIELDS:  # rclpy takes array.array for float32[] without a per-element loop
        fields[name] = float32_sequence(fields[name])
    fields["inliers"] = fields["inliers"].tolist()  # rclpy's bool[] takes Python bools only
    return msg_type(header=header0, image1_stamp=header1.stamp, image1_frame_id=header1.frame_id, **fields)


def float32_sequence(values: np.ndarray) -> array.array:
    """An rclpy float32[] field value from a NumPy array, without a per-element Python loop."""
    out = array.array("f")
    out.frombytes(np.ascontiguousarray(values, dtype=np.float32).tobytes())
    return out


def main(argv: list[str] | None = None, node_class: type[MatcherNode] = MatcherNode) -> int:
    """Run the node until SIGINT/SIGTERM. `node_class`: a subclass of MatcherNode to run instead, with the
    same start-up errors, signal handling and shutdown (the fault-injection test runs one)."""
    # Our own SIGINT/SIGTERM handlers instead of rclpy's: rclpy's shut the context down at once, so the
    # worker's last publish and every log line after it failed with "publisher's context is invalid".
    # Here a signal only ends the spin loop; the worker is stopped while the context is still valid.
    rclpy.init(args=argv if argv is not None else sys.argv, signal_handler_options=SignalHandlerOptions.NO)
    try:
        node = node_class()
    except (InvalidParameterValueException, ParameterException, MatchAnythingError) as exc:
        hint = " (write floating-point parameters with a decimal point, e.g. 1.0)" if isinstance(
            exc, InvalidParameterTypeException) else ""
        print(f"matcher_node: invalid configuration: {exc}{hint}", file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        while not stop.is_set() and rclpy.ok():
            executor.spin_once(timeout_sec=SIGNAL_POLL_S)  # Python runs signal handlers between these calls
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        worker_done = node.shutdown()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not worker_done:
        # Torch is mid-inference in the worker thread and cannot be interrupted; letting the interpreter
        # finalise under it aborts ("terminate called without an active exception"). Exit now instead.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
