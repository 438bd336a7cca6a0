"""How ill-conditioned RoMa's GP gets, and how far each solve form moves: the figures of docs/parity.md,
section "The GP solve".

Cases: the RoMa reference pairs (the scale-16 features their coarse images give with the seeded weights, checked
against the fixture's stored slice) and inputs built to be ill-conditioned, through the same model: a bright object
centred on black (moon, at the default 560 and at 168), the Hubble deep field (bright specks on black), a picture
two thirds covered by a uniform grey, and features built to nearly coincide (a common component 30x and 300x the
rest: the worst spectrum, lambda_max -> n). For each, the GP's system (K_xy, A = K_yy + 0.1 I, f) is formed as the model
forms it (fp32) and measured:

- kappa(A) (float64 eigenvalues) and the cancellation of the original's product, sum |K_xy| |A^-1 f| / max |mu|;
- every solve form's posterior against the truth (kernels, solve and product in float64 from the same fp32
  features): the original's fp32 inverse (our CPU default), Cholesky (GPU torch form), Newton-Schulz (export form),
  the export form as it was before (20 Newton-Schulz steps, K_xy (X f)), and a float64 solve of the fp32 system;
- what the decoder makes of each at scale 16 of pass 1 (embedding decoder, anchors to flow, scale-16 refiner):
  certainty logits, flow, anchor argmax flips against the truth's, and the truth's top-2 margin at the flips;
- the same across CPU configurations, each in its own process (capabilities are read at start-up): native, and
  capped to the generic kernels (CI's capped parity pass). The capped run also solves the native run's features,
  which separates the solve's own sensitivity from that of the features;
- the export form against the number of residual corrections (0..3), and the solve time of each form at the
  default 1600 tokens (torch CPU, and the GP alone exported to ONNX on ONNX Runtime CPU, old and new export form).

    python tools/gp_conditioning.py --markdown /tmp/gp.md          # native + capped, tables to a file
    python tools/gp_conditioning.py --keep /tmp/gp --configs native --cases pair1_rocket_crossmodal moon_168
    python tools/gp_conditioning.py --tabulate /tmp/gp

About 4 min per configuration on 2 free cores.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TEST_DIR = REPO / "test"

CAPS = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}
CONFIGS: dict[str, dict[str, str]] = {"native": {"OMP_NUM_THREADS": "2"}, "capped": {**CAPS, "OMP_NUM_THREADS": "2"}}

# form -> what it is (the rows of the tables)
FORMS: dict[str, str] = {
    "inverse": "fp32 torch.linalg.inv, K_xy (A^-1 f): the original's, our CPU default",
    "cholesky": "Cholesky, W = K_xy A^-1 by triangular solves, W f: GPU torch form",
    "newton_schulz": "Newton-Schulz + residual corrections of W, W f: export form (ONNX, TensorRT)",
    "newton_schulz_before": "the export form before: 20 Newton-Schulz steps, K_xy (X f)",
    "inverse_fp64": "float64 solve and product of the fp32 system",
}
# coarse size of the constructed image cases
BUILT_SIZES = {"moon_on_black_560": 560, "moon_on_black_168": 168, "hubble_field_560": 560, "uniform_grey_560": 560}
# features sharing one component this many times the rest: lambda_max(A) -> n (300: n to 4 digits, the bound)
DUPLICATE_CASES = {"near_duplicate_features": 30.0, "identical_features": 300.0}
TIMING_TOKENS = 1600  # the default 560 coarse size: (560 / 14)^2


# --- cases ---------------------------------------------------------------------------------------------------------

def _built_images(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Image pairs made to be ill-conditioned: image B is image A under a homography (black border)."""
    import cv2
    import skimage.data

    if name.startswith("moon_on_black"):  # a bright object centred on black
        img = np.zeros((512, 512, 3), np.uint8)
        img[176:336, 176:336] = cv2.resize(skimage.data.moon(), (160, 160))[..., None]
    elif name.startswith("hubble_field"):  # bright specks on black
        img = np.ascontiguousarray(skimage.data.hubble_deep_field()[:512, :512])
    elif name.startswith("uniform_grey"):  # two thirds of the picture one flat grey
        img = cv2.resize(skimage.data.coffee(), (512, 512))
        img[:, :341] = 128
    else:
        raise ValueError(name)
    hom = np.array([[0.9, 0.05, 30.0], [-0.04, 0.95, 20.0], [1e-4, 5e-5, 1.0]])
    return img, cv2.warpPerspective(img, hom, (512, 512))


