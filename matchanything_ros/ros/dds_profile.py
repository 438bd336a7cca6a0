"""The Fast DDS profile the package ships for camera-sized images (config/fastdds_large_images.xml).

Fast DDS reads FASTDDS_DEFAULT_PROFILES_FILE when a process creates its participant (rclpy.init),
so the profile must be in the environment before the process starts: env.sh exports it, the launch
file passes it to the node, and the node only reports what is in effect. No ROS imports.
"""
from __future__ import annotations

import os
from pathlib import Path

PROFILE_FILE_NAME = "fastdds_large_images.xml"
PROFILE_ENV = "FASTDDS_DEFAULT_PROFILES_FILE"
LEGACY_PROFILE_ENV = "FASTRTPS_DEFAULT_PROFILES_FILE"  # still read by Fast DDS, with a deprecation warning


def shipped_profile_path() -> Path:
    """config/fastdds_large_images.xml of the installed package (share/), else of the source checkout."""
    try:
        from ament_index_python.packages import get_package_share_directory

        installed = Path(get_package_share_directory("matchanything_ros")) / "config" / PROFILE_FILE_NAME
        if installed.is_file():
            return installed
    except (ImportError, LookupError):
        pass
    return Path(__file__).resolve().parents[2] / "config" / PROFILE_FILE_NAME


def profile_in_effect(environ: dict[str, str] | None = None) -> str:
    """One line for the start-up log: which Fast DDS profile this process's participant was created with."""
    env = os.environ if environ is None else environ
    rmw = env.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    if rmw != "rmw_fastrtps_cpp":
        return f"RMW {rmw} (no Fast DDS profile applies)"
    for name in (PROFILE_ENV, LEGACY_PROFILE_ENV):
        path = env.get(name, "")
        if path:
            state = "" if Path(path).is_file() else " (FILE MISSING: Fast DDS built-in transports are used)"
            return f"Fast DDS profile {path} (from {name}){state}"
    return (f"Fast DDS built-in transports (no {PROFILE_ENV}): best-effort images larger than ~0.5 MB are "
            f"mostly lost; set {PROFILE_ENV}={shipped_profile_path()} for the node AND the camera driver")
