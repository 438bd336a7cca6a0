"""Launch the MatchAnything matcher node.

    ros2 launch matchanything_ros matcher.launch.py image0:=/left/image_rect image1:=/right/image_rect
    ros2 launch matchanything_ros matcher.launch.py namespace:=stereo backend:=tensorrt \
        engine_file_path:=/data/eloftr.plan use_sim_time:=true
    ros2 launch matchanything_ros matcher.launch.py geometry:=essential \
        camera_info0:=/left/camera_info camera_info1:=/right/camera_info    # verified matches

Every launch argument maps to a node parameter, a topic remapping or the namespace (the tables
below); parameters come from `params_file` (default: config/matcher.yaml in the package's share
directory) and an argument left empty keeps the file's value. rclpy nodes cannot be composed
into a component container, so this starts a plain Node process.

The `launch`/`launch_ros` imports live inside `generate_launch_description`, so the tables and
`node_settings`/`ros_arguments` import without them (tests start the node with the same
arguments and environment as a subprocess: `matcher_node <ros_arguments(...)>`). The node's
environment gets the shipped Fast DDS profile for camera-sized images (`dds_environment`).
"""
from __future__ import annotations

import os
from typing import Any

PACKAGE = "matchanything_ros"
EXECUTABLE = "matcher_node"
NODE_NAME = "matcher_node"

# launch argument -> node parameter (default "" = keep the params file's value)
PARAMETER_ARGUMENTS: dict[str, str] = {
    "backend": "backend",
    "device": "device",
    "checkpoint_path": "checkpoint_path",
    "engine_file_path": "engine_file_path",
    "model_file_path": "model_file_path",
    "precision": "precision",
    "geometry": "geometry",
    "mode": "mode",
    "use_sim_time": "use_sim_time",
}
# launch argument -> the node's topic it remaps (default = the topic name itself)
REMAP_ARGUMENTS: dict[str, str] = {
    "image0": "image0",
    "image1": "image1",
    "matches": "matches",
    "debug_image": "debug_image",
    "camera_info0": "camera_info0",
    "camera_info1": "camera_info1",
}
OTHER_ARGUMENTS: dict[str, str] = {
    "namespace": "namespace the node (and its relative topics) runs in",
    "params_file": "YAML parameters file (default: config/matcher.yaml of the package)",
    "log_level": "ROS log level: debug, info, warn, error",
}
ARGUMENT_HELP: dict[str, str] = {
    "backend": "inference backend: auto | tensorrt | onnxruntime | torch (empty: params file)",
    "device": "auto | cpu | cuda (empty: params file)",
    "checkpoint_path": "model checkpoint (empty: params file; there empty = bundled demo model)",
    "engine_file_path": "TensorRT engine file (empty: params file)",
    "model_file_path": "ONNX model file (empty: params file)",
    "precision": "fp32 | fp16: an fp16 engine or export needs fp16 (empty: params file)",
    "mode": "stereo (image0 with image1 by stamp) | sequential (each image0 frame with the previous: visual "
            "odometry) (empty: params file)",
    "geometry": "verified matches: none | homography | fundamental | essential (essential reads camera_info0/1; "
                "empty: params file)",
    "use_sim_time": "true when replaying a bag with --clock (empty: params file, else false)",
    "image0": "first image topic (left camera / current frame)",
    "image1": "second image topic (right camera; unused in sequential mode)",
    "matches": "output KeypointMatches topic",
    "debug_image": "output side-by-side debug image topic",
    "camera_info0": "image0's sensor_msgs/CameraInfo topic (geometry essential)",
    "camera_info1": "image1's sensor_msgs/CameraInfo topic (geometry essential, stereo mode)",
}


def default_params_file() -> str:
    try:
        from ament_index_python.packages import get_package_share_directory

        return os.path.join(get_package_share_directory(PACKAGE), "config", "matcher.yaml")
    except (ImportError, LookupError):  # source checkout without an install
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "config", "matcher.yaml")