def _cases(net: Any, wanted: list[str] | None) -> dict[str, dict[str, Any]]:
    """name -> {f1 [2, 512, h, w] (the projected scale-16 features of [A, B]), coarse (h1, w1), fixture name}."""
    import torch

    import roma_util as ru
    from matchanything_ros.core.roma.preprocess import prepare_image

    def features(coarse: Any) -> Any:
        with torch.inference_mode():
            return net.decoder.proj["16"](net.dinov2(coarse))

    out: dict[str, dict[str, Any]] = {}
    for p in ru.meta()["pairs"]:
        name = p["name"]
        if wanted and name not in wanted:
            continue
        coarse = ru.model_inputs(name)[0]
        f1 = features(coarse)
        z = ru.npz(name)
        key = next(k for k in z if k.startswith("proj16_f1_ch_every"))
        every = int(key.rsplit("every", 1)[1])
        check = float(np.abs(f1[:, ::every].numpy() - z[key]).max() / np.abs(z[key]).max())
        out[name] = {"f1": f1, "coarse": tuple(coarse.shape[-2:]), "fixture": name, "f1_vs_fixture": check}
    for name, c in BUILT_SIZES.items():
        if wanted and name not in wanted:
            continue
        a, b = _built_images(name)
        prepared = [prepare_image(im, c, c, webui_resize=False).coarse for im in (a, b)]
        coarse = torch.from_numpy(np.stack([p for p in prepared if p is not None]))
        out[name] = {"f1": features(coarse), "coarse": (c, c), "fixture": None}
    for name, scale in DUPLICATE_CASES.items():
        if not wanted or name in wanted:
            g = torch.Generator().manual_seed(0)
            common = torch.randn(1, 512, 1, 1, generator=g)
            out[name] = {"f1": scale * common + torch.randn(2, 512, 40, 40, generator=g), "coarse": (560, 560),
                         "fixture": None}
    return out


# --- worker (one configuration, in its own process) ----------------------------------------------------------------

def _before_export_form(k_xy: Any, a: Any, f: Any) -> Any:
    """The export form before this measurement: 20 steps at n = 1600 (count for 1e-9 + 2), K_xy (X f)."""
    from matchanything_ros.core.roma.gp import SIGMA_NOISE, newton_schulz_inverse

    n = a.shape[-1]
    rho = n / (n + 2 * SIGMA_NOISE)
    steps = int(math.ceil(math.log2(math.log(1e-9) / math.log(rho)))) + 2
    return k_xy @ (newton_schulz_inverse(a, steps) @ f)


def _truth(gp: Any, f1: Any) -> Any:
    """Kernels, solve and product in float64 from the fp32 features (f from the model's fp32 embedding)."""
    import torch

    from matchanything_ros.core.roma.gp import SIGMA_NOISE, cos_kernel
    from matchanything_ros.core.roma.model import _swap_halves

    _, _, f = gp.kernel_system(f1, _swap_halves(f1))
    xq = f1.double().flatten(2).transpose(1, 2)
    ys = _swap_halves(f1).double().flatten(2).transpose(1, 2)
    a = cos_kernel(ys, ys) + SIGMA_NOISE * torch.eye(ys.shape[1], dtype=torch.float64)
    return cos_kernel(xq, ys) @ torch.linalg.solve(a, f.double())


def _posteriors(gp: Any, f1: Any) -> tuple[dict[str, Any], dict[str, float]]:
    import torch

    from matchanything_ros.core.roma.gp import solve_posterior
    from matchanything_ros.core.roma.model import _swap_halves

    with torch.inference_mode():
        k_xy, a, f = gp.kernel_system(f1, _swap_halves(f1))
        mus: dict[str, Any] = {"truth": _truth(gp, f1)}
        for form in FORMS:
            mus[form] = _before_export_form(k_xy, a, f) if form == "newton_schulz_before" else \
                solve_posterior(form, k_xy, a, f)  # type: ignore[arg-type]
        eig = torch.linalg.eigvalsh(a.double())
        alpha = torch.linalg.solve(a.double(), f.double())
        cancel = (k_xy.double().abs() @ alpha.abs()).amax() / (k_xy.double() @ alpha).abs().amax()
    info = {"n": int(a.shape[-1]), "kappa": float((eig[:, -1] / eig[:, 0]).max()),
            "lambda_max": float(eig[:, -1].max()), "lambda_min": float(eig[:, 0].min()), "cancellation": float(cancel),
            "alpha_over_f": float(alpha.abs().amax() / f.abs().amax())}
    return mus, info


