"""How far the parity quantities move with the CPU's kernel paths: the measurement behind test/parity_rules.py.

Runs the reference pairs (ELoFTR: all three; RoMa: the pairs stored at full resolution) once per CPU
configuration, each in its OWN subprocess (the capabilities are read once at start-up, and calling
torch.set_num_threads in-process corrupts MKL's batched linalg.inv in torch 2.13), then tabulates, per
quantity, the largest deviation from the fixtures under each configuration and the largest spread
between configurations, and the near-ties each configuration needed (parity_rules' definitions).

    python tools/measure_cpu_spread.py                      # every configuration, both variants
    python tools/measure_cpu_spread.py --variants eloftr --configs native-2t default-1t
    python tools/measure_cpu_spread.py --keep /tmp/spread --markdown /tmp/spread.md   # keep results, write the table
    python tools/measure_cpu_spread.py --tabulate /tmp/spread     # tabulate kept results again

Takes ~3 min per configuration on 2 cores (RoMa's two forwards dominate).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TEST_DIR = REPO / "test"

# name -> environment. The capped ones are what CI's second parity pass uses (docs/parity.md); the value
# names are the libraries' own: ATen (default|avx2|avx512), oneDNN's max ISA, MKL's instruction set.
CONFIGS: dict[str, dict[str, str]] = {
    "native-2t": {"OMP_NUM_THREADS": "2"},
    "native-1t": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    "avx512-2t": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
                  "MKL_ENABLE_INSTRUCTIONS": "AVX512", "OMP_NUM_THREADS": "2"},
    "avx2-2t": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                "OMP_NUM_THREADS": "2"},
    "default-2t": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                   "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "OMP_NUM_THREADS": "2"},
    "default-1t": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                   "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
}

# quantity -> (unit, what the deviation is)
QUANTITIES: dict[str, tuple[str, str]] = {
    "eloftr.features": ("rel. to max", "transformer outputs (8 channels + channel means)"),
    "eloftr.conf": ("rel. per element", "dual-softmax confidence: row/column maxima and 8 full rows"),
    "eloftr.conf_of_max": ("rel. to max", "the same, error relative to the largest confidence of each tensor"),
    "eloftr.conf_argmax_flips": ("rows", "row argmax of the confidence differing from the fixture's"),
    "eloftr.coarse_list_diff": ("matches", "coarse (i, j) list at threshold 0.001: matches in one list only"),
    "eloftr.coarse_mconf": ("rel. per element", "coarse match confidences (common matches)"),
    "eloftr.coarse_mconf_abs": ("abs", "the same, absolute"),
    "eloftr.coarse_mconf_of_max": ("rel. to max", "the same, relative to the largest match confidence"),
    "eloftr.fine_kpts": ("px", "fine keypoints (canvas), common matches, argmax flips excluded"),
    "eloftr.fine_argmax_flips": ("matches", "fine-level argmax differing from the fixture's"),
    "eloftr.final_kpts": ("px", "final keypoints (original image), common matches, flips excluded"),
    "eloftr.final_conf": ("rel. per element", "final confidences (common matches)"),
    "roma.features": ("rel. to max", "DINOv2 stride-16 features"),
    "roma.gp_posterior": ("rel. to max", "GP posterior (fp32 1600x1600-class inverse)"),
    "roma.anchor_flips": ("cells", "anchor classification argmax differing from the fixture's"),
    "roma.flows": ("normalised", "flows of every scale of both passes"),
    "roma.certainty_logits": ("logit", "certainty logits of every scale"),
    "roma.final_warp": ("normalised", "final warp (both directions)"),
    "roma.final_certainty": ("abs", "final certainty (sigmoid)"),
    "roma.replayed_kpts": ("px", "sampled matches replayed with the fixture's stored draws"),
    "roma.redraw_stage1_diff": ("draws", "seeded sampler on the fixture's dense output: stage-1 draws not in the "
                                         "stored set"),
    "roma.redraw_stage2_diff": ("draws", "same, stage-2 draws not in the stored set"),
    "roma.kde_density": ("rel. per element", "KDE density of the stage-1 draws"),
}


# --- worker (one configuration, in its own process) ------------------------------------------------------------

def _rel_to_max(a: Any, e: Any) -> float:
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    return float(np.abs(a - e).max() / max(np.abs(e).max(), 1e-30))


def _rel_each(a: Any, e: Any) -> float:
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    return float((np.abs(a - e) / np.maximum(np.abs(e), np.finfo(np.float32).tiny)).max()) if a.size else 0.0


def _worker_eloftr(out: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    import torch

    import parity_rules as pr
    from matchanything_ros.core.eloftr.graphs import (EloftrFine, dual_softmax_confidence, fine_similarities,
                                                      gather_windows)
    from matchanything_ros.core.eloftr.pipeline import EloftrPipeline
    from matchanything_ros.core.eloftr.postprocess import select_coarse_matches
    from reference import REFERENCE_ROOT, seeded_weights_module

    ref_dir = REFERENCE_ROOT / "eloftr"
    index = json.loads((ref_dir / "index.json").read_text())
    state = seeded_weights_module(REFERENCE_ROOT).seeded_state_dict(ref_dir / "manifest.json", index["seed"])
    net = EloftrPipeline({"threshold": index["threshold"]}).build_net(
        {k.removeprefix("matcher."): v for k, v in state.items()})
    w, h = index["force_resize_wh"]
    for pair in sorted(index["pairs"]):
        ref = dict(np.load(ref_dir / index["pairs"][pair]["file"]))
        pipe = EloftrPipeline({"threshold": index["threshold"], "preset": "hf_space", "force_resize_width": w,
                               "force_resize_height": h})
        inputs, meta = pipe.preprocess(ref["input_image0_rgb_u8"], ref["input_image1_rgb_u8"])
        t = {k: torch.from_numpy(v) for k, v in inputs.items()}
        with torch.inference_mode():
            f = net.features(t["image0"], t["image1"], t["mask0"], t["mask1"])
            conf = dual_softmax_confidence(f["transformer0"], f["transformer1"], t["mask0"], t["mask1"],
                                           net.cfg.dsmax_temperature)[0]
        r: dict[str, Any] = {}
        r["eloftr.features"] = max(
            max(_rel_to_max(f[f"transformer{k}"][:, :8], ref[f"transformer_out{k}_ch0to8"]),
                _rel_to_max(f[f"transformer{k}"].mean((2, 3)), ref[f"transformer_out{k}_chmean"])) for k in (0, 1))
        informative = ref["conf_row_max"] > 0
        r["eloftr.conf"] = max(_rel_each(conf.max(1).values[informative], ref["conf_row_max"][informative]),
                               _rel_each(conf.max(0).values[ref["conf_col_max"] > 0],
                                         ref["conf_col_max"][ref["conf_col_max"] > 0]),
                               _rel_each(conf[torch.from_numpy(ref["conf_rows_idx"])], ref["conf_rows"]))
        r["eloftr.conf_of_max"] = max(_rel_to_max(conf.max(1).values, ref["conf_row_max"]),
                                      _rel_to_max(conf.max(0).values, ref["conf_col_max"]),
                                      _rel_to_max(conf[torch.from_numpy(ref["conf_rows_idx"])], ref["conf_rows"]))
        flips = np.nonzero(conf.argmax(1).numpy()[informative] != ref["conf_row_argmax"][informative])[0]
        r["eloftr.conf_argmax_flips"] = int(flips.size)
        margins = pr.relative_margin(conf.numpy()[informative][flips]) if flips.size else np.zeros(0)
        r["eloftr.conf_argmax_flip_margin_max"] = float(margins.max()) if flips.size else None
        conf_np = conf.numpy()
        cm = select_coarse_matches({"conf": conf_np[None]}, meta.mask0, meta.mask1, pipe.threshold,
                                   pipe.model_config.border_rm)
        ri, gi, only_ref, only_got = pr.match_list_diff(ref["coarse_i_ids"], ref["coarse_j_ids"], cm.i_ids, cm.j_ids)
        r["eloftr.coarse_list_diff"] = len(only_ref) + len(only_got)
        r["eloftr.coarse_list_diff_all_ties"] = all(bool(pr.is_threshold_tie(conf_np[i, j], pipe.threshold))
                                                    for i, j in only_ref + only_got)
        r["eloftr.coarse_mconf"] = _rel_each(cm.mconf[gi], ref["coarse_mconf"][ri])
        r["eloftr.coarse_mconf_abs"] = float(np.abs(cm.mconf[gi] - ref["coarse_mconf"][ri]).max())
        r["eloftr.coarse_mconf_of_max"] = _rel_to_max(cm.mconf[gi], ref["coarse_mconf"][ri])
        i_ids, j_ids = torch.from_numpy(cm.i_ids), torch.from_numpy(cm.j_ids)
        with torch.inference_mode():
            k0, k1 = EloftrFine(pipe.model_config)(f["feat_f0"], f["feat_f1"], i_ids, j_ids)
            stride, win = pipe.model_config.coarse_stride, pipe.model_config.fine_window_size
            p, _ = fine_similarities(gather_windows(f["feat_f0"], i_ids, win, 0, stride),
                                     gather_windows(f["feat_f1"], j_ids, win, 1, stride), pipe.model_config)
        k0, k1 = k0.numpy()[gi], k1.numpy()[gi]
        err = np.maximum(np.abs(k0 - ref["model_mkpts0_f"][ri]).max(1), np.abs(k1 - ref["model_mkpts1_f"][ri]).max(1))
        flipped = err > 0.5  # the argmax moved a keypoint by a whole pixel
        margin = pr.relative_margin(p.reshape(p.shape[0], -1).numpy()[gi])
        r["eloftr.fine_argmax_flips"] = int(flipped.sum())
        r["eloftr.fine_argmax_flip_margin_max"] = float(margin[flipped].max()) if flipped.any() else None
        r["eloftr.fine_kpts"] = float(err[~flipped].max()) if (~flipped).any() else 0.0
        result = pipe.postprocess({"mkpts0_c": k0, "mkpts1_c": k1, "mconf": cm.mconf[gi]}, meta)
        ferr = np.maximum(np.abs(result.keypoints0 - ref["keypoints0"][ri]).max(1),
                          np.abs(result.keypoints1 - ref["keypoints1"][ri]).max(1))
        r["eloftr.final_kpts"] = float(ferr[~flipped].max()) if (~flipped).any() else 0.0
        r["eloftr.final_conf"] = _rel_each(result.confidence, ref["confidence"][ri])
        # near-ties of this run under the rules, and the tightest margins there are (how close the fixtures come)
        r["eloftr.min_threshold_margin_rel"] = float(np.min(np.abs(cm.mconf / pipe.threshold - 1))) \
            if cm.mconf.size else None
        r["eloftr.min_fine_margin_rel"] = float(margin.min()) if margin.size else None
        out[f"eloftr/{pair}"] = r
        arrays[f"eloftr/{pair}/conf_row_max"] = conf.max(1).values.numpy()
        arrays[f"eloftr/{pair}/keypoints0"] = result.keypoints0
        arrays[f"eloftr/{pair}/keypoints1"] = result.keypoints1
        arrays[f"eloftr/{pair}/confidence"] = result.confidence


def _worker_roma(out: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    import re

    import torch

    import parity_rules as pr
    import roma_util as ru
    from matchanything_ros.core.roma.sampling import balanced_sample, seeded_generator, to_pixels, valid_mask

    for param in ru.pair_params(only_full_res=True, mark_slow=False):
        name = param.values[0]
        z, fw = ru.npz(name), ru.forward(name)
        r: dict[str, Any] = {}
        key = next(k for k in z if k.startswith("dino_feat16_ch_every"))
        every = int(re.search(r"every(\d+)$", key).group(1))  # type: ignore[union-attr]
        r["roma.features"] = _rel_to_max(fw["dino_feat16"][:, ::every], z[key])
        key = next(k for k in z if k.startswith("gp_posterior16_ch_every"))
        every = int(re.search(r"every(\d+)$", key).group(1))  # type: ignore[union-attr]
        r["roma.gp_posterior"] = _rel_to_max(fw["gp_posterior16"][:, ::every], z[key])
        cls = fw["pass1_s16_gm_cls"]
        flips = cls.argmax(axis=1) != z["pass1_s16_gm_cls_argmax"]
        margin = pr.absolute_margin(cls, axis=1)
        r["roma.anchor_flips"] = int(flips.sum())
        r["roma.anchor_flip_margin_max"] = float(margin[flips].max()) if flips.any() else None
        r["roma.min_anchor_margin"] = float(margin.min())
        flows = [k for k in z if re.fullmatch(r"pass\d_s\d+_flow", k)]
        certs = [k for k in z if re.fullmatch(r"pass\d_s\d+_certainty", k)]
        r["roma.flows"] = max(float(np.abs(ru.subsample(name, k, fw[k]) - z[k]).max()) for k in flows)
        r["roma.certainty_logits"] = max(float(np.abs(ru.subsample(name, k, fw[k]) - z[k]).max()) for k in certs)
        warp, cert = fw["warp"], fw["certainty"]
        fix_warp, fix_cert = ru.stored_dense(name)
        r["roma.final_warp"] = float(np.abs(warp - fix_warp).max())
        r["roma.final_certainty"] = float(np.abs(cert - fix_cert).max())
        # replay the official draws on our dense output
        c = cert.reshape(-1).copy()
        c[c > 0.05] = 1
        s1, s2 = z["sample_stage1_idx"], z["sample_stage2_idx"]
        m, cc = warp.reshape(-1, 4)[s1][s2], c[s1][s2]
        h0, w0 = z["img0_uint8"].shape[:2]
        h1, w1 = z["img1_uint8"].shape[:2]
        k0, k1 = to_pixels(m, (w0, h0), (w1, h1))
        keep = valid_mask(k0, k1, cc, (w0, h0), (w1, h1))
        r["roma.replayed_count_diff"] = int(abs(int(keep.sum()) - len(z["mkpts0_f"])))
        if keep.sum() == len(z["mkpts0_f"]):
            r["roma.replayed_kpts"] = float(max(np.abs(k0[keep] - z["mkpts0_f"]).max(),
                                                np.abs(k1[keep] - z["mkpts1_f"]).max()))
        # the seeded sampler re-drawn on the fixture's own dense output (no forward involved)
        sw, sc = ru.stored_dense(name)
        s = balanced_sample(torch.from_numpy(sw), torch.from_numpy(sc), len(s2),
                            seeded_generator(int(z["sample_seed"])))
        assert s.stage1_index is not None and s.stage2_index is not None and s.density is not None
        r["roma.redraw_stage1_diff"] = int(np.setdiff1d(s1, s.stage1_index).size)
        r["roma.redraw_stage1_same_order"] = bool(np.array_equal(s1, s.stage1_index))
        r["roma.redraw_stage2_diff"] = int(np.setdiff1d(s2, s.stage2_index).size)
        if np.array_equal(s1, s.stage1_index):
            r["roma.kde_density"] = _rel_each(s.density, z["kde_density"])
        out[f"roma/{name}"] = r
        arrays[f"roma/{name}/warp"] = warp
        arrays[f"roma/{name}/certainty"] = cert
        arrays[f"roma/{name}/density"] = s.density


def _probe_isa() -> dict[str, Any]:
    """Which instruction sets the three libraries actually run (their own verbose reports)."""
    import torch

    info: dict[str, Any] = {"aten": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    code = ("import torch\nx = torch.randn(256, 256)\nx @ x\n"  # a conv large enough to go to oneDNN
            "torch.nn.functional.conv2d(torch.randn(1, 64, 64, 64), torch.randn(64, 64, 3, 3))\n")
    env = dict(os.environ, MKL_VERBOSE="1", ONEDNN_VERBOSE="1")
    text = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout
    for line in text.splitlines():
        if line.startswith("MKL_VERBOSE oneMKL") and " architecture " in line:
            info["mkl"] = line.split(" architecture ", 1)[1].split(", Lnx")[0].strip()
        if line.startswith("onednn_verbose") and ",cpu,isa:" in line:
            info["onednn"] = line.split("isa:", 1)[1].strip()
    return info


def worker(variants: list[str], out_json: Path, out_npz: Path) -> None:
    sys.path.insert(0, str(TEST_DIR))
    sys.path.insert(0, str(REPO))
    out: dict[str, Any] = {"isa": _probe_isa()}
    arrays: dict[str, np.ndarray] = {}
    if "eloftr" in variants:
        _worker_eloftr(out, arrays)
    if "roma" in variants:
        _worker_roma(out, arrays)
    out_json.write_text(json.dumps(out, indent=1))
    np.savez(out_npz, **arrays)  # type: ignore[arg-type]


# --- driver -------------------------------------------------------------------------------------------------

def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{v:.1e}" if v else "0"


def table(results: dict[str, dict[str, Any]], spread: dict[str, float]) -> str:
    names = list(results)
    lines = ["| quantity | unit | " + " | ".join(names) + " | spread between configs |",
             "| --- | --- |" + " --- |" * (len(names) + 1)]
    for q, (unit, _) in QUANTITIES.items():
        cells = []
        for n in names:
            vals = [r[q] for k, r in results[n].items() if k != "isa" and q in r and r[q] is not None]
            cells.append(_fmt(max(vals)) if vals else "-")
        lines.append(f"| {q} | {unit} | " + " | ".join(cells) + f" | {_fmt(spread.get(q))} |")
    lines.append("| ATen / oneDNN / MKL | | " + " | ".join(_isa_short(results[n]["isa"]) for n in names) + " | |")
    return "\n".join(lines)


def _isa_short(isa: dict[str, Any]) -> str:
    """'AVX512 / AVX10.1+AMX / AVX-512+AMX' from the libraries' own (long) reports."""
    import re

    onednn = isa.get("onednn", "?").replace("Intel ", "").split(" with")[0].replace(" and ", "+")
    found = re.search(r"\(Intel\(R\) ([^)]+)\)", isa.get("mkl", ""))
    mkl = (found.group(1) if found else "?") + ("+AMX" if "AMX" in isa.get("mkl", "") else "")
    return f"{isa.get('aten')} / {onednn} / {mkl}"


