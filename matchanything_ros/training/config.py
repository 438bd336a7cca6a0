"""Settings of the demo-model training (no torch import: the CLI builds its parser from here)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The demo model: the same ELoFTR code at about 1/8 of the released model's parameters.
DEMO_MODEL_CONFIG: dict[str, Any] = {
    "block_dims": (32, 64, 128),
    "layer_depths": (1, 2, 6),
    "d_model": 128,
    "nhead": 4,
    "layer_names": ("self", "cross") * 2,
    "fine_d_model": 32,
}

MODEL_CKPT = "ckpt_model.pt"
OPTIM_CKPT = "ckpt_optim.pt"


@dataclass
class TrainConfig:
    out_dir: Path
    data: Path | None = None  # packed photos (.npz); None = load them from scikit-image
    resume: Path | None = None  # folder holding ckpt_model.pt (+ ckpt_optim.pt)
    device: str = "cuda"
    time_budget: float = 480.0  # seconds of training in THIS run
    total_time: float = 960.0  # seconds of training over all runs (LR schedule length)
    max_steps: int = 0  # 0 = no step limit
    batch: int = 24  # pairs per step at the reference size 320
    sizes: tuple[int, ...] = (256, 320, 384)  # square crop sides (multiples of 32), one per step
    lr: float = 2e-3
    weight_decay: float = 0.01
    fine_per_sample: int = 64
    checkpoint_every: float = 120.0
    log_every: int = 20
    seed: int = 0
    amp: bool = True  # bf16 autocast on CUDA
    model: dict[str, Any] = field(default_factory=lambda: dict(DEMO_MODEL_CONFIG))



def add_train_args(parser: Any) -> None:
    """`matchanything train-demo` / `python -m matchanything_ros.training` flags."""
    d = TrainConfig(out_dir=Path("."))
    parser.add_argument("--out-dir", type=Path, required=True, help="checkpoints, loss curve, exported model")
    parser.add_argument("--data", type=Path, default=None,
                        help="packed training photos (.npz from tools/make_demo_data.py --train-pack); "
                        "default: load them from scikit-image")
    parser.add_argument("--resume", type=Path, default=None, help="folder with ckpt_model.pt (+ ckpt_optim.pt)")
    parser.add_argument("--train-device", default=d.device, help="torch device for training (cuda falls back to cpu)")
    parser.add_argument("--time-budget", type=float, default=d.time_budget, help="seconds of training in this run")
    parser.add_argument("--total-time", type=float, default=d.total_time,
                        help="seconds of training over all runs (length of the LR schedule)")
    parser.add_argument("--max-steps", type=int, default=0, help="stop after this many steps in total (0 = no limit)")
    parser.add_argument("--batch", type=int, default=d.batch, help="pairs per step at crop size 320")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(d.sizes),
                        help="square crop sides, multiples of 32")
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--checkpoint-every", type=float, default=d.checkpoint_every, help="seconds")
    parser.add_argument("--log-every", type=int, default=d.log_every, help="steps")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--export-dir", type=Path, default=None,
                        help="after training, write demo_eloftr.safetensors + demo_eloftr.json here")
    parser.add_argument("--export-only", action="store_true",
                        help="no training: export (and plot) the checkpoint given by --resume")


