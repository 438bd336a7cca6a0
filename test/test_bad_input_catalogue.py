"""The catalogue of bad (and unusual) input of docs/node.md, "Bad input catalogue": one test per row.

Each row sends its input to a running node (one node per transport for the whole module) and checks
what the user sees: the specific log message, the counter that moved in /diagnostics, and that the
node is alive and matches the next good pair. Camera encodings that OpenCV converts exactly (Bayer,
packed YUV 4:2:2, 16-bit, big-endian) are matched, not refused. The CLI rows run `matchanything match`.
"""
from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import pytest

pytest.register_assert_rewrite("matcher_node_util")
from matcher_node_util import (  # noqa: E402
    NODE_CMD,
    NODE_ENV,
    NodeClient,
    StereoIO,
    image_msg,
    make_test_images,
    node_params,
    ros_args_for,
)

pytest_plugins = ("matcher_node_util",)

REPO = Path(__file__).resolve().parents[1]
IMAGES = make_test_images()
RAW_NS, COMPRESSED_NS = "/catalogue", "/catalogue_compressed"
H, W = IMAGES[0].shape[:2]


# ----------------------------------------------------------------------------- inputs
def mosaic(rgb: np.ndarray, pattern: str) -> np.ndarray:
    """A Bayer mosaic of `rgb` with the 2x2 `pattern` (e.g. "rggb": R top-left, B bottom-right)."""
    channel = {"r": 0, "g": 1, "b": 2}
    out = np.empty(rgb.shape[:2], rgb.dtype)
    for k, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        out[dy::2, dx::2] = rgb[dy::2, dx::2, channel[pattern[k]]]
    return out


def yuv422(rgb: np.ndarray, order: str) -> np.ndarray:
    """Packed 4:2:2 (H, W, 2) uint8 in byte order "uyvy" or "yuyv": BT.601 video range, as cameras send it."""
    r, g, b = (rgb[:, :, k].astype(np.float64) / 255.0 for k in range(3))
    y = np.rint(16 + 65.481 * r + 128.553 * g + 24.966 * b).astype(np.uint8)
    u = np.rint(128 - 37.797 * r - 74.203 * g + 112.0 * b)[:, 0::2].astype(np.uint8)
    v = np.rint(128 + 112.0 * r - 93.786 * g - 18.214 * b)[:, 0::2].astype(np.uint8)
    out = np.empty((rgb.shape[0], rgb.shape[1], 2), np.uint8)
    ci, yi = (0, 1) if order == "uyvy" else (1, 0)
    out[:, :, yi] = y
    out[:, 0::2, ci], out[:, 1::2, ci] = u, v
    return out


def msg_of(array: np.ndarray, stamp: int, frame: str, encoding: str, bigendian: bool = False) -> Any:
    arr = np.ascontiguousarray(array)
    msg = image_msg(arr.view(np.uint8).reshape(arr.shape[0], -1) if arr.dtype.itemsize > 1 else arr, stamp, frame,
                    encoding)
    msg.width, msg.step, msg.is_bigendian = arr.shape[1], arr.strides[0], int(bigendian)
    return msg


def encoded(encoding: str, array_of: Callable[[np.ndarray], np.ndarray], bigendian: bool = False) -> Callable:
    def make(stamp: int) -> tuple[Any, Any]:
        return tuple(msg_of(array_of(img), stamp, f"cam{i}", encoding, bigendian) for i, img in enumerate(IMAGES))
    return make


def gray(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)


def modified(change: Callable[[Any], None], which: int = 0, encoding: str = "rgb8") -> Callable:
    """A good pair with one message's fields changed by `change(msg)`."""
    def make(stamp: int) -> tuple[Any, Any]:
        msgs = [image_msg(img, stamp, f"cam{i}", encoding) for i, img in enumerate(IMAGES)]
        change(msgs[which])
        return msgs[0], msgs[1]
    return make


def set_fields(**fields: Any) -> Callable[[Any], None]:
    def change(msg: Any) -> None:
        for k, v in fields.items():
            setattr(msg, k, v)
    return change


def float_image(fill: float | None = None, scale: float = 1.0) -> Callable:
    def make(stamp: int) -> tuple[Any, Any]:
        arrays = [gray(img).astype(np.float32) / 255.0 * scale for img in IMAGES]
        if fill is not None:
            arrays[0][10:20, 10:20] = fill
        return tuple(msg_of(a, stamp, f"cam{i}", "32FC1") for i, a in enumerate(arrays))
    return make


