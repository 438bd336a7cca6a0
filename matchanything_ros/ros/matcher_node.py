"""`matcher_node`: matches synchronized image pairs and publishes KeypointMatches.

Threads: the executor (main thread) runs the image callbacks, which only synchronize stamps and
put the newest pair into a one-slot buffer, plus parameters, /clock and the 1 Hz diagnostics
timer. ONE worker thread owns the Matcher (created there, so a CUDA context/stream belongs to it),
converts the images, matches and publishes. The executor is never blocked by inference.
"""
from __future__ import annotations

import array
import sys
import threading
import time
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
from sensor_msgs.msg import Image

from ..core.errors import ConfigError, InputImageError, MatchAnythingError
from ..core.params import MATCHER_PARAM_NAMES, PARAMS, PARAMS_BY_NAME, ParamSpec
from .image_conv import array_to_image_msg, image_msg_to_array, to_rgb
from .message_fields import MATCH_ARRAY_FIELDS, keypoint_matches_fields, matcher_info_fields
from .sync import (NS_PER_S, SYNC_PARAMS, StampOrderError, SyncedPair, format_stamp, make_synchronizer,
                   stamp_to_ns)
from .worker import MatcherWorker

NODE_NAME = "matcher_node"
# Parameters that need a restart: the subscriptions depend on them.
READ_ONLY_PARAMS = frozenset({"mode"})
MATCHER_PARAMS = frozenset(MATCHER_PARAM_NAMES)  # a change rebuilds the matcher
LOG_REPEAT_S = 5.0  # the same warning text is logged at most once per this period
JUMP_GRACE_S = 1.0  # after the clock jumped back, older stamps restart the synchronizer for this long


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


@dataclass
class WorkItem:
    pair: SyncedPair[Image]
    received_ns: int  # node clock when the pair was complete


class Counters:
    """Thread-safe counters and latency samples behind the diagnostics."""

    NAMES = ("image0_received", "image1_received", "pairs_synchronized", "pairs_matched", "pairs_dropped",
             "pairs_stale", "sync_failures", "bad_inputs", "match_errors", "pairs_without_matcher",
             "debug_images_built")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values = dict.fromkeys(self.NAMES, 0)
        self.latencies_ms: list[float] = []
        self.inference_ms: list[float] = []
        self.last_latency_ms = float("nan")
        self.last_inference_ms = float("nan")

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.values[name] += n

    def add_timing(self, latency_ms: float, inference_ms: float) -> None:
        with self.lock:
            self.latencies_ms.append(latency_ms)
            self.inference_ms.append(inference_ms)
            self.last_latency_ms, self.last_inference_ms = latency_ms, inference_ms

    def snapshot(self) -> tuple[dict[str, int], list[float], list[float]]:
        with self.lock:
            lat, inf = self.latencies_ms, self.inference_ms
            self.latencies_ms, self.inference_ms = [], []
            return dict(self.values), lat, inf


