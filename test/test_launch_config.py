"""launch/matcher.launch.py and config/matcher.yaml.

`launch`/`launch_ros` are not installable here, so the launch file cannot run. What is tested:
the YAML is the one generated from core/params.py and every key is declared by the node with
the same type; every launch argument maps to a real parameter or remapping; and the node
started with the launch file's own `ros_arguments(node_settings(...))` (the command line launch
builds) comes up under the namespace, with the remaps and the parameters launch would give it.
"""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import yaml

pytest.register_assert_rewrite("matcher_node_util")
from matcher_node_util import NODE_CMD, NODE_ENV, NodeClient, StereoIO, make_test_images  # noqa: E402

from matchanything_ros.core.params import PARAMS, PARAMS_BY_NAME  # noqa: E402
from matchanything_ros.ros.dds_profile import shipped_profile_path  # noqa: E402
from matchanything_ros.ros.node_params import params_yaml  # noqa: E402

pytest_plugins = ("matcher_node_util",)  # fixtures: module_ros_env, seeded_checkpoint

REPO = Path(__file__).resolve().parents[1]
LAUNCH_FILE = REPO / "launch" / "matcher.launch.py"
YAML_FILE = REPO / "config" / "matcher.yaml"
# ParameterValue.type codes (rcl_interfaces/msg/ParameterType)
ROS_TYPE = {bool: 1, int: 2, float: 3, str: 4}


def load_launch_module():
    spec = importlib.util.spec_from_file_location("matcher_launch", LAUNCH_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports no launch packages at module level
    return module


def yaml_params() -> dict:
    doc = yaml.safe_load(YAML_FILE.read_text())
    assert list(doc) == ["/**"], "the params file must use the /** wildcard"
    return doc["/**"]["ros__parameters"]


def test_yaml_is_generated_from_core_params():
    assert YAML_FILE.read_text() == params_yaml(), (
        "config/matcher.yaml is stale: python -m matchanything_ros.ros.node_params yaml > config/matcher.yaml")
    values = yaml_params()
    assert set(values) == {p.name for p in PARAMS}
    for name, value in values.items():
        spec = PARAMS_BY_NAME[name]
        assert type(value) is spec.type and value == spec.default, name


def test_every_launch_argument_maps_to_a_parameter_or_topic():
    launch = load_launch_module()
    for arg, param in launch.PARAMETER_ARGUMENTS.items():
        assert param in PARAMS_BY_NAME or param == "use_sim_time", arg
    assert set(launch.REMAP_ARGUMENTS.values()) == {"image0", "image1", "matches", "debug_image", "camera_info0",
                                                    "camera_info1"}
    tree = ast.parse(LAUNCH_FILE.read_text())
    functions = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert "generate_launch_description" in functions
    # arguments left empty keep the params file's value; a given one is validated as the parameter
    settings = launch.node_settings({"backend": "", "threshold": "0.3", "use_sim_time": "true"})
    assert settings["parameters"] == {"use_sim_time": True}
    with pytest.raises(ValueError, match="backend: 'cuda' is not one of"):
        launch.node_settings({"backend": "cuda"})


@pytest.mark.ros
def test_node_started_as_the_launch_file_would(module_ros_env, seeded_checkpoint):
    launch = load_launch_module()
    settings = launch.node_settings({
        "namespace": "stereo", "image0": "/left/image_rect", "image1": "/right/image_rect",
        "params_file": str(YAML_FILE), "backend": "torch", "device": "cpu", "use_sim_time": "false",
        "checkpoint_path": str(seeded_checkpoint)})
    # the launch file's environment: the shipped Fast DDS profile unless one is set already
    shipped = shipped_profile_path()  # share/ of the install, else config/ of the checkout
    assert shipped.read_text() == (REPO / "config" / "fastdds_large_images.xml").read_text()
    assert launch.dds_environment({}) == {"FASTDDS_DEFAULT_PROFILES_FILE": str(shipped)}
    assert launch.dds_environment({"FASTDDS_DEFAULT_PROFILES_FILE": "/mine.xml"}) == {}
    assert settings["environment"] == launch.dds_environment()
    node = module_ros_env.start_node(NODE_CMD + launch.ros_arguments(settings), env={
        **NODE_ENV, **launch.dds_environment({})})
    node.wait_for_output(r"matcher ready", timeout=90)
    assert f"transport: Fast DDS profile {shipped} (from FASTDDS_DEFAULT_PROFILES_FILE)" in node.log()
    probe = module_ros_env.probe("launch_probe")
    client = NodeClient(probe, "/stereo/matcher_node")

    # every YAML parameter is declared with the YAML's type and value (launch overrides on top)
    expected = {**yaml_params(), "backend": "torch", "device": "cpu", "checkpoint_path": str(seeded_checkpoint)}
    names = sorted(expected)
    for name, value in zip(names, client.get_typed(*names)):
        assert value.type == ROS_TYPE[type(expected[name])], name
    assert dict(zip(names, client.get(*names))) == pytest.approx(expected)
    assert client.get("use_sim_time") == [False]

    # namespace and remaps: inputs on the remapped topics, outputs under the namespace
    probe.spin_until(lambda: ("matcher_node", "/stereo") in probe.node.get_node_names_and_namespaces(), 15,
                     "the node in /stereo")
    subs = {t for t, _ in probe.node.get_subscriber_names_and_types_by_node("matcher_node", "/stereo")}
    pubs = {t for t, _ in probe.node.get_publisher_names_and_types_by_node("matcher_node", "/stereo")}
    assert {"/left/image_rect", "/right/image_rect"} <= subs
    assert {"/stereo/matches", "/stereo/matcher_info", "/stereo/debug_image", "/diagnostics"} <= pubs

    io = StereoIO(probe, make_test_images(), wall_clock=True)  # max_input_age 5 s from the YAML
    from sensor_msgs.msg import Image

    io.image0 = probe.publisher(Image, "/left/image_rect")
    io.image1 = probe.publisher(Image, "/right/image_rect")
    from matchanything_ros.msg import KeypointMatches

    io.matches = probe.subscribe(KeypointMatches, "/stereo/matches")
    msg = io.pairs_until_matched()
    assert msg.header.frame_id == "left"


def test_build_engine_launch_arguments_are_cli_flags():
    spec = importlib.util.spec_from_file_location("build_engine_launch", REPO / "launch" / "build_engine.launch.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert set(module.ARGUMENTS) <= set(PARAMS_BY_NAME)
    cmd = module.build_command({"model_file_path": "/m.onnx", "precision": "fp16", "force_engine_update": "true",
                                "engine_max_size": ""})
    assert cmd == ["matchanything", "build-engine", "--model-file-path", "/m.onnx", "--precision", "fp16",
                   "--force-engine-update"]
    from matchanything_ros.cli import build_parser

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert "build-engine" in sub, "launch/build_engine.launch.py runs `matchanything build-engine`"
    flags = {opt for action in sub["build-engine"]._actions for opt in action.option_strings}
    for name in module.ARGUMENTS:
        assert PARAMS_BY_NAME[name].cli_flag in flags, name


@pytest.mark.ros  # the table's "live" column comes from the node module (imports rclpy)
def test_docs_parameter_table_is_generated_from_core_params():
    from matchanything_ros.ros.node_params import params_markdown

    text = (REPO / "docs" / "node.md").read_text()
    begin = text.index("-->\n", text.index("<!-- params-table:begin")) + 4
    end = text.index("<!-- params-table:end -->")
    assert text[begin:end] == params_markdown(), (
        "docs/node.md's table is stale: regenerate it with python -m matchanything_ros.ros.node_params markdown")