def padded_rows(stamp: int) -> tuple[Any, Any]:
    msgs = []
    for i, img in enumerate(IMAGES):
        padded = np.zeros((H, W * 3 + 64), np.uint8)
        padded[:, :W * 3] = img.reshape(H, -1)
        msg = image_msg(padded, stamp, f"cam{i}", "rgb8")
        msg.width, msg.step = W, W * 3 + 64
        msgs.append(msg)
    return msgs[0], msgs[1]


def different_sizes(stamp: int) -> tuple[Any, Any]:
    return image_msg(IMAGES[0], stamp, "cam0"), image_msg(np.ascontiguousarray(IMAGES[1][::2, ::2]), stamp, "cam1")


def tiny(stamp: int) -> tuple[Any, Any]:
    return tuple(image_msg(np.ascontiguousarray(img[:16, :16]), stamp, f"cam{i}") for i, img in enumerate(IMAGES))


@dataclass(frozen=True)
class Row:
    id: str
    make: Callable[[int], tuple[Any, Any]]
    outcome: str  # "matched", or the diagnostics counter that must grow
    log: str  # regex the node's log must show ("" = nothing to say)


RAW_ROWS = [
    # converted exactly (OpenCV, as cv_bridge) and matched
    *[Row(f"bayer_{p}8", encoded(f"bayer_{p}8", lambda im, p=p: mosaic(im, p)), "matched", "")
      for p in ("rggb", "bggr", "gbrg", "grbg")],
    Row("bayer_rggb16", encoded("bayer_rggb16", lambda im: mosaic(im, "rggb").astype(np.uint16) * 257), "matched",
        ""),
    Row("yuv422", encoded("yuv422", lambda im: yuv422(im, "uyvy")), "matched", ""),
    Row("uyvy", encoded("uyvy", lambda im: yuv422(im, "uyvy")), "matched", ""),
    Row("yuyv", encoded("yuyv", lambda im: yuv422(im, "yuyv")), "matched", ""),
    Row("yuv422_yuy2", encoded("yuv422_yuy2", lambda im: yuv422(im, "yuyv")), "matched", ""),
    Row("16UC1", encoded("16UC1", lambda im: gray(im).astype(np.uint16) * 257), "matched", ""),
    Row("mono16_big_endian", encoded("mono16", lambda im: (gray(im).astype(np.uint16) * 257).astype(">u2"),
                                     bigendian=True), "matched", ""),
    Row("32FC1_in_0_1", float_image(), "matched", ""),
    Row("step_padding", padded_rows, "matched", ""),
    Row("different_sizes", different_sizes, "matched", r"image0 is 320x256 but image1 is 160x128"),
    Row("empty_frame_id", modified(lambda m: setattr(m.header, "frame_id", "")), "matched",
        r"image0 has an empty frame_id: matched, but the keypoints cannot be placed in a TF frame"),
    # refused in the subscription callback: counted as bad_inputs, never synchronised or aged
    Row("unknown_encoding", modified(set_fields(encoding="rgb10_packed")), "bad_inputs",
        r"image0: unsupported encoding 'rgb10_packed' \(supported: mono8"),
    Row("empty_encoding", modified(set_fields(encoding=""), which=1), "bad_inputs",
        r"image1: unsupported encoding ''"),
    Row("8UC3_ambiguous_order", modified(set_fields(encoding="8UC3")), "bad_inputs",
        r"image0: unsupported encoding '8UC3'"),
    Row("yuv422_odd_width", modified(set_fields(encoding="yuv422", width=319, step=638)), "bad_inputs",
        r"image0: yuv422 needs an even width \(2 pixels share U and V\), got 319"),
    Row("step_smaller_than_row", modified(set_fields(step=W * 3 - 4)), "bad_inputs",
        r"image0: step 956 is smaller than width\*bytes_per_pixel = 320\*3 = 960"),
    Row("data_too_short", modified(set_fields(data=bytes(W * 3 * H - 1))), "bad_inputs",
        r"image0: data has 245759 bytes but step\*height = 960\*256 = 245760"),
    Row("data_too_long", modified(set_fields(data=bytes(W * 3 * H + 3)), which=1), "bad_inputs",
        r"image1: data has 245763 bytes but step\*height = 960\*256 = 245760"),
    Row("zero_width", modified(set_fields(width=0, step=0, data=b"")), "bad_inputs",
        r"image0: zero-size image \(0x256\)"),
    Row("zero_height", modified(set_fields(height=0, data=b""), which=1), "bad_inputs",
        r"image1: zero-size image \(320x0\)"),
    Row("absurd_size", modified(set_fields(width=100000, height=100000, step=300000)), "bad_inputs",
        r"image0: 100000x100000 is 10000000000 pixels, more than the 67108864 this node accepts"),
    # refused when decoded on the worker thread: counted as pairs_rejected
    Row("32FC1_nan", float_image(fill=float("nan")), "pairs_rejected", r"image0: 32FC1 float image contains NaN"),
    Row("32FC1_inf", float_image(fill=float("inf")), "pairs_rejected",
        r"image0: 32FC1 float image contains NaN or inf"),
    Row("32FC1_depth_metres", float_image(scale=4.0), "pairs_rejected",
        r"image0: 32FC1 float image values must lie in \[0, 1\], got \[[0-9.e-]+, [0-9.]+\]"),
    Row("smaller_than_32px", tiny, "pairs_rejected", r"image is too small: 16x16; each side must be >= 32 px"),
]


