"""pip install of matchanything_ros: the matcher library and the `matchanything` CLI, usable without ROS.

ROS users build the package with colcon (CMakeLists.txt, which also generates the messages);
`tools/setup.sh` does both on a bare machine. Dependencies are pinned in requirements/*.txt.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# single source of the version: matchanything_ros/__init__.py (package.xml must match; tested)
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "matchanything_ros" / "__init__.py").read_text(), re.M)[1]


def requirements(name: str) -> list[str]:
    lines = (HERE / "requirements" / name).read_text().splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]


setup(
    name="matchanything_ros",
    version=VERSION,
    description="MatchAnything image matcher (ELoFTR, RoMa) for ROS 2, with ONNX Runtime and TensorRT backends",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["matchanything_ros", "matchanything_ros.*"]),
    include_package_data=True,
    # bundled data (demo model, demo images/bag, op lists) travels with the code
    package_data={"matchanything_ros": ["data/**/*", "**/*.json", "**/*.yaml", "**/*.safetensors", "**/*.npz"]},
    install_requires=requirements("core.txt"),
    extras_require={"ros": requirements("ros.txt"), "dev": requirements("dev.txt")},
    entry_points={
        "console_scripts": [
            "matchanything = matchanything_ros.cli:main",
            "matcher_node = matchanything_ros.ros.matcher_node:main",
        ],
    },
)