def node_settings(values: dict[str, str]) -> dict[str, Any]:
    """What the node gets for these launch-argument values (strings, as launch hands them over)."""
    from matchanything_ros.core.params import PARAMS_BY_NAME

    parameters: dict[str, Any] = {}
    for arg, param in PARAMETER_ARGUMENTS.items():
        value = values.get(arg, "")
        if value == "":
            continue
        if param == "use_sim_time":
            parameters[param] = value.lower() in ("true", "1")
        else:
            parameters[param] = PARAMS_BY_NAME[param].validate(value)
    remappings = [(topic, values[arg]) for arg, topic in REMAP_ARGUMENTS.items() if values.get(arg, topic) != topic]
    return {
        "environment": dds_environment(),
        "namespace": values.get("namespace", ""),
        "params_file": values.get("params_file") or default_params_file(),
        "parameters": parameters,
        "remappings": remappings,
        "log_level": values.get("log_level", "info"),
    }


def dds_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The shipped Fast DDS profile for camera-sized images, unless the environment names one already
    (docs/node.md, "Transport"): the node's participant reads it at start-up."""
    from matchanything_ros.ros.dds_profile import LEGACY_PROFILE_ENV, PROFILE_ENV, shipped_profile_path

    env = os.environ if environ is None else environ
    if env.get(PROFILE_ENV) or env.get(LEGACY_PROFILE_ENV):
        return {}
    return {PROFILE_ENV: str(shipped_profile_path())}


def ros_arguments(settings: dict[str, Any]) -> list[str]:
    """The command-line equivalent (`matcher_node --ros-args ...`) of what launch passes."""
    args = ["--ros-args", "-r", f"__node:={NODE_NAME}"]
    if settings["namespace"]:
        args += ["-r", "__ns:=/" + settings["namespace"].strip("/")]
    args += ["--params-file", settings["params_file"]]
    for name, value in settings["parameters"].items():
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        args += ["-p", f"{name}:={text}"]
    for src, dst in settings["remappings"]:
        args += ["-r", f"{src}:={dst}"]
    args += ["--log-level", settings["log_level"]]
    return args


def generate_launch_description():  # type: ignore[no-untyped-def]
    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument, OpaqueFunction
    from launch.substitutions import LaunchConfiguration
    from launch_ros.actions import Node

    def launch_setup(context, *_args, **_kwargs):  # type: ignore[no-untyped-def]
        names = [*PARAMETER_ARGUMENTS, *REMAP_ARGUMENTS, *OTHER_ARGUMENTS]
        values = {name: LaunchConfiguration(name).perform(context) for name in names}
        settings = node_settings(values)
        return [Node(
            package=PACKAGE,
            executable=EXECUTABLE,
            name=NODE_NAME,
            namespace=settings["namespace"],
            parameters=[settings["params_file"], settings["parameters"]],
            remappings=settings["remappings"],
            arguments=["--ros-args", "--log-level", settings["log_level"]],
            additional_env=settings["environment"],
            output="screen",
            emulate_tty=True,
        )]

    arguments = [DeclareLaunchArgument(name, default_value="", description=ARGUMENT_HELP[name])
                 for name in PARAMETER_ARGUMENTS]
    arguments += [DeclareLaunchArgument(name, default_value=topic, description=ARGUMENT_HELP[name])
                  for name, topic in REMAP_ARGUMENTS.items()]
    arguments += [
        DeclareLaunchArgument("namespace", default_value="", description=OTHER_ARGUMENTS["namespace"]),
        DeclareLaunchArgument("params_file", default_value=default_params_file(),
                              description=OTHER_ARGUMENTS["params_file"]),
        DeclareLaunchArgument("log_level", default_value="info", description=OTHER_ARGUMENTS["log_level"]),
    ]
    return LaunchDescription([*arguments, OpaqueFunction(function=launch_setup)])