# ----------------------------------------------------------------------------- the nodes
def start(env, checkpoint, ns: str, **params: Any):
    proc = env.start_node(NODE_CMD, ros_args_for(node_params(checkpoint, max_input_age=5.0, **params))
                          + ["-r", f"__ns:={ns}"], name=ns.strip("/"), env=NODE_ENV)
    proc.wait_for_output(r"matcher ready", timeout=90)
    return proc


@pytest.fixture(scope="module")
def raw(module_ros_env, seeded_checkpoint):
    node = start(module_ros_env, seeded_checkpoint, RAW_NS)
    probe = module_ros_env.probe("catalogue_probe")
    io = StereoIO(probe, IMAGES, prefix=RAW_NS, wall_clock=True)
    io.pairs_until_matched()
    return node, io, NodeClient(probe, f"{RAW_NS}/matcher_node")


def counter(client: Any, name: str) -> int:
    """The counter as last reported (counters only grow, so an earlier report is a valid baseline)."""
    from matcher_node_util import diag_values

    client.probe.spin_once(0.0)
    for msg in reversed(client.diagnostics):
        values = diag_values(msg, client.fqn)
        if values is not None:
            return int(values[name])
    return int(client.latest_diagnostics(node_name=client.fqn)[name])


def then_a_good_pair_is_matched(node: Any, io: Any) -> None:
    good = io.next_stamp()
    io.publish_pair(good)
    io.wait_match(good)
    node.assert_running()


@pytest.mark.ros
@pytest.mark.parametrize("row", RAW_ROWS, ids=[r.id for r in RAW_ROWS])
def test_image_input(raw, row):
    node, io, client = raw
    before = counter(client, row.outcome) if row.outcome != "matched" else 0
    stamp = io.next_stamp()
    msg0, msg1 = row.make(stamp)
    io.image1.publish(msg1)
    io.image0.publish(msg0)
    if row.outcome == "matched":
        match = io.wait_match(stamp, timeout=30)
        assert len(match.keypoints0) > 0 and match.image0_width == msg0.width
        if row.id == "empty_frame_id":
            assert match.header.frame_id == ""
    else:
        client.wait_diagnostics(lambda v: int(v[row.outcome]) > before, timeout=20, node_name=client.fqn)
    if row.log:
        node.wait_for_output(row.log, timeout=20)
    then_a_good_pair_is_matched(node, io)


@pytest.mark.ros
def test_duplicate_out_of_order_and_far_apart_stamps(raw):
    node, io, client = raw
    bad, failures = counter(client, "bad_inputs"), counter(client, "sync_failures")
    stamp = io.next_stamp()
    io.publish_pair(stamp)
    io.wait_match(stamp)
    io.image0.publish(image_msg(IMAGES[0], stamp, "cam0"))  # duplicate
    node.wait_for_output(r"image0: duplicate stamp \(\d+\.\d{9} s after \d+\.\d{9} s\); message dropped")
    io.image1.publish(image_msg(IMAGES[1], stamp - 500_000_000, "cam1"))  # older than the last image1
    node.wait_for_output(r"image1: stamp older than the previous one")
    client.wait_diagnostics(lambda v: int(v["bad_inputs"]) >= bad + 2, node_name=client.fqn)
    far = io.next_stamp()
    io.publish_pair(far, far + 700_000_000)  # 0.7 s apart: no exact partner
    io.probe.spin_for(1.0)  # the next stamps (wall clock) must be newer than image1's
    for _ in range(6):  # the unpaired images leave the queue (queue_size 5) as sync failures
        then_a_good_pair_is_matched(node, io)
    client.wait_diagnostics(lambda v: int(v["sync_failures"]) >= failures + 2, node_name=client.fqn)
    assert io.match_for(far) is None


