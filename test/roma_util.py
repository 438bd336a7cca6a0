"""Shared, process-cached set-up of the RoMa tests: fixture discovery, seeded weights written to real
checkpoint files, one model per session, one forward per (pair, GP solver).

Everything about the fixtures (names, sizes, seeds, the weight override, strides) is read from
`roma/fixtures_meta.json` and the npz files under $MATCHANYTHING_REFERENCE_DIR (default
test/fixtures/reference).
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from reference import REFERENCE_ROOT, seeded_weights_module  # noqa: E402

import parity_rules as pr

REF_ROOT = REFERENCE_ROOT
REF = REF_ROOT / "roma"
SLOW_FORWARD_SECONDS = 60.0  # pairs whose official CPU forward took longer run only under the `slow` marker


def meta() -> dict[str, Any]:
    path = REF / "fixtures_meta.json"
    if not path.is_file():
        pytest.fail(f"RoMa reference fixtures not found under {REF} (set MATCHANYTHING_REFERENCE_DIR)")
    return json.loads(path.read_text())


def pair_meta(name: str) -> dict[str, Any]:
    return next(p for p in meta()["pairs"] if p["name"] == name)


def is_slow(name: str) -> bool:
    """The pair's official CPU forward took longer than SLOW_FORWARD_SECONDS (its tests are marked slow)."""
    return float(pair_meta(name).get("forward_seconds_cpu", 0)) > SLOW_FORWARD_SECONDS


def pair_params(only_full_res: bool = False, mark_slow: bool = True) -> list[Any]:
    """pytest params of the fixture pairs; long ones marked slow (unless mark_slow is False: no forward needed).

    only_full_res: only pairs whose dense outputs are stored at stride 1."""
    out = []
    for p in meta()["pairs"]:
        strides = p.get("strides", {})
        if only_full_res and any(strides.get(k, 1) != 1 for k in ("final_warp_A_to_B", "final_certainty")):
            continue
        slow = mark_slow and is_slow(p["name"])
        marks = [pytest.mark.slow] if slow else []
        out.append(pytest.param(p["name"], marks=marks, id=p["name"]))
    return out


@functools.lru_cache(maxsize=None)
def npz(name: str) -> dict[str, np.ndarray]:
    with np.load(REF / f"{name}.npz") as z:
        return {k: z[k] for k in z.files}


def _seeded_module() -> Any:
    return seeded_weights_module(REF_ROOT)


@functools.lru_cache(maxsize=1)
def weight_files() -> tuple[Path, Path]:
    """The seeded weights written as the two real files a user passes: a Lightning-style .ckpt with
    `matcher.`-prefixed keys, and a DINOv2 .pth state dict. Built once per process."""
    seed = meta()["weights_seed"]
    mod = _seeded_module()
    out = Path(tempfile.mkdtemp(prefix="roma_test_weights_"))
    atexit.register(shutil.rmtree, out, True)  # 1.6 GB per session: never left behind in /tmp
    ckpt, dino = out / "matchanything_roma.ckpt", out / "dinov2_vitl14_pretrain.pth"
    torch.save({"state_dict": mod.seeded_state_dict(REF / "manifest.json", seed), "epoch": 0, "global_step": 0},
               ckpt)
    torch.save(mod.seeded_state_dict(REF / "dinov2_manifest.json", seed), dino)
    return ckpt, dino


@functools.lru_cache(maxsize=1)
def net() -> Any:
    """One RomaNet for the session, loaded from the files through the pipeline's strict loader."""
    from matchanything_ros.core.roma.pipeline import RomaPipeline

    ckpt, dino = weight_files()
    pipe = RomaPipeline({"dinov2_path": str(dino)})
    return pipe.build_net(pipe.load_weights({"checkpoint_path": str(ckpt), "dinov2_path": str(dino)}))


