"""Where exported models and TensorRT engines live, and the JSON sidecar that says what an engine is for.

A serialized TensorRT engine only runs on the TensorRT version and GPU it was built with, for the
ONNX graph, precision and shape range it was built from. Peers ship engines without that record
and users meet crashes or silently wrong results after an upgrade. Here every engine
`<dir>/<graph>.engine` has a sidecar `<dir>/<graph>.engine.json`; loading compares it with the
running system and refuses a mismatch with the exact `matchanything build-engine` command that
rebuilds it. Default paths come from a cache key of (variant, GPU, TensorRT version, shapes,
precision, ONNX hash), so an upgrade never picks up a stale engine.

No TensorRT import here: this module is shared by the builder, the backend and the tests.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import tempfile
from pathlib import Path
from typing import Any

from ... import __version__
from ..bundled import resolve_eloftr_checkpoint
from ..errors import ConfigError, EngineMismatchError

SIDECAR_SCHEMA = 1
ENGINE_SUFFIX = ".engine"
SIDECAR_SUFFIX = ".engine.json"
ONNX_SUFFIX = ".onnx"
EXPORT_MANIFEST = "export.json"  # written by `matchanything export` beside the graph files
DEFAULT_OPSET = 17  # the opset `matchanything export` writes; it names the default export directory

# ONNX metadata keys (metadata_props) that export.py writes and build.py and the runtimes read
META_PREFIX = "matchanything."
META_DYNAMIC_DIMS = META_PREFIX + "dynamic_dims"  # JSON {dim_name: {"canvas_div": k} | {"matches": true}}
META_FP32_PATTERNS = META_PREFIX + "fp32_layer_patterns"  # JSON [regex, ...] of node names kept in FP32
# constants of a one-graph export (ELoFTR's product model) that the sidecar repeats for the runtime
META_GRAPH_CONSTANTS = tuple(META_PREFIX + k for k in ("threshold", "max_matches", "image_shapes"))
META_PRECISION = META_PREFIX + "precision"  # "fp16" for an fp16 export with explicit fp32 islands

# sidecar field -> what a mismatch means for the user (each one makes the engine unusable here)
CHECKED_FIELDS = {
    "tensorrt_version": "TensorRT version (serialized engines are not portable across TensorRT releases)",
    "gpu_name": "GPU model (engines are tuned for and bound to the GPU they were built on)",
    "compute_capability": "GPU compute capability",
    "precision": "precision",
    "onnx_sha256": "ONNX model (the engine was built from another export)",
    "package_version": "matchanything_ros version (the graph interface may differ)",
    "variant": "variant",
    "graph": "graph",
}


def cache_root() -> Path:
    """$MATCHANYTHING_CACHE_DIR, else $XDG_CACHE_HOME/matchanything_ros, else ~/.cache/matchanything_ros."""
    env = os.environ.get("MATCHANYTHING_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "matchanything_ros"


# files at least this large have their hash remembered on disk too (small ones hash in milliseconds)
DISK_HASH_MIN_BYTES = 32 << 20
_hash_memo: dict[tuple[str, int, int, int], str] = {}


def _file_identity(path: str | Path) -> tuple[str, int, int, int]:
    st = os.stat(path)
    return str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes (checkpoints, ONNX models, engines).

    Remembered by (path, size, mtime, inode), in this process and in `<cache dir>/file_hashes/`:
    a RoMa export is 1.7 GB and the node rebuilds its matcher on parameter changes, so each load
    re-reading every file costs seconds on a Jetson. Any rewrite of a file changes its mtime
    (or its inode, for a replacement), so it is hashed again.
    """
    identity = _file_identity(path)
    known = _hash_memo.get(identity)
    if known is not None:
        return known
    record = cache_root() / "file_hashes" / hashlib.sha256(repr(identity).encode()).hexdigest()
    try:
        known = record.read_text().strip()
    except OSError:
        known = None
    if known is not None and re.fullmatch(r"[0-9a-f]{64}", known):
        _hash_memo[identity] = known
        return known
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    digest = h.hexdigest()
    if _file_identity(path) == identity:  # not rewritten while we read it
        _hash_memo[identity] = digest
        if identity[1] >= DISK_HASH_MIN_BYTES:
            try:
                write_atomic(record, (digest + "\n").encode())
            except OSError:  # a read-only cache dir only costs the re-hash next time
                pass
    return digest


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a unique temporary file and a rename: a reader (or a
    concurrent build of another engine sharing the timing cache) sees the old or the new file,
    never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def slug(text: str) -> str:
    """File-name-safe lower-case form of `text` ("NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3")."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "unknown"


def shapes_tag(profiles: dict[str, dict[str, list[list[int]]]]) -> str:
    """Short stable tag of all optimisation profiles: graph -> input -> [min, opt, max] shapes."""
    canon = json.dumps(profiles, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:10]


def engine_cache_key(variant: str, gpu_name: str, compute_capability: str, tensorrt_version: str,
                     shape_summary: str, precision: str, onnx_sha256: str) -> str:
    """Directory name for an engine set: every field that makes an engine unusable elsewhere."""
    return "-".join([
        slug(variant), slug(gpu_name), "sm" + compute_capability.replace(".", ""), "trt" + slug(tensorrt_version),
        slug(shape_summary), slug(precision), onnx_sha256[:12],
    ])


def default_engine_dir(key: str) -> Path:
    return cache_root() / "engines" / key


def default_onnx_dir(variant: str, checkpoint_sha256: str, opset: int, tag: str = "") -> Path:
    """Default export directory: one per (variant, checkpoint, opset[, static-shape tag])."""
    name = f"{slug(variant)}-{checkpoint_sha256[:12]}-opset{opset}" + (f"-{slug(tag)}" if tag else "")
    return cache_root() / "onnx" / name


def model_dir(path: str | Path) -> Path:
    """An export/engine location given as a directory or as one of its graph files -> the directory."""
    p = Path(path).expanduser()
    if p.suffix in (ONNX_SUFFIX, ENGINE_SUFFIX) or p.name == EXPORT_MANIFEST:
        return p.parent
    return p


def sidecar_path(engine_path: str | Path) -> Path:
    p = Path(engine_path)
    return p.with_name(p.name[: -len(ENGINE_SUFFIX)] + SIDECAR_SUFFIX) if p.name.endswith(ENGINE_SUFFIX) \
        else p.with_name(p.name + ".json")


def write_sidecar(engine_path: str | Path, record: dict[str, Any]) -> Path:
    """Write the sidecar for `engine_path`; adds schema and the engine file's sha256."""
    out = dict(record)
    out["schema"] = SIDECAR_SCHEMA
    out["engine_sha256"] = sha256_file(engine_path)
    return write_atomic(sidecar_path(engine_path), (json.dumps(out, indent=1, sort_keys=True) + "\n").encode())