# ----------------------------------------------------------------------------- a matching error, then warnings
def vm_size(pid: int) -> int:
    """The process's virtual memory size in bytes (what RLIMIT_AS limits)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmSize:\s+(\d+) kB", status, re.M).group(1)) * 1024  # type: ignore[union-attr]


@pytest.mark.ros
def test_out_of_memory_then_every_warning_then_good_pairs(raw):
    """The node's process really runs out of memory (its address space capped just above what it holds, with
    prlimit): inference raises, the error is logged and counted; then every kind of warning, from the
    subscription callback and from the worker thread, and good pairs match again, all in the same process.
    (rclpy refuses a second severity from one logging call site: an error followed by a warning used to end
    the node.)"""
    import resource

    node, io, client = raw
    pid = node.popen.pid
    errors = counter(client, "match_errors")
    # an 832x640 pair: its coarse confidence matrix alone is 8320^2 floats (277 MB), one allocation that
    # cannot come from memory the allocator already holds
    large = tuple(cv2.resize(im, (832, 640), interpolation=cv2.INTER_LINEAR) for im in IMAGES)
    soft, hard = resource.prlimit(pid, resource.RLIMIT_AS)
    # 16 MiB more address space than the node holds: enough for messages and diagnostics, not for that
    resource.prlimit(pid, resource.RLIMIT_AS, (vm_size(pid) + 16 * 2**20, hard))
    try:
        for k in (1, 2):
            stamp = io.next_stamp()
            io.publish_pair(stamp, images=large)
            client.wait_diagnostics(lambda v: int(v["match_errors"]) >= errors + k, node_name=client.fqn)
    finally:
        resource.prlimit(pid, resource.RLIMIT_AS, (soft, hard))
    node.wait_for_output(r"\[ERROR\] \[[\d.]+\] \[catalogue\.matcher_node\]: matching failed: \w+: .*"
                         r"(can't allocate memory|Unable to allocate)")
    # each warning with a text not logged before in this module (the same text is logged at most every 5 s)
    warnings = [  # (what is sent, the warning it logs)
        (encoded("bgr10_after_error", lambda im: im), r"image0: unsupported encoding 'bgr10_after_error'"),
        (modified(lambda m: setattr(m.header, "frame_id", ""), which=1), r"image1 has an empty frame_id"),
        (lambda s: (image_msg(IMAGES[0], s, "cam0"), image_msg(np.ascontiguousarray(IMAGES[1][::4, ::4]), s, "cam1")),
         r"image0 is 320x256 but image1 is 80x64"),
        (float_image(scale=5.0), r"image0: 32FC1 float image values must lie in \[0, 1\]"),
        (lambda s: tuple(image_msg(np.ascontiguousarray(im[:20, :24]), s, f"cam{i}") for i, im in enumerate(IMAGES)),
         r"image is too small: 24x20"),
    ]
    for make, text in warnings:
        stamp = io.next_stamp()
        msg0, msg1 = make(stamp)
        io.image1.publish(msg1)
        io.image0.publish(msg0)
        node.wait_for_output(rf"\[WARN\] \[[\d.]+\] \[catalogue\.matcher_node\]: .*{text}", timeout=20)
        node.assert_running()
    for _ in range(2):
        then_a_good_pair_is_matched(node, io)
    assert counter(client, "match_errors") == errors + 2


# ----------------------------------------------------------------------------- checkpoints and parameters
def evil_checkpoint(path: Path, marker: Path) -> Path:
    class Evil:
        def __reduce__(self):  # runs os.system when unpickled by a careless loader
            return (os.system, (f"touch {marker}",))

    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"matcher.x": Evil()}}, f)
    return path


@pytest.mark.ros
@pytest.mark.parametrize("kind", ["corrupt", "malicious", "deleted", "replaced_while_running"])
def test_checkpoint_problems_turn_diagnostics_error_and_a_good_path_recovers(raw, seeded_checkpoint, tmp_path, kind):
    node, io, client = raw
    bad = tmp_path / f"{kind}.ckpt"
    marker = tmp_path / "code_ran"
    if kind == "corrupt":
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
        expected = "is not a plain weights file"  # random bytes fail in the (safe) unpickler
    elif kind == "malicious":
        evil_checkpoint(bad, marker)
        expected = "is not a plain weights file (refusing to execute pickled code"
    elif kind == "deleted":
        expected = "not found"
    else:  # the running matcher keeps its weights; the next rebuild reads the replaced (broken) file
        bad.write_bytes(seeded_checkpoint.read_bytes())
        bad.with_suffix(".json").write_text(seeded_checkpoint.with_suffix(".json").read_text())
        client.set_ok(checkpoint_path=str(bad))
        client.wait_diagnostics(lambda v: v["matcher_state"] == "ready" and v["checkpoint"] == str(bad),
                                node_name=client.fqn)
        bad.write_bytes(b"PK\x03\x04 truncated")
        then_a_good_pair_is_matched(node, io)  # still running on the loaded weights
        # a rebuild now reads the broken file (a threshold change would not rebuild: it is taken in place)
        client.set_ok(engine_max_matches=19999)
        expected = "corrupt or unreadable checkpoint"
    if kind != "replaced_while_running":
        client.set_ok(checkpoint_path=str(bad))
    diag = client.wait_diagnostics(lambda v: v["_level"] == 2, node_name=client.fqn)
    assert diag["_message"].startswith("matcher unavailable: CheckpointError") and expected in diag["_message"], diag
    assert "weights_only=False" not in diag["_message"] and "weights_only` set to `False" not in diag["_message"]
    assert not marker.exists()
    node.assert_running()
    client.set_ok(checkpoint_path=str(seeded_checkpoint), threshold=0.001, engine_max_matches=20000)
    client.wait_diagnostics(lambda v: v["matcher_state"] == "ready", node_name=client.fqn)
    then_a_good_pair_is_matched(node, io)


@pytest.mark.ros
@pytest.mark.parametrize("name,value,reason", [
    ("threshold", 2.0, r"Parameter threshold out of range Min: 0.0, Max: 1.0, value: 2.0"),
    ("threshold", 0.0, r"threshold: 0.0 is not allowed, it must be above 0 \(at 0 every pair of coarse cells"),
    ("variant", "superglue", r"variant: 'superglue' is not one of eloftr, roma"),
    ("max_input_age", -1.0, r"Parameter max_input_age out of range Min: 0.0, Max: 3600.0, value: -1.0"),
    ("queue_size", 0, r"Parameter queue_size out of range. Min: 1, Max: 1000, value: 0"),
    ("approximate_sync_tolerance_seconds", float("nan"),
     r"Parameter approximate_sync_tolerance_seconds out of range Min: 0.0, Max: 10.0, value: nan"),
    ("mode", "sequential", r"read-only"),
    ("image_transport", "compressed", r"read-only"),
])
def test_invalid_parameter_updates_are_refused_with_a_reason(raw, name, value, reason):
    node, io, client = raw
    (result,) = client.set(**{name: value})
    assert not result.successful and re.search(reason, result.reason), result.reason
    then_a_good_pair_is_matched(node, io)


# ----------------------------------------------------------------------------- CompressedImage
def compressed_msg(data: bytes, fmt: str, stamp: int, frame: str) -> Any:
    from sensor_msgs.msg import CompressedImage

    msg = CompressedImage(format=fmt)
    msg.data = data
    msg.header.frame_id = frame
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
    return msg


def encode(img: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, img[:, :, ::-1] if img.ndim == 3 else img)
    assert ok
    return buf.tobytes()


def png_bomb() -> bytes:
    """A valid PNG header claiming 100000x100000 pixels (a few bytes that would need 30 GB decoded)."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND",
                                                                                                           b"")