def near_tie_table(results: dict[str, dict[str, Any]]) -> str:
    keys = ("eloftr.coarse_list_diff", "eloftr.conf_argmax_flips", "eloftr.fine_argmax_flips", "roma.anchor_flips",
            "roma.redraw_stage1_diff", "roma.redraw_stage2_diff")
    pairs = sorted({k for r in results.values() for k in r if k != "isa"})
    lines = ["| pair | " + " | ".join(results) + " |", "| --- |" + " --- |" * len(results)]
    for p in pairs:
        cells = []
        for n, r in results.items():
            if p not in r:
                cells.append("-")
                continue
            cells.append(", ".join(f"{k.split('.', 1)[1]} {r[p][k]}" for k in keys if r[p].get(k)) or "none")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cross_spread(npz_files: dict[str, Path]) -> dict[str, float]:
    loaded = {n: dict(np.load(p)) for n, p in npz_files.items()}
    names = list(loaded)
    spread: dict[str, float] = {}
    for a_i, a in enumerate(names):
        for b in names[a_i + 1:]:
            for key in loaded[a]:
                if key not in loaded[b] or loaded[a][key].shape != loaded[b][key].shape:
                    continue
                x, y = loaded[a][key].astype(np.float64), loaded[b][key].astype(np.float64)
                leaf = key.rsplit("/", 1)[1]
                if leaf == "conf_row_max":
                    q, v = "eloftr.conf", _rel_each(x[y > 0], y[y > 0])
                elif leaf.startswith("keypoints"):
                    q, v = "eloftr.final_kpts", float(np.abs(x - y).max()) if x.size else 0.0
                elif leaf == "confidence":
                    q, v = "eloftr.final_conf", _rel_each(x, y)
                elif leaf == "warp":
                    q, v = "roma.final_warp", float(np.abs(x - y).max())
                elif leaf == "certainty":
                    q, v = "roma.final_certainty", float(np.abs(x - y).max())
                elif leaf == "density":
                    q, v = "roma.kde_density", _rel_each(x, y)
                else:
                    continue
                spread[q] = max(spread.get(q, 0.0), v)
    return spread


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--variants", nargs="+", default=["eloftr", "roma"], choices=["eloftr", "roma"])
    ap.add_argument("--markdown", type=Path, help="write the tables to this file too")
    ap.add_argument("--keep", type=Path, help="keep each configuration's results (json + npz) in this folder")
    ap.add_argument("--tabulate", type=Path, help="only tabulate the results kept earlier in this folder (--keep)")
    ap.add_argument("--worker", nargs=2, type=Path, metavar=("JSON", "NPZ"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.variants, *args.worker)
        return 0
    work = args.tabulate or args.keep or Path(tempfile.mkdtemp(prefix="cpu_spread_"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    npz_files: dict[str, Path] = {}
    for name in args.configs:
        out_json, out_npz = work / f"{name}.json", work / f"{name}.npz"
        if args.tabulate:
            results[name], npz_files[name] = json.loads(out_json.read_text()), out_npz
            continue
        env = {k: v for k, v in os.environ.items()
               if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS",
                            "MKL_NUM_THREADS")}
        env.update(CONFIGS[name])
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TEST_DIR), env.get("PYTHONPATH", "")])
        print(f"[{name}] {' '.join(f'{k}={v}' for k, v in CONFIGS[name].items())}", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--worker", str(out_json), str(out_npz), "--variants",
                               *args.variants], env=env)
        if proc.returncode != 0:
            print(f"[{name}] failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        results[name] = json.loads(out_json.read_text())
        npz_files[name] = out_npz
    text = ("Largest deviation from the fixtures per configuration (max over pairs):\n\n"
            + table(results, cross_spread(npz_files))
            + "\n\nDecisions that differ from the fixtures' (each one a near-tie under test/parity_rules.py):\n\n"
            + near_tie_table(results) + "\n")
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    print(f"raw results: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
