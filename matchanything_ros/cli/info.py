"""`matchanything info`: versions, which backends can run here, devices, and where the ROS files are.

Each backend is reported as importable or not, with the reason when not: a missing package
and a package that is installed but cannot load (e.g. TensorRT without its libraries) look
alike to a user until they read the error.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from .. import __version__

LIBRARIES = {  # import name -> distribution name (for the version when the module has none)
    "numpy": "numpy",
    "cv2": "opencv-python-headless",
    "PIL": "pillow",
    "onnx": "onnx",
    "safetensors": "safetensors",
}
ROS_ENV_VARS = ("ROS_DISTRO", "RMW_IMPLEMENTATION", "ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE",
                "AMENT_PREFIX_PATH")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info", help="versions, available backends and devices, package share directory",
        description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run)


def _error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _import(name: str) -> tuple[Any, str | None]:
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # any failure to load means "not usable here"; report why
        return None, _error(exc)
    if getattr(module, "__file__", None) is None:
        # e.g. tensorrt-stubs installs tensorrt/__init__.pyi: `import tensorrt` then gives an empty
        # namespace package, not TensorRT
        where = ", ".join(getattr(module, "__path__", []))
        return None, f"only a namespace package without code at {where} (type stubs?)"
    return module, None


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def backends_report() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}

    torch, err = _import("torch")
    entry: dict[str, Any] = {"importable": torch is not None, "error": err}
    if torch is not None:
        cuda_ok = bool(torch.cuda.is_available())
        entry.update(version=torch.__version__, cuda_build=torch.version.cuda, cuda_available=cuda_ok,
                     cuda_devices=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                     if cuda_ok else [])
    out["torch"] = entry

    ort, err = _import("onnxruntime")
    entry = {"importable": ort is not None, "error": err}
    if ort is not None:
        entry.update(version=ort.__version__, providers=list(ort.get_available_providers()))
    out["onnxruntime"] = entry

    trt, err = _import("tensorrt")
    entry = {"importable": trt is not None, "error": err}
    if trt is not None:
        entry.update(version=getattr(trt, "__version__", None))
    out["tensorrt"] = entry

    pycuda_driver, err = _import("pycuda.driver")
    entry = {"importable": pycuda_driver is not None, "error": err}
    if pycuda_driver is not None:
        entry.update(version=_dist_version("pycuda"))
        try:
            pycuda_driver.init()
            entry["cuda_devices"] = [pycuda_driver.Device(i).name() for i in range(pycuda_driver.Device.count())]
        except Exception as exc:  # no driver / no GPU: importable, but no device to run on
            entry["cuda_devices"] = []
            entry["device_error"] = _error(exc)
    out["pycuda"] = entry
    return out


def devices_report(backends: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    devices: list[dict[str, Any]] = [{"device": "cpu", "name": _cpu_model(), "cores": os.cpu_count()}]
    cuda_names = backends["torch"].get("cuda_devices") or backends["pycuda"].get("cuda_devices") or []
    devices += [{"device": f"cuda:{i}", "name": name} for i, name in enumerate(cuda_names)]
    return devices


def ros_report() -> dict[str, Any]:
    rclpy, rclpy_err = _import("rclpy")
    msg_module, msg_err = _import("matchanything_ros.msg")
    report: dict[str, Any] = {
        "rclpy": {"importable": rclpy is not None, "error": rclpy_err, "version": _dist_version("ros-rclpy")},
        "messages": {"importable": msg_module is not None, "error": msg_err,
                     "types": sorted(n for n in ("KeypointMatches", "MatcherInfo") if hasattr(msg_module, n))},
        "share_dir": None,
        "share_error": None,
        "env": {name: os.environ.get(name) for name in ROS_ENV_VARS},
    }
    try:
        from ament_index_python.packages import get_package_share_directory

        share = Path(get_package_share_directory("matchanything_ros"))
        report["share_dir"] = str(share)
        for sub in ("launch", "config"):
            d = share / sub
            report[sub] = sorted(p.name for p in d.iterdir() if p.is_file()) if d.is_dir() else None
    except Exception as exc:  # ament_index_python missing, or the package is not installed/sourced
        report["share_error"] = _error(exc)
    return report


def collect() -> dict[str, Any]:
    import matchanything_ros

    libraries = {}
    for module_name, dist in LIBRARIES.items():
        module, err = _import(module_name)
        libraries[dist] = getattr(module, "__version__", None) or _dist_version(dist) if module else None
    backends = backends_report()
    return {
        "package": {"version": __version__, "location": str(Path(matchanything_ros.__file__).parent)},
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "backends": backends,
        "devices": devices_report(backends),
        "libraries": libraries,
        "ros": ros_report(),
    }


def _backend_line(name: str, entry: dict[str, Any]) -> str:
    if not entry["importable"]:
        return f"  {name:<12} no   ({entry['error']})"
    details = []
    if name == "torch" and not entry["cuda_build"]:
        details.append("CPU-only build")
    elif name == "torch":
        gpus = ", ".join(entry["cuda_devices"]) if entry["cuda_available"] else "no usable GPU"
        details.append(f"CUDA {entry['cuda_build']}: {gpus}")
    elif name == "onnxruntime":
        details.append("providers: " + ", ".join(entry["providers"]))
    elif name == "pycuda":
        details.append("GPUs: " + (", ".join(entry["cuda_devices"]) or f"none ({entry.get('device_error', '')})"))
    return f"  {name:<12} yes  {entry.get('version') or '?':<12} {'; '.join(details)}".rstrip()


def _status_line(name: str, entry: dict[str, Any], details: str, hint: str = "") -> str:
    if entry["importable"]:
        return f"  {name:<12} yes  {details}".rstrip()
    return f"  {name:<12} no   ({entry['error']}{hint})"


def format_text(info: dict[str, Any]) -> str:
    ros = info["ros"]
    lines = [
        f"matchanything_ros {info['package']['version']}  ({info['package']['location']})",
        f"python {info['python']['version']}  ({info['python']['executable']})",
        "backends (importable here?)",
        *(_backend_line(name, entry) for name, entry in info["backends"].items()),
        "devices",
        *(f"  {d['device']:<8} {d['name']}" + (f", {d['cores']} cores" if d.get("cores") else "")
          for d in info["devices"]),
        "libraries",
        "  " + ", ".join(f"{name} {version or 'missing'}" for name, version in info["libraries"].items()),
        "ROS",
        _status_line("rclpy", ros["rclpy"], ros["rclpy"]["version"] or ""),
        _status_line("messages", ros["messages"], "matchanything_ros.msg: " + ", ".join(ros["messages"]["types"]),
                     hint="; build them: make setup, then . ./env.sh"),
        f"  share dir    {ros['share_dir'] or 'not found (' + str(ros['share_error']) + ')'}",
    ]
    if ros["share_dir"]:
        for sub in ("launch", "config"):
            files = ros.get(sub)
            listing = ", ".join(files) if files else ("(empty)" if files is not None else "MISSING")
            lines.append(f"    {sub + '/':<10} {listing}")
    lines.append("  " + "  ".join(f"{k}={v if v is not None else '(unset)'}" for k, v in ros["env"].items()
                                  if k != "AMENT_PREFIX_PATH"))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0