COMPRESSED_ROWS = [
    Row("jpeg", lambda s: tuple(compressed_msg(encode(im, ".jpg"), "rgb8; jpeg compressed bgr8", s, f"c{i}")
                                for i, im in enumerate(IMAGES)), "matched", ""),
    Row("png", lambda s: tuple(compressed_msg(encode(im, ".png"), "png", s, f"c{i}") for i, im in enumerate(IMAGES)),
        "matched", ""),
    Row("png_16bit_mono", lambda s: tuple(compressed_msg(encode(gray(im).astype(np.uint16) * 257, ".png"),
                                                         "mono16; png compressed", s, f"c{i}")
                                          for i, im in enumerate(IMAGES)), "matched", ""),
    Row("compressed_corrupt", lambda s: (compressed_msg(b"\xff\xd8\xff garbage", "jpeg", s, "c0"),
                                         compressed_msg(encode(IMAGES[1], ".jpg"), "jpeg", s, "c1")),
        "pairs_rejected", r"image0: 11 bytes of format 'jpeg' do not decode as jpeg or png"),
    Row("compressed_unknown_format", lambda s: (compressed_msg(encode(IMAGES[0], ".jpg"), "theora", s, "c0"),
                                                compressed_msg(encode(IMAGES[1], ".jpg"), "jpeg", s, "c1")),
        "bad_inputs", r"image0: unsupported compressed format 'theora' \(supported: jpeg, png\)"),
    Row("compressed_empty", lambda s: (compressed_msg(encode(IMAGES[0], ".jpg"), "jpeg", s, "c0"),
                                       compressed_msg(b"", "jpeg", s, "c1")),
        "bad_inputs", r"image1: compressed image with no data"),
    Row("compressed_decompression_bomb", lambda s: (compressed_msg(png_bomb(), "png", s, "c0"),
                                                    compressed_msg(encode(IMAGES[1], ".png"), "png", s, "c1")),
        "pairs_rejected",
        r"image0: compressed image is too large to decode safely \(Image size \(10000000000 pixels\)"),
]


