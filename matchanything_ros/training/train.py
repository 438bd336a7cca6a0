"""Train the demo ELoFTR model: reduced config, synthetic homography pairs, coarse + fine losses.

Time-boxed: the loop stops itself after `time_budget` seconds of this run (or when the whole
schedule, `total_time` seconds over all runs, is done) and always saves. Checkpoints are two
files (model + history, optimizer) so each stays small, and a run resumes from them. The
learning-rate schedule follows the TOTAL training time, so split runs give the same curve.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.eloftr.config import EloftrConfig
from ..core.eloftr.model import EloftrNet
from .config import DEMO_MODEL_CONFIG, MODEL_CKPT, OPTIM_CKPT, TrainConfig, add_train_args  # noqa: F401 (re-exported)
from .images import TRAIN_IMAGES, load_packed_images, load_skimage_rgb
from .losses import coarse_loss, coarse_targets, fine_loss, fine_targets
from .plot import plot_loss_curve
from .synthesis import PairSynthesizer

def lr_at(fraction: float, base: float) -> float:
    """Linear warm-up over the first 4 %, then cosine down to 2 % of `base`."""
    warm = 0.04
    if fraction < warm:
        return base * max(fraction / warm, 0.02)
    f = min((fraction - warm) / (1 - warm), 1.0)
    return base * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * f)))


def training_forward(net: EloftrNet, image0: torch.Tensor, image1: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inference features on a batch of unpadded square pairs: (t0, t1, feat_f0, feat_f1)."""
    b = image0.shape[0]
    c, x2, x1 = net.backbone(torch.cat([image0, image1], 0))
    mask = torch.ones(b, c.shape[2], c.shape[3], dtype=torch.bool, device=c.device)  # no padding in training
    t0, t1 = net.loftr_coarse(c[:b], c[b:], mask, mask)
    ff = net.fine_preprocess(torch.cat([t0, t1], 0) / t0.shape[1] ** 0.5, x2, x1)
    return t0, t1, ff[:b], ff[b:]


def training_step(net: EloftrNet, syn: PairSynthesizer, cfg: EloftrConfig, batch: int, size: int,
                  fine_per_sample: int, amp: bool) -> tuple[torch.Tensor, dict[str, float]]:
    pairs = syn.sample(batch, size)
    dev_type = pairs.image0.device.type
    with torch.autocast(device_type=dev_type, dtype=torch.bfloat16, enabled=amp and dev_type == "cuda"):
        t0, t1, ff0, ff1 = training_forward(net, pairs.image0, pairs.image1)
    ctg = coarse_targets(pairs, cfg.coarse_stride)
    lc, stats = coarse_loss(t0.float(), t1.float(), ctg, cfg.dsmax_temperature)
    ftg = fine_targets(pairs, ctg, cfg, fine_per_sample, syn.gen)
    lf, fstats = fine_loss(ff0.float(), ff1.float(), ftg, cfg)
    stats.update(fstats)
    loss = lc + lf
    stats["loss"] = float(loss.detach())
    return loss, stats


def load_photos(data: Path | None) -> list[np.ndarray]:
    if data is not None:
        packed = load_packed_images(data)
        missing = [i.name for i in TRAIN_IMAGES if i.name not in packed]
        if missing:
            raise ValueError(f"{data} lacks training photos {missing}; regenerate it with tools/make_demo_data.py")
        return [packed[i.name] for i in TRAIN_IMAGES]
    return [load_skimage_rgb(i.name) for i in TRAIN_IMAGES]