def _stage(net: Any, f1: Any, mu: Any, coarse: tuple[int, int], fixture: str | None,
           ties_as: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Scale 16 of pass 1 from a given GP posterior [2, hw, 512] (as RomaNet._decode runs it); with ties_as (an
    anchor argmax [2, h, w]), anchor near-ties decided as there (parity_rules.decide_anchor_ties_as)."""
    import contextlib

    import torch

    import parity_rules as pr
    import roma_util as ru
    from matchanything_ros.core.roma.model import REFINE_INIT, _swap_halves, cls_to_flow_refine

    dec = net.decoder
    post = mu.float().transpose(1, 2).reshape(f1.shape[0], -1, f1.shape[2], f1.shape[3])
    h1, w1 = coarse
    override = ru.weight_override(net, fixture) if fixture else contextlib.nullcontext()
    with override, torch.inference_mode():
        cls, certainty = dec.embedding_decoder(post, f1)
        if ties_as is not None:
            cls = pr.decide_anchor_ties_as(cls, ties_as)
        flow = cls_to_flow_refine(cls).float()
        d_flow, d_cert = dec.conv_refiner["16"](f1, _swap_halves(f1), flow, 1.0)
        flow = flow + 16 * torch.stack((d_flow[:, 0] / (REFINE_INIT * w1), d_flow[:, 1] / (REFINE_INIT * h1)), dim=1)
        certainty = certainty.float() + d_cert
    cls_np = cls.float().numpy()
    return {"certainty": certainty.numpy(), "flow": flow.numpy(), "argmax": cls_np.argmax(axis=1),
            "margin": pr.absolute_margin(cls_np, axis=1)}


def _compare(mu: Any, ref_mu: Any, st: dict[str, np.ndarray], ref_st: dict[str, np.ndarray]) -> dict[str, Any]:
    """How far one (posterior, stage) lies from another: posterior relative to the largest |ref|, certainty logits
    and flows absolute, anchor flips with the reference's top-2 margin at them."""
    mu, ref_mu = np.asarray(mu, np.float64), np.asarray(ref_mu, np.float64)
    flips = st["argmax"] != ref_st["argmax"]
    return {"posterior": float(np.abs(mu - ref_mu).max() / np.abs(ref_mu).max()),
            "certainty": float(np.abs(st["certainty"] - ref_st["certainty"]).max()),
            "flow": float(np.abs(st["flow"] - ref_st["flow"]).max()),
            "flips": int(flips.sum()),
            "flip_margin_max": float(ref_st["margin"][flips].max()) if flips.any() else None}


def _refinement_sweep(gp: Any, f1: Any) -> dict[str, float]:
    """The export form's posterior error against the float64 solve of the same system, 0..3 residual corrections."""
    import torch

    from matchanything_ros.core.roma.gp import newton_schulz_posterior
    from matchanything_ros.core.roma.model import _swap_halves

    with torch.inference_mode():
        k_xy, a, f = gp.kernel_system(f1, _swap_halves(f1))
        exact = k_xy.double() @ torch.linalg.solve(a.double(), f.double())
        out = {}
        for steps in range(4):
            mu = newton_schulz_posterior(k_xy, a, f, refinement_steps=steps).double()
            out[str(steps)] = float((mu - exact).abs().amax() / exact.abs().amax())
    return out


def _tf32(t: Any) -> Any:
    """fp32 -> the nearest value with TF32's 10 mantissa bits (what a tensor core reads of an fp32 operand)."""
    import torch

    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def tf32_sweep(gp: Any, f1: Any) -> dict[str, float]:
    """The export form with every matrix product's operands read as TF32 (fp32 accumulation), as a GPU's tensor
    cores run an "FP32" layer when TF32 is allowed, against the float64 solve of the same system."""
    import torch

    from matchanything_ros.core.roma.gp import SIGMA_NOISE, newton_schulz_iterations
    from matchanything_ros.core.roma.model import _swap_halves

    def mm(p: Any, q: Any) -> Any:
        return _tf32(p) @ _tf32(q)

    with torch.inference_mode():
        k_xy, a, f = gp.kernel_system(f1, _swap_halves(f1))
        exact = k_xy.double() @ torch.linalg.solve(a.double(), f.double())
        eye = torch.eye(a.shape[-1]).expand_as(a)
        x = eye * (2.0 / (a.abs().sum(dim=-1).amax(dim=-1)[:, None, None] + SIGMA_NOISE))
        for _ in range(newton_schulz_iterations(a.shape[-1])):
            x = mm(x, 2.0 * eye - mm(a, x))
        w = mm(k_xy, x)
        for _ in range(2):
            w = w + mm(k_xy - mm(w, a), x)
        mu = mm(w, f).double()
        return {"tf32": float((mu - exact).abs().amax() / exact.abs().amax())}


def _median_ms(fn: Callable[[], Any], repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _timings(gp: Any, f1: Any) -> dict[str, float]:
    """Solve time per form at the default size (batch 2, 1600 tokens), torch CPU; the GP module alone exported
    to ONNX and run by ONNX Runtime CPU (2 threads), the export form now and before."""
    import onnxruntime as ort
    import torch

    from matchanything_ros.core.roma.gp import GaussianProcessMatch, solve_posterior
    from matchanything_ros.core.roma.model import _swap_halves

    out: dict[str, float] = {}
    y = _swap_halves(f1)
    with torch.inference_mode():
        k_xy, a, f = gp.kernel_system(f1, y)
        for form in FORMS:
            if form == "newton_schulz_before":
                out[f"torch.{form}"] = _median_ms(lambda: _before_export_form(k_xy, a, f))
            else:
                out[f"torch.{form}"] = _median_ms(lambda: solve_posterior(form, k_xy, a, f))  # type: ignore[arg-type]

    class Before(GaussianProcessMatch):
        def forward(self, x: Any, y: Any) -> Any:
            k, a, f = self.kernel_system(x, y)
            return _before_export_form(k, a, f).transpose(1, 2).reshape(x.shape[0], -1, x.shape[2], x.shape[3])

    for label, module in (("newton_schulz", GaussianProcessMatch(512, "newton_schulz")), ("newton_schulz_before",
                                                                                          Before(512))):
        module.load_state_dict(gp.state_dict())
        buf = io.BytesIO()
        with torch.no_grad():
            torch.onnx.export(module.eval(), (f1, y), buf, input_names=["x", "y"],  # type: ignore[arg-type]
                              output_names=["mu"], opset_version=17, dynamo=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
        feeds = {"x": f1.numpy(), "y": y.numpy()}
        out[f"onnxruntime.{label}"] = _median_ms(lambda: sess.run(None, feeds), repeats=3)
    return out


def worker(out_dir: Path, config: str, wanted: list[str] | None, also_features_of: Path | None) -> None:
    sys.path.insert(0, str(TEST_DIR))
    sys.path.insert(0, str(REPO))
    import torch

    import roma_util as ru
    from matchanything_ros.core.roma.gp import GaussianProcessMatch, newton_schulz_iterations
    from matchanything_ros.core.roma.pipeline import RomaPipeline
    from reference import REFERENCE_ROOT, seeded_weights_module

    seeded = seeded_weights_module(REFERENCE_ROOT)
    seed = ru.meta()["weights_seed"]
    net = RomaPipeline({}).build_net(seeded.seeded_state_dict(ru.REF / "manifest.json", seed),
                                     seeded.seeded_state_dict(ru.REF / "dinov2_manifest.json", seed))
    gp = net.decoder.gps["16"]
    assert isinstance(gp, GaussianProcessMatch)
    result: dict[str, Any] = {"config": config, "aten": torch.backends.cpu.get_cpu_capability(),
                              "threads": torch.get_num_threads(), "cases": {}}
    arrays: dict[str, np.ndarray] = {}
    cases = _cases(net, wanted)
    feature_sets = {"own": {k: v["f1"] for k, v in cases.items()}}
    native_argmax: dict[str, np.ndarray] = {}
    if also_features_of is not None:
        with np.load(also_features_of / "features.npz") as z:
            feature_sets["native_features"] = {k: torch.from_numpy(z[k]) for k in z.files if k in cases}
        with np.load(also_features_of / "arrays.npz") as z:
            native_argmax = {k: z[k] for k in z.files if k.startswith("own/") and k.endswith("/argmax")}
    for label, feats in feature_sets.items():
        for name, f1 in feats.items():
            t0 = time.perf_counter()
            case = cases[name]
            mus, info = _posteriors(gp, f1)
            stages = {form: _stage(net, f1, mu, case["coarse"], case["fixture"]) for form, mu in mus.items()}
            r: dict[str, Any] = dict(info, newton_schulz_iterations=newton_schulz_iterations(int(info["n"])),
                                     vs_truth={form: _compare(mus[form], mus["truth"], stages[form], stages["truth"])
                                               for form in FORMS})
            if label == "own":
                r["refinement_sweep"] = _refinement_sweep(gp, f1)
                r["tf32_sweep"] = tf32_sweep(gp, f1)
                if "f1_vs_fixture" in case:
                    r["f1_vs_fixture"] = case["f1_vs_fixture"]
            result["cases"].setdefault(label, {})[name] = r
            for form, mu in mus.items():
                arrays[f"{label}/{name}/{form}/mu"] = mu.float().numpy()
                for key, value in stages[form].items():
                    arrays[f"{label}/{name}/{form}/{key}"] = value
                if label == "native_features":  # the same, anchor near-ties decided as the native run decided them
                    ties_as = native_argmax[f"own/{name}/{form}/argmax"]
                    tied = _stage(net, f1, mu, case["coarse"], case["fixture"], ties_as)
                    arrays[f"{label}_ties/{name}/{form}/mu"] = mu.float().numpy()
                    for key, value in tied.items():
                        arrays[f"{label}_ties/{name}/{form}/{key}"] = value
            print(f"[{config}] {label} {name}: n={info['n']} kappa={info['kappa']:.3g} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    if config == "native" and (not wanted or "pair0_coffee_homography" in wanted):
        result["timings_ms"] = _timings(gp, cases["pair0_coffee_homography"]["f1"])
    np.savez(out_dir / "features.npz", **{k: v["f1"].numpy() for k, v in cases.items()})  # type: ignore[arg-type]
    np.savez(out_dir / "arrays.npz", **arrays)  # type: ignore[arg-type]
    (out_dir / "result.json").write_text(json.dumps(result, indent=1))


# --- tables --------------------------------------------------------------------------------------------------------

def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    return f"{v:.1e}" if v < 0.1 or v >= 1e4 else f"{v:.3g}"


def _cross(dirs: dict[str, Path], label_b: str) -> dict[str, dict[str, dict[str, Any]]]:
    """native vs capped, per case and form (capped with its own features, or with the native run's)."""
    za, zb = np.load(dirs["native"] / "arrays.npz"), np.load(dirs["capped"] / "arrays.npz")
    out: dict[str, dict[str, dict[str, Any]]] = {}
    names = sorted({k.split("/")[1] for k in zb.files if k.startswith(f"{label_b}/")})
    for name in names:
        for form in ["truth", *FORMS]:
            def stage(z: Any, label: str) -> dict[str, np.ndarray]:
                return {k: z[f"{label}/{name}/{form}/{k}"] for k in ("certainty", "flow", "argmax", "margin")}
            out.setdefault(name, {})[form] = _compare(zb[f"{label_b}/{name}/{form}/mu"], za[f"own/{name}/{form}/mu"],
                                                      stage(zb, label_b), stage(za, "own"))
    return out


def tabulate(dirs: dict[str, Path]) -> str:
    results = {c: json.loads((d / "result.json").read_text()) for c, d in dirs.items()}
    first = results.get("native") or next(iter(results.values()))
    lines = ["### Condition and cancellation", "",
             "| case | tokens n | kappa(A) | lambda_max | sum\\|K_xy\\|\\|A^-1 f\\| / max\\|mu\\| "
             "| Newton-Schulz steps |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in first["cases"]["own"].items():
        lines.append(f"| {name} | {r['n']} | {_fmt(r['kappa'])} | {_fmt(r['lambda_max'])} | {_fmt(r['cancellation'])} "
                     f"| {r['newton_schulz_iterations']} |")
    for config, res in results.items():
        lines += ["", f"### Each form against the truth ({config}: ATen {res['aten']}, {res['threads']} threads)", "",
                  "posterior: max |mu - mu_truth| / max |mu_truth|; certainty logits and flow (normalised) at pass 1 "
                  "scale 16, max abs; flips: anchor argmax differing from the truth's (largest truth top-2 margin "
                  "among them)", "",
                  "| case | form | posterior | certainty logit | flow | anchor flips (margin) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, r in res["cases"]["own"].items():
            for form, v in r["vs_truth"].items():
                lines.append(f"| {name} | {form} | {_fmt(v['posterior'])} | {_fmt(v['certainty'])} | {_fmt(v['flow'])} "
                             f"| {v['flips']} ({_fmt(v['flip_margin_max'])}) |")
    if {"native", "capped"} <= set(dirs):
        for label_b, what in (("own", "each run's own features: what a user sees"),
                              ("native_features", "the same (native) features: the GP and decoder alone"),
                              ("native_features_ties", "the same features, anchor near-ties decided as the native "
                                                       "run's (parity_rules.decide_anchor_ties_as)")):
            cross = _cross(dirs, label_b)
            lines += ["", f"### native vs capped, {what}", "",
                      "| case | form | posterior | certainty logit | flow | anchor flips (margin) |",
                      "| --- | --- | --- | --- | --- | --- |"]
            for name, forms in cross.items():
                for form, v in forms.items():
                    lines.append(f"| {name} | {form} | {_fmt(v['posterior'])} | {_fmt(v['certainty'])} "
                                 f"| {_fmt(v['flow'])} | {v['flips']} ({_fmt(v['flip_margin_max'])}) |")
    lines += ["", "### Export form against the number of residual corrections (posterior vs float64 solve)", "",
              "| case | 0 | 1 | 2 | 3 | 2, products in TF32 |", "| --- | --- | --- | --- | --- | --- |"]
    for name, r in first["cases"]["own"].items():
        sweep = r["refinement_sweep"]
        tf32 = r.get("tf32_sweep", {}).get("tf32")  # absent from results kept before it was measured
        lines.append(f"| {name} | " + " | ".join(_fmt(sweep[str(k)]) for k in range(4)) + f" | {_fmt(tf32)} |")
    if "timings_ms" in first:
        lines += ["", f"### Solve time at {TIMING_TOKENS} tokens, batch 2 (ms, median; {first['threads']} threads)", "",
                  "| form | ms |", "| --- | --- |"]
        lines += [f"| {k} | {v:.0f} |" for k, v in first["timings_ms"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--cases", nargs="+", help="only these cases (fixture pair names or built case names)")
    ap.add_argument("--keep", type=Path, help="keep each configuration's results under this folder")
    ap.add_argument("--markdown", type=Path, help="write the tables here (else stdout)")
    ap.add_argument("--tabulate", type=Path, help="tabulate results kept by an earlier --keep run")
    ap.add_argument("--worker", nargs=2, metavar=("OUT_DIR", "CONFIG"), help=argparse.SUPPRESS)
    ap.add_argument("--native-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(Path(args.worker[0]), args.worker[1], args.cases, args.native_dir)
        return 0
    if args.tabulate:
        dirs = {c: args.tabulate / c for c in CONFIGS if (args.tabulate / c / "result.json").is_file()}
    else:
        root = args.keep or Path(tempfile.mkdtemp(prefix="gp_conditioning_"))
        dirs = {}
        for config in args.configs:  # native first: the capped run also solves its features
            d = root / config
            d.mkdir(parents=True, exist_ok=True)
            env = {k: v for k, v in os.environ.items() if k not in CAPS}
            env.update(CONFIGS[config])
            cmd = [sys.executable, __file__, "--worker", str(d), config]
            if args.cases:
                cmd += ["--cases", *args.cases]
            if config != "native" and "native" in dirs:
                cmd += ["--native-dir", str(dirs["native"])]
            subprocess.run(cmd, env=env, check=True)
            dirs[config] = d
    text = tabulate(dirs)
    if args.markdown:
        args.markdown.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