@pytest.fixture(scope="module")
def compressed(module_ros_env, seeded_checkpoint):
    node = start(module_ros_env, seeded_checkpoint, COMPRESSED_NS, image_transport="compressed")
    node.wait_for_output(rf"inputs {COMPRESSED_NS}/image0/compressed \+ {COMPRESSED_NS}/image1/compressed "
                         r"\(CompressedImage\)")
    probe = module_ros_env.probe("catalogue_compressed_probe")
    from sensor_msgs.msg import CompressedImage

    from matchanything_ros.msg import KeypointMatches

    pubs = [probe.publisher(CompressedImage, f"{COMPRESSED_NS}/image{i}/compressed") for i in range(2)]
    matches = probe.subscribe(KeypointMatches, f"{COMPRESSED_NS}/matches")
    client = NodeClient(probe, f"{COMPRESSED_NS}/matcher_node")
    state = {"next": time.time_ns()}

    def next_stamp() -> int:
        state["next"] = max(state["next"] + 1_000_000, time.time_ns())
        return state["next"]

    def send(make: Callable[[int], tuple[Any, Any]]) -> int:
        stamp = next_stamp()
        m0, m1 = make(stamp)
        pubs[1].publish(m1)
        pubs[0].publish(m0)
        return stamp

    def matched(stamp: int) -> bool:
        return any(m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec == stamp for m in matches)

    deadline = time.monotonic() + 60
    sent: list[int] = []
    while not any(matched(s) for s in sent):  # discovery: the first messages are lost
        assert time.monotonic() < deadline, node.log()
        sent.append(send(COMPRESSED_ROWS[0].make))
        probe.spin_for(0.3)
    return node, probe, client, send, matched


@pytest.mark.ros
@pytest.mark.parametrize("row", COMPRESSED_ROWS, ids=[r.id for r in COMPRESSED_ROWS])
def test_compressed_input(compressed, row):
    node, probe, client, send, matched = compressed
    before = counter(client, row.outcome) if row.outcome != "matched" else 0
    stamp = send(row.make)
    if row.outcome == "matched":
        probe.spin_until(lambda: matched(stamp), 30, f"matches for the {row.id} pair")
    else:
        client.wait_diagnostics(lambda v: int(v[row.outcome]) > before, timeout=20, node_name=client.fqn)
        node.wait_for_output(row.log, timeout=20)
    good = send(COMPRESSED_ROWS[0].make)
    probe.spin_until(lambda: matched(good), 30, "matches for the good pair after it")
    node.assert_running()


