"""The thin ROS layer over the matcher core.

* `sync`        ExactTime / ApproximateTime / sequential pairing (no ROS imports)
* `image_conv`  sensor_msgs/Image <-> numpy (no cv_bridge)
* `worker`      latest-only hand-over and the single inference thread (no ROS imports)
* `matcher_node` the rclpy node (`matcher_node` executable)
* `bag`         `matchanything bag IN OUT` (rosbags)
* `replay`      a bag replayer with /clock (`matchanything replay`)
* `node_params` config/matcher.yaml and the docs' parameter table, generated from core.params

Modules import rclpy only where they need it, so `sync`, `worker`, `image_conv` and `bag` work
without a ROS environment.
"""
