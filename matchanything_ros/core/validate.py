"""`matchanything validate`: a backend against the torch fp32 reference, compared correspondence by correspondence.

Peers' validators sort two match lists by confidence and compare them index by index, which says
nothing about whether the same correspondences were found. Here each match has an identity that
does not depend on list order: ELoFTR's (query cell i of image0, cell j of image1); RoMa's grid
point of image0 (deterministic `topk` sampling). The match sets are compared (Jaccard, count
difference), and for matches present in both, keypoints (mean/max error, % within 1 px) and
confidences (max difference, Pearson correlation).

Pass/fail uses the seed README's promise: mean keypoint error <= 1 px, confidence difference
<= 0.01, match count within 5 %, confidence correlation > 0.95 (each where defined).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .errors import ConfigError
from .result import MatchResult

CRITERIA = {"kp_mean_px_max": 1.0, "conf_abs_max": 0.01, "count_diff_pct_max": 5.0, "conf_corr_min": 0.95}
_CELL_KEY = np.int64(1) << 32


@dataclass
class RunOutput:
    result: MatchResult
    keys: np.ndarray  # int64 [N] identity of each match row
    timings_ms: dict[str, float]


def match_keys(pipeline: Any, result: MatchResult) -> np.ndarray:
    """Order-independent identity of each match row of `result` (just produced by `pipeline`)."""
    i_ids, j_ids = result.extras.get("coarse_i_ids"), result.extras.get("coarse_j_ids")
    if i_ids is not None and j_ids is not None:  # ELoFTR: each row's coarse cells
        if len(i_ids) != len(result):
            raise ConfigError("ELoFTR result rows do not match their coarse matches")
        return np.asarray(i_ids, np.int64) * _CELL_KEY + np.asarray(j_ids, np.int64)
    kp_model = result.extras.get("keypoints0_model")
    if kp_model is not None:  # RoMa topk: image0 grid points are fixed positions
        q = np.round(np.asarray(kp_model, np.float64) * 1000.0).astype(np.int64)
        return q[:, 0] * _CELL_KEY + q[:, 1]
    raise ConfigError(f"no correspondence identity for variant {getattr(pipeline, 'name', '?')}")


def run_pair(pipeline: Any, backend: Any, image0: np.ndarray, image1: np.ndarray) -> RunOutput:
    """Matcher.match's run (preprocess -> backend graphs -> postprocess, timed) plus the match keys."""
    from .matcher import run_pipeline

    result = run_pipeline(pipeline, backend, image0, image1)
    return RunOutput(result, match_keys(pipeline, result), dict(result.timings_ms))


def compare(ref: RunOutput, test: RunOutput) -> dict[str, Any]:
    """Correspondence-level comparison of two runs on the same pair."""
    rk, tk = ref.keys, test.keys
    common, ri, ti = np.intersect1d(rk, tk, assume_unique=False, return_indices=True)
    union = np.union1d(rk, tk).size
    n_ref, n_test, n_common = int(rk.size), int(tk.size), int(common.size)
    out: dict[str, Any] = {
        "num_ref": n_ref, "num_test": n_test, "num_common": n_common,
        "jaccard": 1.0 if union == 0 else n_common / union,
        "count_diff_pct": 0.0 if n_ref == n_test else 100.0 * abs(n_test - n_ref) / max(n_ref, 1),
    }
    if n_common:
        r, t = ref.result, test.result
        err0 = np.linalg.norm(r.keypoints0[ri].astype(np.float64) - t.keypoints0[ti], axis=1)
        err1 = np.linalg.norm(r.keypoints1[ri].astype(np.float64) - t.keypoints1[ti], axis=1)
        err = np.maximum(err0, err1)
        dconf = np.abs(r.confidence[ri].astype(np.float64) - t.confidence[ti])
        out.update({"kp_err_mean_px": float(err.mean()), "kp_err_max_px": float(err.max()),
                    "pct_within_1px": float(100.0 * np.mean(err <= 1.0)), "conf_abs_max": float(dconf.max()),
                    "conf_abs_mean": float(dconf.mean())})
        a, b = r.confidence[ri].astype(np.float64), t.confidence[ti].astype(np.float64)
        if n_common >= 3 and a.std() > 0 and b.std() > 0:
            out["conf_corr"] = float(np.corrcoef(a, b)[0, 1])
        elif n_common >= 1 and np.array_equal(a, b):
            out["conf_corr"] = 1.0
        else:
            out["conf_corr"] = None  # undefined (fewer than 3 common matches or constant confidences)
    else:
        out.update({"kp_err_mean_px": None, "kp_err_max_px": None, "pct_within_1px": None,
                    "conf_abs_max": None, "conf_abs_mean": None, "conf_corr": None})
    out["failures"] = failures(out)
    out["passed"] = not out["failures"]
    return out