# ----------------------------------------------------------------------------- the CLI
def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **NODE_ENV)
    return subprocess.run([sys.executable, "-m", "matchanything_ros.cli", "match", *args, "--backend", "torch",
                           "--device", "cpu"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


@pytest.mark.parametrize("case", ["decompression_bomb", "not_an_image", "missing_file", "smaller_than_32px",
                                  "malicious_checkpoint"])
def test_cli_bad_input_is_one_clear_line(tmp_path, case):
    good = tmp_path / "good.png"
    cv2.imwrite(str(good), IMAGES[0][:, :, ::-1])
    args = [str(good), str(good)]
    if case == "decompression_bomb":
        (tmp_path / "bomb.png").write_bytes(png_bomb())
        args[0], expected = str(tmp_path / "bomb.png"), "is too large to decode safely"
    elif case == "not_an_image":
        (tmp_path / "notes.png").write_text("not a picture")
        args[1], expected = str(tmp_path / "notes.png"), "not a readable image file"
    elif case == "missing_file":
        args[0], expected = str(tmp_path / "nope.png"), "image file not found"
    elif case == "smaller_than_32px":
        cv2.imwrite(str(tmp_path / "tiny.png"), IMAGES[0][:16, :16])
        args[1], expected = str(tmp_path / "tiny.png"), "image is too small: 16x16"
    else:
        marker = tmp_path / "code_ran"
        args += ["--checkpoint", str(evil_checkpoint(tmp_path / "evil.ckpt", marker))]
        expected = "refusing to execute pickled code"
    proc = run_cli(*args)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and expected in proc.stderr, proc.stderr
    assert re.search(r"^matchanything match: error: ", proc.stderr, re.M), proc.stderr
    assert "weights_only` set to `False" not in proc.stderr
    if case == "malicious_checkpoint":
        assert not marker.exists()


@pytest.mark.parametrize("case", ["device_cuda_without_cuda", "tensorrt_on_the_cpu", "tensorrt_without_runtime",
                                  "onnxruntime_without_files"])
def test_cli_device_or_backend_unavailable_is_one_line_naming_the_fix(tmp_path, case):
    """Through the console script, as a user types it; CUDA hidden, so every machine lacks it here."""
    import shutil

    good = tmp_path / "good.png"
    cv2.imwrite(str(good), IMAGES[0][:, :, ::-1])
    flags, expected = {
        # docs/eloftr.md's quick start on a machine without CUDA
        "device_cuda_without_cuda": (
            ["--device", "cuda", "--precision", "fp16"],
            r"CUDA is not available here \(torch \S+ (is built without CUDA|finds no CUDA GPU: no GPU, no driver, or "
            r"CUDA_VISIBLE_DEVICES hides it)\); use --device cpu or auto"),
        "tensorrt_on_the_cpu": (["--backend", "tensorrt", "--device", "cpu"],
                                r"TensorRT runs on CUDA GPUs only, not on device cpu; use --device cuda or auto, or "
                                r"--backend onnxruntime or torch on the CPU"),
        "tensorrt_without_runtime": (["--backend", "tensorrt"], r"TensorRT backend unavailable: \S"),
        "onnxruntime_without_files": (["--backend", "onnxruntime", "--model-file-path", str(tmp_path / "none.onnx")],
                                      r"ONNX Runtime backend unavailable: no ONNX files for eloftr \(export them with "
                                      r"`matchanything export --image-size WxH`"),
    }[case]
    script = shutil.which("matchanything", path=str(Path(sys.executable).parent))
    assert script, "the matchanything console script is not installed beside this Python"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", **NODE_ENV)
    proc = subprocess.run([script, "match", str(good), str(good), *flags], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert re.fullmatch(rf"matchanything match: error: {expected}.*\n", proc.stderr), proc.stderr


def test_every_row_is_in_the_docs_catalogue():
    doc = (REPO / "docs" / "node.md").read_text()
    catalogue = doc[doc.index("## Bad input catalogue"):]
    ids = [r.id for r in RAW_ROWS + COMPRESSED_ROWS] + ["out_of_memory", "device_or_backend_unavailable"]
    missing = [i for i in ids if f"`{i}`" not in catalogue]
    assert not missing, f"rows without a line in docs/node.md: {missing}"
    assert len(re.findall(r"^\| ", catalogue, re.M)) >= 30