@functools.lru_cache(maxsize=None)
def weight_files_for(name: str) -> tuple[Path, Path]:
    """The checkpoint and DINOv2 files a user would pass to reproduce `name`: the seeded ones, with the pair's weight
    override written into a copy of the checkpoint where it has one (beside the seeded files: removed with them)."""
    ckpt, dino = weight_files()
    override = pair_meta(name).get("weight_override")
    if not override:
        return ckpt, dino
    state = torch.load(ckpt, weights_only=True)
    state["state_dict"][override["key"]][override["index"]] = float(npz(name)["override_to_out_bias_last"])
    path = ckpt.with_name(f"matchanything_roma_{name}.ckpt")
    torch.save(state, path)
    return path, dino


def quickest_pair(full_res: bool = False) -> str:
    """The fixture pair whose official forward was quickest (one without a weight override where there is one);
    full_res: among those whose final warp and certainty are stored at stride 1 (fails if there is none)."""
    pairs = [p for p in meta()["pairs"] if not full_res or all(
        p.get("strides", {}).get(k, 1) == 1 for k in ("final_warp_A_to_B", "final_warp_B_to_A", "final_certainty"))]
    if not pairs:
        pytest.fail(f"no RoMa fixture pair under {REF} stores its final warp and certainty at full resolution")
    return min(pairs, key=lambda p: (bool(p.get("weight_override")), p.get("forward_seconds_cpu", 0)))["name"]


class weight_override:
    """Apply a fixture's documented weight override (key/index from the meta, value from the npz)."""

    def __init__(self, model: Any, name: str) -> None:
        self.model, self.override = model, pair_meta(name).get("weight_override")
        self.value = float(npz(name)["override_to_out_bias_last"]) if self.override else None

    def __enter__(self) -> None:
        if self.override:
            key = self.override["key"].removeprefix("matcher.").removeprefix("model.")
            param = dict(self.model.checkpoint_modules().named_parameters())[key]
            self.saved = param.data[self.override["index"]].clone()
            param.data[self.override["index"]] = self.value

    def __exit__(self, *exc: object) -> None:
        if self.override:
            key = self.override["key"].removeprefix("matcher.").removeprefix("model.")
            dict(self.model.checkpoint_modules().named_parameters())[key].data[self.override["index"]] = self.saved


def model_inputs(name: str) -> tuple[torch.Tensor, torch.Tensor, Any, Any]:
    from matchanything_ros.core.roma.preprocess import prepare_image

    z = npz(name)
    c, u = int(z["coarse_res"][0]), int(z["upsample_res"][0])
    # the fixtures feed the original images straight in (no web-UI 640x480 stage)
    pa = prepare_image(z["img0_uint8"], c, u, webui_resize=False)
    pb = prepare_image(z["img1_uint8"], c, u, webui_resize=False)
    coarse = torch.from_numpy(np.stack([pa.coarse, pb.coarse]))
    fine = torch.from_numpy(np.stack([pa.fine, pb.fine]))
    return coarse, fine, pa, pb


@functools.lru_cache(maxsize=None)
def forward(name: str, solver: str = "inverse") -> dict[str, Any]:
    """One recorded forward of a fixture pair: intermediates + warp + certainty (numpy)."""
    model = net()
    coarse, fine, _, _ = model_inputs(name)
    record: dict[str, Any] = {}
    model.set_gp_solver(solver)
    try:
        with weight_override(model, name), torch.inference_mode():
            warp, cert = model.forward_dense(coarse, fine, record)
    finally:
        model.set_gp_solver("inverse")
    out = {k: v.float().numpy() for k, v in record.items()}
    out["warp"], out["certainty"] = warp.numpy(), cert.numpy()
    return out