class MatcherNode(Node):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self._log_times: dict[str, float] = {}
        self._log_lock = threading.Lock()
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

        qos_override = QoSOverridingOptions.with_default_policies()
        self.matches_pub = self.create_publisher(
            self._msg_types()[0], "matches", QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE),
            qos_overriding_options=qos_override)
        self.info_pub = self.create_publisher(
            self._msg_types()[1], "matcher_info", QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        self.debug_pub = self.create_publisher(Image, "debug_image", QoSProfile(depth=1))
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", QoSProfile(depth=10))

        self.subscriptions_ = [
            self.create_subscription(Image, "image0", lambda m: self._on_image(0, m), qos_profile_sensor_data,
                                     qos_overriding_options=qos_override)]
        if self.params["mode"] == "stereo":
            self.subscriptions_.append(
                self.create_subscription(Image, "image1", lambda m: self._on_image(1, m), qos_profile_sensor_data,
                                         qos_overriding_options=qos_override))
        self.add_post_set_parameters_callback(self._apply_parameters)

        self.worker: MatcherWorker[WorkItem] = MatcherWorker(
            build=self._build_matcher, process=self._process, on_state=self._on_matcher_state,
            on_error=self._on_worker_error, on_unprocessed=self._on_unprocessed)
        self.worker.start(dict(self.params))

        self._steady = Clock(clock_type=ClockType.STEADY_TIME)
        self._diag_prev: tuple[float, dict[str, int]] = (time.monotonic(), dict(self.counters.values))
        # Steady clock: diagnostics keep flowing under use_sim_time even when /clock is paused.
        self.diag_timer = self.create_timer(1.0, self._publish_diagnostics, clock=self._steady)
        self.get_logger().info(
            f"{NODE_NAME} up: mode={self.params['mode']}, sync={self.sync_policy()}, "
            f"inputs {self.resolve_topic_name('image0')}"
            + (f" + {self.resolve_topic_name('image1')}" if self.params["mode"] == "stereo" else "")
            + f", output {self.resolve_topic_name('matches')}")

    @staticmethod
    def _msg_types() -> tuple[Any, Any]:
        from ..msg import KeypointMatches, MatcherInfo  # generated by rosidl into the package

        return KeypointMatches, MatcherInfo

    # ------------------------------------------------------------------ logging
    def _warn(self, key: str, text: str, level: str = "warning") -> None:
        """Log `text`, but the same `key` at most once per LOG_REPEAT_S (bad input can arrive at 30 Hz)."""
        now = time.monotonic()
        with self._log_lock:
            if now - self._log_times.get(key, -1e9) < LOG_REPEAT_S:
                return
            self._log_times[key] = now
        getattr(self.get_logger(), level)(text)

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
            self.get_logger().warning(
                f"the clock jumped back by {-jump.delta.nanoseconds / NS_PER_S:.3f} s (bag looped?): "
                "resetting the synchronizer")
            self.sync.reset()
            self._jumped_back_at = time.monotonic()

    def _on_image(self, index: int, msg: Image) -> None:
        self.counters.add(f"image{index}_received")
        if index == 0:
            self._image0_frame_id = msg.header.frame_id
        now = self._now_ns()
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

    def _is_stale(self, pair: SyncedPair[Image], now_ns: int) -> bool:
        max_age = float(self.params["max_input_age"])
        age_s = (now_ns - pair.newest_stamp) / NS_PER_S
        if max_age > 0 and age_s > max_age:
            self.counters.add("pairs_stale")
            self._warn("stale", f"dropping a pair stamped {format_stamp(pair.stamp0)}: {age_s:.3f} s old against the "
                                f"node clock (max_input_age {max_age} s); replaying a bag? set use_sim_time:=true "
                                "and publish /clock")
            return True
        return False

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
        self.get_logger().info(
            f"matcher ready: variant={info.get('variant')} backend={info.get('backend')} device={info.get('device')} "
            f"precision={info.get('precision')}" + (" (DEMO MODEL: our small ELoFTR, NOT MatchAnything's weights)"
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
        pair = item.pair
        if self._is_stale(pair, self._now_ns()):
            return
        t0 = time.perf_counter()
        try:
            img0 = image_msg_to_array(pair.msg0, "image0")
            img1 = image_msg_to_array(pair.msg1, "image1")
        except InputImageError as exc:
            self.counters.add("bad_inputs")
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
        try:
            result = matcher.match(img0, img1)
        except InputImageError as exc:
            self.counters.add("bad_inputs")
            self.last_error = str(exc)
            self._warn(f"bad:{exc}", f"pair stamped {format_stamp(pair.stamp0)} skipped: {exc}")
            return
        out = self._matches_msg(pair, img0, img1, result, convert_ms)
        self.matches_pub.publish(out)
        now = self._now_ns()
        inference_ms = float(result.timings_ms.get("inference", float("nan")))
        self.counters.add("pairs_matched")
        self.counters.add_timing((now - pair.stamp0) / 1e6, inference_ms)
        if self.debug_pub.get_subscription_count() > 0:
            self._publish_debug(pair, img0, img1, result)

    def _matches_msg(self, pair: SyncedPair[Image], img0: np.ndarray, img1: np.ndarray, result: Any,
                     convert_ms: float) -> Any:
        return build_matches_msg(self.matches_pub.msg_type, pair.msg0.header, pair.msg1.header, img0.shape, img1.shape,
                                 result, self.matcher_info, convert_ms)

    def _publish_debug(self, pair: SyncedPair[Image], img0: np.ndarray, img1: np.ndarray, result: Any) -> None:
        from ..core.viz import draw_matches

        canvas = draw_matches(to_rgb(img0), to_rgb(img1), result.keypoints0, result.keypoints1, result.confidence)
        self.debug_pub.publish(array_to_image_msg(canvas, pair.msg0.header))
        self.counters.add("debug_images_built")

    # ------------------------------------------------------------------ diagnostics (executor, steady timer)
    def _publish_diagnostics(self) -> None:
        values, latencies, inferences = self.counters.snapshot()
        now = time.monotonic()
        prev_t, prev = self._diag_prev
        self._diag_prev = (now, values)
        dt = max(now - prev_t, 1e-6)

        def rate(name: str) -> float:
            return (values[name] - prev[name]) / dt

        new_failures = values["sync_failures"] - prev["sync_failures"]
        new_pairs = values["pairs_synchronized"] - prev["pairs_synchronized"]

        status = DiagnosticStatus(name=f"{self.get_name()}: matcher", hardware_id=str(
            self.matcher_info.get("device", self.params["device"])))
        level, message = DiagnosticStatus.OK, "matching"
        if self.matcher_state == "error":
            level, message = DiagnosticStatus.ERROR, f"matcher unavailable: {self.matcher_error}"
        elif self.matcher_state == "loading":
            level, message = DiagnosticStatus.WARN, "loading the matcher"
        elif new_failures > 0 and new_pairs == 0:
            hint = ("try approximate_sync" if self.params["mode"] == "stereo" and not self.params["approximate_sync"]
                    else "raise approximate_sync_tolerance_seconds or queue_size")
            level = DiagnosticStatus.WARN
            message = f"{new_failures} images found no partner in the last {dt:.1f} s; {hint}"
        elif values["pairs_stale"] > prev["pairs_stale"] and values["pairs_matched"] == prev["pairs_matched"]:
            level = DiagnosticStatus.WARN
            message = "every pair is older than max_input_age; replaying a bag? set use_sim_time:=true"
        elif values["image0_received"] == 0:
            message = "waiting for images"
        status.level, status.message = level, message

        def stat(xs: list[float], fn: Any) -> str:
            return f"{fn(xs):.1f}" if xs else "nan"

        fields: list[tuple[str, Any]] = [
            ("image0_rate_hz", f"{rate('image0_received'):.2f}"),
            ("image1_rate_hz", f"{rate('image1_received'):.2f}"),
            ("pair_rate_hz", f"{rate('pairs_synchronized'):.2f}"),
            ("output_rate_hz", f"{rate('pairs_matched'):.2f}"),
            *[(k, v) for k, v in values.items()],
            ("latency_ms_mean", stat(latencies, np.mean)),
            ("latency_ms_max", stat(latencies, np.max)),
            ("latency_ms_last", f"{self.counters.last_latency_ms:.1f}"),
            ("inference_ms_mean", stat(inferences, np.mean)),
            ("inference_ms_last", f"{self.counters.last_inference_ms:.1f}"),
            ("worker_busy", self.worker.busy),
            ("matcher_state", self.matcher_state),
            ("backend", self.matcher_info.get("backend", self.params["backend"])),
            ("device", self.matcher_info.get("device", self.params["device"])),
            ("variant", self.params["variant"]),
            ("precision", self.matcher_info.get("precision", self.params["precision"])),
            ("checkpoint", self.matcher_info.get("checkpoint", self.params["checkpoint_path"])),
            ("mode", self.params["mode"]),
            ("sync_policy", self.sync_policy()),
            ("last_error", self.matcher_error or self.last_error),
        ]
        status.values = [KeyValue(key=k, value=str(v)) for k, v in fields]
        diag = DiagnosticArray(status=[status])
        diag.header.stamp = self.get_clock().now().to_msg()
        self.diag_pub.publish(diag)

    def shutdown(self) -> None:
        if not self.worker.stop(timeout=5.0):
            self.get_logger().warning("the worker thread did not finish within 5 s (inference in progress)")


def build_matches_msg(msg_type: Any, header0: Any, header1: Any, shape0: tuple[int, ...], shape1: tuple[int, ...],
                      result: Any, info: dict[str, Any], convert_ms: float = 0.0) -> Any:
    """A KeypointMatches for `result`: header = image0's, image1's stamp and frame explicit."""
    timings = dict(result.timings_ms)
    timings["preprocess"] = float(timings.get("preprocess", 0.0)) + convert_ms  # + the Image -> array conversion
    fields = keypoint_matches_fields(shape0, shape1, result, info, timings)
    for name in MATCH_ARRAY_FIELDS:  # rclpy takes array.array for float32[] without a per-element loop
        fields[name] = float32_sequence(fields[name])
    return msg_type(header=header0, image1_stamp=header1.stamp, image1_frame_id=header1.frame_id, **fields)


def float32_sequence(values: np.ndarray) -> array.array:
    """An rclpy float32[] field value from a NumPy array, without a per-element Python loop."""
    out = array.array("f")
    out.frombytes(np.ascontiguousarray(values, dtype=np.float32).tobytes())
    return out


def main(argv: list[str] | None = None) -> int:
    rclpy.init(args=argv if argv is not None else sys.argv)
    try:
        node = MatcherNode()
    except (InvalidParameterValueException, ParameterException, MatchAnythingError) as exc:
        hint = " (write floating-point parameters with a decimal point, e.g. 1.0)" if isinstance(
            exc, InvalidParameterTypeException) else ""
        print(f"matcher_node: invalid configuration: {exc}{hint}", file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