def build_command(build_params: dict[str, Any], *, force: bool = True) -> str:
    """The `matchanything build-engine` command line for `build_params` (parameter name -> value, as
    recorded in the sidecar); `force` adds --force-engine-update (rebuild over an existing engine)."""
    args = ["matchanything", "build-engine"]
    for name, value in sorted(build_params.items()):
        if name == "force_engine_update":
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + name.replace("_", "-"))
        elif value != "":  # an empty path means the default: the flag's default does the same
            args += [flag, str(value)]
    if force:
        args.append("--force-engine-update")
    return shlex.join(args)


def rebuild_command(build_params: dict[str, Any]) -> str:
    """The command that rebuilds an engine set with `build_params`, forcing the rebuild."""
    return build_command(build_params, force=True)


def read_sidecar(engine_path: str | Path) -> dict[str, Any]:
    path = sidecar_path(engine_path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineMismatchError(
            f"engine {engine_path} has no sidecar {path}: it was not built by `matchanything build-engine`, so "
            "nothing says which TensorRT/GPU/model it is for. Rebuild it with `matchanything build-engine "
            "--model-file-path <export dir> --engine-file-path " + shlex.quote(str(Path(engine_path).parent))
            + " --force-engine-update`") from None
    except (OSError, ValueError) as exc:
        raise EngineMismatchError(f"engine sidecar {path} is unreadable ({exc}); rebuild the engine") from exc
    if not isinstance(data, dict) or data.get("schema") != SIDECAR_SCHEMA:
        raise EngineMismatchError(f"engine sidecar {path} has an unknown schema; rebuild the engine")
    return data


def check_sidecar(engine_path: str | Path, expected: dict[str, Any], *, verify_engine_hash: bool = True
                  ) -> dict[str, Any]:
    """Compare an engine's sidecar with `expected` (keys of CHECKED_FIELDS; a None value is not checked).

    Returns the sidecar. Raises EngineMismatchError listing every mismatch and the exact rebuild
    command. Also refuses an engine file that is not the one the sidecar was written for.
    """
    record = read_sidecar(engine_path)
    problems = []
    for key, value in expected.items():
        if value is None:
            continue
        if key not in CHECKED_FIELDS:
            raise ValueError(f"unknown sidecar field {key!r}")
        built = record.get(key)
        if str(built) != str(value):
            problems.append(f"{CHECKED_FIELDS[key]}: engine built for {built!r}, this system has {value!r}")
    if verify_engine_hash and not problems:
        actual = sha256_file(engine_path)
        if actual != record.get("engine_sha256"):
            problems.append("engine file does not match its sidecar (replaced or corrupted after the build)")
    if problems:
        build_params = record.get("build_params") or {}
        command = rebuild_command(build_params) if build_params else (
            "matchanything build-engine --model-file-path <export dir> --engine-file-path "
            + shlex.quote(str(Path(engine_path).parent)) + " --force-engine-update")
        raise EngineMismatchError(
            f"refusing TensorRT engine {engine_path}:\n  - " + "\n  - ".join(problems)
            + f"\nRebuild it on this machine with:\n  {command}")
    return record


def expected_sidecar_fields(variant: str | None, graph: str, precision: str, onnx_sha256: str | None,
                            gpu_name: str, compute_capability: str, tensorrt_version: str) -> dict[str, Any]:
    """The sidecar fields an engine must carry to run here (see CHECKED_FIELDS; None = not checked)."""
    return {"variant": variant, "graph": graph, "precision": precision, "onnx_sha256": onnx_sha256,
            "gpu_name": gpu_name, "compute_capability": compute_capability,
            "tensorrt_version": tensorrt_version, "package_version": __version__}


# --- where an export is ----------------------------------------------------------------------------------

def roma_static_tag(coarse_res: int, upsample_res: int) -> str:
    """Name part of a RoMa export: its graph is static, one per (coarse_res, upsample_res)."""
    return f"c{coarse_res}-u{upsample_res}"


def default_model_dir(params: dict[str, Any], variant: str) -> Path:
    """The export directory used when `model_file_path` is empty: derived from the checkpoint's hash
    (and, for RoMa's static graph, from coarse_res/upsample_res)."""
    ckpt = params.get("checkpoint_path", "")
    if not ckpt or not Path(ckpt).is_file():
        raise ConfigError("checkpoint_path is needed to locate the default ONNX export")
    tag = ""
    if variant == "roma":
        from ..roma.config import RomaConfig

        cfg = RomaConfig.from_params(params)
        tag = roma_static_tag(cfg.coarse_res, cfg.upsample_res)
    return default_onnx_dir(variant, sha256_file(ckpt), DEFAULT_OPSET, tag)


def resolve_onnx_dir(params: dict[str, Any]) -> Path:
    """The export directory of `params`: model_file_path, else the default one for its checkpoint
    (ELoFTR's empty checkpoint_path = the bundled demo model; RoMa's by coarse_res/upsample_res)."""
    if params.get("model_file_path"):
        return Path(params["model_file_path"])
    variant = params.get("variant", "eloftr")
    if variant == "eloftr":
        params = {**params, "checkpoint_path": str(resolve_eloftr_checkpoint(params.get("checkpoint_path", ""))[0])}
    return default_model_dir(params, variant)


def export_graphs(folder: Path, pipeline: Any) -> list[str]:
    """The graphs of the export in `folder`: those its manifest names (the last `matchanything export` into
    it: a product export after a --free-size one, or the reverse, leaves the other's files behind), else the
    one-graph model where its file is there, else the pipeline's split graphs."""
    try:
        graphs = json.loads((folder / EXPORT_MANIFEST).read_text()).get("graphs")
    except (OSError, ValueError, AttributeError):
        graphs = None
    if isinstance(graphs, list) and graphs and all(isinstance(g, str) for g in graphs):
        return graphs
    single = pipeline.product_graph  # a one-graph export wins over the split graphs
    if single and (folder / f"{single}{ONNX_SUFFIX}").is_file():
        return [single]
    return list(pipeline.graphs)


def default_model_paths(params: dict[str, Any], pipeline: Any) -> dict[str, Path]:
    """{graph: default ONNX path} for core/backends/factory.py (files may not exist yet)."""
    d = default_model_dir(params, pipeline.name)
    return {g: d / f"{g}{ONNX_SUFFIX}" for g in export_graphs(d, pipeline)}


def graph_paths(base: str, graphs: tuple[str, ...]) -> dict[str, Path]:
    """One file path per graph from a user-given path: a path containing `{graph}` is formatted per
    graph; a single-graph variant uses the path as is; otherwise `<stem>.<graph><suffix>` beside it."""
    if "{graph}" in base:
        return {g: Path(base.format(graph=g)) for g in graphs}
    p = Path(base)
    if len(graphs) == 1:
        return {graphs[0]: p}
    return {g: p.with_name(f"{p.stem}.{g}{p.suffix}") for g in graphs}
