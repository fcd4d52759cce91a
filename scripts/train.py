"""Train the class-conditioned DDPM.  python scripts/train.py --preset small --epochs 1"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout too

from diffusion101.cli import (Parser, add_common, add_config_flags, build_config, check_outputs,
                             check_seed, lock_output, resolve_device, run_cli)


def main(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--preset", default=None,
                   help="reference, cpu, small or tiny (default: reference; with --resume, the "
                        "checkpoint's own)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int, help="stop (and save) after this many steps")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--save-every", type=int, help="also save every N steps (default: per epoch)")
    p.add_argument("--out", default="model.pt", help="checkpoint path (default: model.pt)")
    p.add_argument("--logdir", default=None, help="TensorBoard folder (default: runs/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--eval-every-steps", type=int,
                   help="log conditional accuracy and FID to TensorBoard every N steps")
    add_common(p)
    add_config_flags(p)
    a = p.parse_args(argv)
    check_seed(a.seed)
    base = preset = None
    if a.resume and a.preset is None:  # continue with the run's own configuration
        from diffusion101 import checkpoint
        saved = checkpoint.load_model_checkpoint(a.out)
        base, preset = checkpoint.config_of(saved), saved.get("preset", "reference")
    preset = preset or a.preset or "reference"
    cfg = build_config(preset, a.set, {
        "train.epochs": a.epochs, "train.max_steps": a.max_steps, "train.batch_size": a.batch_size,
        "train.lr": a.lr, "train.save_every": a.save_every, "train.seed": a.seed,
        "train.eval_every_steps": a.eval_every_steps}, base=base)
    device = resolve_device(a.device)
    logdir = a.logdir or f"runs/{preset}"
    check_outputs({"--out": a.out}, folders={"--logdir": logdir})
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone writes
        lock_output(a.out)  # one run per checkpoint file, for the whole run
    from diffusion101.train import train
    train(cfg, preset, a.out, logdir, device, resume=a.resume)


if __name__ == "__main__":
    sys.exit(run_cli(main))