def save_checkpoint(out_dir: Path, net: EloftrNet, opt: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_m, tmp_o = out_dir / (MODEL_CKPT + ".tmp"), out_dir / (OPTIM_CKPT + ".tmp")
    torch.save({"model": net.state_dict(), **meta}, tmp_m)
    torch.save({"optimizer": opt.state_dict()}, tmp_o)
    tmp_m.replace(out_dir / MODEL_CKPT)  # replace only after both are written: a kill never leaves half
    tmp_o.replace(out_dir / OPTIM_CKPT)


def export_demo_model(state_dict: dict[str, torch.Tensor], model_cfg: dict[str, Any], out_dir: Path,
                      extra: dict[str, Any]) -> tuple[Path, Path]:
    """Write `demo_eloftr.safetensors` (float32, checkpoint key names) + `demo_eloftr.json` (EloftrConfig)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    weights = out_dir / "demo_eloftr.safetensors"
    save_file(tensors, str(weights), metadata={"format": "pt", "model": "matchanything_ros demo ELoFTR"})
    cfg = EloftrConfig.from_dict({**model_cfg, "extra": extra})
    config = out_dir / "demo_eloftr.json"
    config.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return weights, config


def train(tc: TrainConfig) -> dict[str, Any]:
    device = torch.device(tc.device if (tc.device != "cuda" or torch.cuda.is_available()) else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(tc.seed)
    cfg = EloftrConfig.from_dict(dict(tc.model))
    net = EloftrNet(cfg).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    step, elapsed, history, runs = 0, 0.0, [], 0
    if tc.resume is not None:
        ck = torch.load(tc.resume / MODEL_CKPT, map_location=device, weights_only=True)
        net.load_state_dict(ck["model"])
        step, elapsed, history, runs = int(ck["step"]), float(ck["elapsed"]), list(ck["history"]), int(ck["runs"])
        optim_path = tc.resume / OPTIM_CKPT
        if optim_path.exists():
            opt.load_state_dict(torch.load(optim_path, map_location=device, weights_only=True)["optimizer"])
        print(f"resumed at step {step}, {elapsed:.0f} s trained", flush=True)
    runs += 1
    # a different seed per run, so a resumed run does not replay the first run's pairs
    syn = PairSynthesizer(load_photos(tc.data), device, seed=tc.seed + 1000 * runs)
    rng = np.random.default_rng(tc.seed + runs)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"device {device}, {n_params} parameters, config {json.dumps(cfg.to_dict())}", flush=True)

    def meta() -> dict[str, Any]:
        return {"step": step, "elapsed": elapsed, "history": history, "runs": runs,
                "model_config": json.loads(json.dumps(cfg.to_dict())), "n_params": n_params}

    run_start = time.monotonic()
    last_ckpt = run_start
    window: list[dict[str, float]] = []
    while True:
        run_time = time.monotonic() - run_start
        if run_time >= tc.time_budget or elapsed >= tc.total_time or (tc.max_steps and step >= tc.max_steps):
            break
        t_step = time.monotonic()
        size = int(rng.choice(tc.sizes))
        batch = max(2, int(round(tc.batch * (320 / size) ** 2)))
        lr = lr_at(elapsed / tc.total_time, tc.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        loss, stats = training_step(net, syn, cfg, batch, size, tc.fine_per_sample, tc.amp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        if torch.isfinite(gnorm):
            opt.step()
        step += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed += time.monotonic() - t_step
        stats.update(lr=lr, size=size, batch=batch)
        window.append(stats)
        if step % tc.log_every == 0:
            avg = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
            avg.update(step=step, elapsed=elapsed)
            history.append(avg)
            window = []
            print(f"step {step:5d} t {elapsed:6.0f}s lr {lr:.2e} loss {avg['loss']:.3f} coarse_acc "
                  f"{avg['coarse_acc']:.3f} fine_acc {avg['fine_acc']:.3f} fine_err {avg['fine_err_px']:.2f}px",
                  flush=True)
        if time.monotonic() - last_ckpt >= tc.checkpoint_every:
            save_checkpoint(tc.out_dir, net, opt, meta())
            last_ckpt = time.monotonic()
    save_checkpoint(tc.out_dir, net, opt, meta())
    if history:
        try:
            plot_loss_curve(history, tc.out_dir / "loss_curve.png")
        except ImportError:  # the GPU machine may lack OpenCV; plot later with `train-demo --export-only`
            print("OpenCV missing: loss curve not drawn", flush=True)
    print(f"saved {tc.out_dir / MODEL_CKPT} at step {step} ({elapsed:.0f} s trained)", flush=True)
    return meta()


def run_from_args(args: Any) -> int:
    if args.export_only:
        if args.resume is None:
            raise ValueError("--export-only needs --resume FOLDER")
        ck = torch.load(args.resume / MODEL_CKPT, map_location="cpu", weights_only=True)
        meta = {k: v for k, v in ck.items() if k != "model"}
        state = ck["model"]
        plot_loss_curve(list(meta["history"]), args.out_dir / "loss_curve.png")
    else:
        for s in args.sizes:
            if s % 32:
                raise ValueError(f"crop size {s} is not a multiple of 32")
        tc = TrainConfig(out_dir=args.out_dir, data=args.data, resume=args.resume, device=args.train_device,
                         time_budget=args.time_budget, total_time=args.total_time, max_steps=args.max_steps,
                         batch=args.batch, sizes=tuple(args.sizes), lr=args.lr,
                         checkpoint_every=args.checkpoint_every, log_every=args.log_every, seed=args.seed)
        meta = train(tc)
        state = torch.load(args.out_dir / MODEL_CKPT, map_location="cpu", weights_only=True)["model"]
    if args.export_dir is not None:
        model_cfg = {k: v for k, v in dict(meta["model_config"]).items() if k != "extra"}
        extra = {"demo_model": True, "not_matchanything_weights": True, "train_steps": int(meta["step"]),
                 "train_seconds": round(float(meta["elapsed"]), 1), "train_runs": int(meta["runs"])}
        w, c = export_demo_model(state, model_cfg, args.export_dir, extra)
        print(f"exported {w} ({w.stat().st_size / 1e6:.1f} MB) and {c}")
    return 0