@contextlib.contextmanager
def anchor_ties_decided_as(model: Any, fixture_argmax: np.ndarray, what: str = "anchors") -> Iterator[pr.Excused]:
    """Inside the block, the model's scale-16 anchor near-ties are decided as the fixture decided them
    (pr.decide_anchor_ties_as on its embedding decoder's output; pass 2 has no scale 16, so it acts once per forward).
    Yields what it decided, counted (at most a handful)."""
    decided = pr.Excused(f"{what}: near-ties decided as the fixture's")

    def hook(module: Any, inputs: Any, output: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        cls = pr.decide_anchor_ties_as(output[0], fixture_argmax)
        for where in (cls.argmax(dim=1) != output[0].argmax(dim=1)).nonzero().tolist():
            decided.add(str(tuple(where)))
        decided.check()
        return cls, output[1]

    handle = model.decoder.embedding_decoder.register_forward_hook(hook)
    try:
        yield decided
    finally:
        handle.remove()


def anchor_flips(name: str, solver: str = "inverse") -> pr.Excused:
    """Where the cached forward's anchor classification differs from the fixture's: only at near-ties (a flip at a
    larger margin fails here), counted (at most a handful)."""
    cls = forward(name, solver)["pass1_s16_gm_cls"]
    return pr.compare_argmax(cls.argmax(axis=1), npz(name)["pass1_s16_gm_cls_argmax"], pr.absolute_margin(cls, axis=1),
                             pr.ANCHOR_TIE_ATOL, f"{name} anchors ({solver} GP), decided as the fixture's")


@functools.lru_cache(maxsize=None)
def forward_ties_decided(name: str, solver: str = "inverse") -> tuple[dict[str, Any], pr.Excused]:
    """The forward every dense comparison uses (docs/parity.md, "The GP solve": the near-tie rule): the cached
    forward where its anchors equal the fixture's; where they differ only at near-ties, the forward again with
    those ties decided as the fixture's, as the sampler's stored draws are replayed. Which of two anchors within
    1e-3 wins is the CPU's rounding, the original's own fp32 GP's included, and one flip moves that cell's flow by
    a region and the scale-16 certainty image-wide."""
    excused = anchor_flips(name, solver)
    if not excused.count:
        return forward(name, solver), excused
    model = net()
    coarse, fine, _, _ = model_inputs(name)
    record: dict[str, Any] = {}
    model.set_gp_solver(solver)
    try:
        with weight_override(model, name), anchor_ties_decided_as(model, npz(name)["pass1_s16_gm_cls_argmax"], name), \
                torch.inference_mode():
            warp, cert = model.forward_dense(coarse, fine, record)
    finally:
        model.set_gp_solver("inverse")
    out = {k: v.float().numpy() for k, v in record.items()}
    out["warp"], out["certainty"] = warp.numpy(), cert.numpy()
    return out, excused


def stored_dense(name: str) -> tuple[np.ndarray, np.ndarray]:
    """The fixture's own symmetric warp [H, 2W, 4] and certainty (needs stride-1 arrays).

    The grid half is rebuilt with torch.linspace, as the original (np.linspace differs in the last ulp)."""
    z = npz(name)
    a2b, b2a = z["final_warp_A_to_B"], z["final_warp_B_to_A"]
    h, w = a2b.shape[1:]
    gy, gx = torch.meshgrid(torch.linspace(-1 + 1 / h, 1 - 1 / h, h), torch.linspace(-1 + 1 / w, 1 - 1 / w, w),
                            indexing="ij")
    gx_np, gy_np = gx.numpy(), gy.numpy()
    left = np.stack([gx_np, gy_np, a2b[0], a2b[1]], -1)
    right = np.stack([b2a[0], b2a[1], gx_np, gy_np], -1)
    return np.concatenate([left, right], axis=1), z["final_certainty"]


def subsample(name: str, key: str, full: np.ndarray) -> np.ndarray:
    """full[..., ::s, ::s] with the stride the fixture stored `key` at (fixtures_meta.json)."""
    s = int(pair_meta(name).get("strides", {}).get(key, 1))
    return full[..., ::s, ::s]