def failures(m: dict[str, Any]) -> list[str]:
    """Which promises a comparison breaks (criteria that are undefined for it are skipped)."""
    bad = []
    if m["count_diff_pct"] > CRITERIA["count_diff_pct_max"]:
        bad.append(f"match count differs by {m['count_diff_pct']:.1f} % (> {CRITERIA['count_diff_pct_max']} %)")
    if m["num_ref"] and not m["num_common"]:
        bad.append("no correspondence in common with the reference")
    if m.get("kp_err_mean_px") is not None and m["kp_err_mean_px"] > CRITERIA["kp_mean_px_max"]:
        bad.append(f"mean keypoint error {m['kp_err_mean_px']:.3f} px (> {CRITERIA['kp_mean_px_max']} px)")
    if m.get("conf_abs_max") is not None and m["conf_abs_max"] > CRITERIA["conf_abs_max"]:
        bad.append(f"confidence differs by up to {m['conf_abs_max']:.4f} (> {CRITERIA['conf_abs_max']})")
    if m.get("conf_corr") is not None and m["conf_corr"] <= CRITERIA["conf_corr_min"]:
        bad.append(f"confidence correlation {m['conf_corr']:.4f} (<= {CRITERIA['conf_corr_min']})")
    return bad


def summarize(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    def agg(key: str, fn: Any) -> float | None:
        vals = [p[key] for p in pairs if p.get(key) is not None]
        return float(fn(vals)) if vals else None

    return {"pairs": len(pairs), "passed_pairs": sum(p["passed"] for p in pairs),
            "jaccard_min": agg("jaccard", min), "kp_err_mean_px": agg("kp_err_mean_px", np.mean),
            "kp_err_max_px": agg("kp_err_max_px", max), "pct_within_1px_min": agg("pct_within_1px", min),
            "conf_abs_max": agg("conf_abs_max", max), "conf_corr_min": agg("conf_corr", min),
            "count_diff_pct_max": agg("count_diff_pct", max), "passed": all(p["passed"] for p in pairs)}


def validate_pairs(reference: tuple[Any, Any], test: tuple[Any, Any],
                   pairs: Iterable[tuple[str, np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Run (pipeline, backend) `reference` and `test` on every pair; per-pair metrics + summary."""
    per_pair = []
    for name, im0, im1 in pairs:
        ref = run_pair(reference[0], reference[1], im0, im1)
        got = run_pair(test[0], test[1], im0, im1)
        m = compare(ref, got)
        m["pair"] = name
        m["ref_inference_ms"] = ref.timings_ms["inference"]
        m["test_inference_ms"] = got.timings_ms["inference"]
        per_pair.append(m)
    return {"criteria": CRITERIA, "pairs": per_pair, "summary": summarize(per_pair)}


# --- inputs ---------------------------------------------------------------------------------------------

def load_pairs(pair_paths: list[tuple[str, str]] | None = None, fixture_dir: str | None = None
               ) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Image pairs from files (any format OpenCV reads; RGB out) and/or a fixture directory of .npz files
    holding `input_image0_rgb_u8` / `input_image1_rgb_u8` (the reference fixture format) or `image0`/`image1`."""
    import cv2

    pairs: list[tuple[str, np.ndarray, np.ndarray]] = []
    for a, b in pair_paths or []:
        ims = []
        for p in (a, b):
            im = cv2.imread(p, cv2.IMREAD_COLOR)
            if im is None:
                raise ConfigError(f"cannot read image {p}")
            ims.append(cv2.cvtColor(im, cv2.COLOR_BGR2RGB))
        pairs.append((f"{Path(a).name}|{Path(b).name}", ims[0], ims[1]))
    if fixture_dir:
        d = Path(fixture_dir)
        files = sorted(d.glob("*.npz"))
        if not files:
            raise ConfigError(f"no .npz fixtures in {d}")
        for f in files:
            with np.load(f) as z:
                for k0, k1 in (("input_image0_rgb_u8", "input_image1_rgb_u8"), ("image0", "image1")):
                    if k0 in z and k1 in z:
                        pairs.append((f.stem, z[k0], z[k1]))
                        break
    if not pairs:
        raise ConfigError("no image pairs given (use --pair IMAGE0 IMAGE1 and/or --fixtures DIR)")
    return pairs


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(report, indent=1) + "\n")
    return p


def format_table(report: dict[str, Any]) -> str:
    rows = [f"{'pair':28s} {'ref':>5s} {'test':>5s} {'jacc':>6s} {'kp mean':>8s} {'kp max':>7s} {'<=1px%':>7s} "
            f"{'dconf':>7s} {'corr':>6s}  result"]

    def f(v: Any, fmt: str) -> str:
        return format(v, fmt) if v is not None else "-"

    for p in report["pairs"]:
        rows.append(f"{p['pair'][:28]:28s} {p['num_ref']:5d} {p['num_test']:5d} {p['jaccard']:6.4f} "
                    f"{f(p['kp_err_mean_px'], '8.4f')} {f(p['kp_err_max_px'], '7.3f')} "
                    f"{f(p['pct_within_1px'], '7.2f')} {f(p['conf_abs_max'], '7.4f')} {f(p['conf_corr'], '6.4f')}  "
                    + ("PASS" if p["passed"] else "FAIL: " + "; ".join(p["failures"])))
    s = report["summary"]
    rows.append(f"{s['passed_pairs']}/{s['pairs']} pairs pass -> {'PASS' if s['passed'] else 'FAIL'}")
    return "\n".join(rows)


# --- the TensorRT checklist a Jetson user runs first -----------------------------------------------------

REPORT_BACK_BEGIN = "----- matchanything TensorRT check: copy from here into the issue -----"
REPORT_BACK_END = "----- end of the TensorRT check -----"


@dataclass
class CheckStep:
    name: str
    passed: bool | None  # None: not run (an earlier step failed)
    detail: str


def platform_facts() -> dict[str, str]:
    """What identifies the machine in a report: L4T/JetPack release, Python, package version."""
    import platform

    from .. import __version__

    facts = {"machine": f"{platform.machine()} {platform.system()} {platform.release()}",
             "python": platform.python_version(), "matchanything_ros": __version__}
    try:  # Jetson Linux: "# R36 (release), REVISION: 4.3, ..." (JetPack 6.2 is L4T 36.4.3)
        facts["l4t"] = Path("/etc/nv_tegra_release").read_text().splitlines()[0].lstrip("# ").strip()
    except (OSError, IndexError):
        facts["l4t"] = "not a Jetson (no /etc/nv_tegra_release)"
    return facts


def engine_facts(backend: Any) -> dict[str, str]:
    """Per-graph sidecar facts of a TensorRT backend (typing, pinned layers, build time, profile)."""
    out = {}
    for graph in getattr(backend, "graphs", ()):
        sc = backend.sidecar(graph)
        out[f"engine {graph}"] = (f"{sc.get('precision')} {sc.get('network_typing', '?')}ly typed, "
                                  f"{sc.get('fp32_layers', '?')} fp32-pinned layers, built in "
                                  f"{sc.get('build_seconds', '?')} s with TensorRT {sc.get('tensorrt_version')}")
    return out


def format_checklist(steps: list[CheckStep], facts: dict[str, str]) -> str:
    """The block a user pastes back: every step with PASS/FAIL/not run, then the facts."""
    lines = [REPORT_BACK_BEGIN]
    for step in steps:
        mark = {True: "PASS", False: "FAIL", None: "----"}[step.passed]
        lines.append(f"[{mark}] {step.name}: {step.detail}")
    lines += [f"{k}: {v}" for k, v in facts.items()]
    lines.append("result: " + ("ALL PASS" if steps and all(s.passed for s in steps) else "FAILED"))
    lines.append(REPORT_BACK_END)
    return "\n".join(lines)


def benchmark_checklist(configs: list[dict[str, Any]], failures: Iterable[tuple[str, str]] = ()) -> str:
    """The block `benchmark --backend tensorrt` ends with: one step per configuration (backend, device,
    precision, size) that ran, with its figures, and one FAIL step per configuration that could not
    start (label, why). `configs` are core/benchmark.benchmark_config results."""
    steps = [CheckStep(f"benchmark {label}", False, why) for label, why in failures]
    for c in configs:
        st = c["stages_ms"]
        device_mb = c.get("peak_device_mb")
        steps.append(CheckStep(
            f"benchmark {c['label']}", True,
            f"canvas {c.get('canvas')}, total median {st['total']['median']:.1f} ms (p10 {st['total']['p10']:.1f}, "
            f"p90 {st['total']['p90']:.1f}); preprocess {st['preprocess']['median']:.1f} / inference "
            f"{st['inference']['median']:.1f} / postprocess {st['postprocess']['median']:.1f} ms; "
            f"{c['pairs_per_s']:.2f} pairs/s; {c['matches_median']:.0f} matches; peak device "
            + (f"{device_mb:.0f} MB" if device_mb is not None else "n/a")
            + f"; peak host RSS {c['peak_host_rss_mb']:.0f} MB ({c['runs']} runs)"))
    return format_checklist(steps, platform_facts())
