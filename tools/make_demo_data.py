#!/usr/bin/env python3
"""Generate the demo data shipped in `matchanything_ros/data/` (and the packed training images).

* `demo_stereo/` — a rosbag2 folder (MCAP storage) with the Middlebury 2014 "Motorcycle" pair that
  scikit-image ships (`skimage.data.stereo_motorcycle()`), rgb8, on `/stereo/left/image_rect` and
  `/stereo/right/image_rect`; the same pair is published `--frames` times, 0.5 s apart, with equal
  left/right stamps (exact sync).
* `demo_homography.npz` — one held-out pair: `image0` (skimage "coffee", never trained on), `image1`
  = image0 warped by `H_0to1` (cv2.warpPerspective, linear, black border).
* `--train-pack PATH` additionally writes the training photos into one .npz for the GPU machine
  (which may lack scikit-image's data files).

Deterministic: same inputs, same files (the bag's stamps are fixed).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from matchanything_ros.cli.demo import DATA_DIR, LEFT_TOPIC, RIGHT_TOPIC  # noqa: E402  (what the demo reads)
from matchanything_ros.training.images import HELDOUT_IMAGES, TRAIN_IMAGES, load_skimage_rgb, pack_images  # noqa: E402

FRAME_PERIOD_NS = 500_000_000
BAG_START_NS = 1_700_000_000 * 1_000_000_000  # fixed, so the file is reproducible

# A moderate perspective change (about 10 deg rotation, scale 0.9, some tilt), fixed for reproducibility.
DEMO_HOMOGRAPHY = np.array(
    [[0.89, -0.16, 60.0],
     [0.14, 0.87, 10.0],
     [1.5e-4, -1.0e-4, 1.0]], dtype=np.float64)


def write_stereo_bag(bag_dir: Path, left: np.ndarray, right: np.ndarray, frames: int) -> None:
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.rosbag2.writer import CompressionFormat, CompressionMode
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)
    Image = store.types["sensor_msgs/msg/Image"]
    Header = store.types["std_msgs/msg/Header"]
    Time = store.types["builtin_interfaces/msg/Time"]
    if bag_dir.exists():
        shutil.rmtree(bag_dir)
    writer = Writer(bag_dir, version=9, storage_plugin=StoragePlugin.MCAP)
    # zstd chunk compression inside the MCAP file: the bag shrinks by about half, readers decompress transparently.
    writer.set_compression(CompressionMode.STORAGE, CompressionFormat.ZSTD)
    with writer:
        conns = {
            LEFT_TOPIC: writer.add_connection(LEFT_TOPIC, Image.__msgtype__, typestore=store),
            RIGHT_TOPIC: writer.add_connection(RIGHT_TOPIC, Image.__msgtype__, typestore=store),
        }
        for k in range(frames):
            t_ns = BAG_START_NS + k * FRAME_PERIOD_NS
            stamp = Time(sec=t_ns // 1_000_000_000, nanosec=t_ns % 1_000_000_000)
            for topic, img, frame_id in ((LEFT_TOPIC, left, "stereo_left"), (RIGHT_TOPIC, right, "stereo_right")):
                h, w = img.shape[:2]
                msg = Image(header=Header(stamp=stamp, frame_id=frame_id), height=h, width=w, encoding="rgb8",
                            is_bigendian=0, step=w * 3, data=np.ascontiguousarray(img).reshape(-1))
                writer.write(conns[topic], t_ns, store.serialize_cdr(msg, Image.__msgtype__))


def make_homography_pair(out: Path) -> None:
    import cv2

    image0 = load_skimage_rgb("coffee")
    h, w = image0.shape[:2]
    image1 = cv2.warpPerspective(image0, DEMO_HOMOGRAPHY, (w, h), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    np.savez_compressed(out, image0=image0, image1=image1, H_0to1=DEMO_HOMOGRAPHY,
                        source=np.array("skimage.data.coffee"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--frames", type=int, default=2, help="stereo pairs in the bag (same images, new stamps)")
    parser.add_argument("--train-pack", type=Path, default=None,
                        help="also pack the training photos into this .npz (e.g. .device/train_data/train_images.npz)")
    args = parser.parse_args(argv)
    import skimage.data

    assert not {i.name for i in TRAIN_IMAGES} & {i.name for i in HELDOUT_IMAGES}, "held-out image in the training set"
    left, right, _disp = skimage.data.stereo_motorcycle()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_stereo_bag(args.out_dir / "demo_stereo", left, right, args.frames)
    make_homography_pair(args.out_dir / "demo_homography.npz")
    print(f"wrote {args.out_dir / 'demo_stereo'} ({args.frames} stereo pairs) and "
          f"{args.out_dir / 'demo_homography.npz'}")
    if args.train_pack is not None:
        pack_images([i.name for i in TRAIN_IMAGES], args.train_pack)
        print(f"wrote {args.train_pack} ({len(TRAIN_IMAGES)} training photos)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
