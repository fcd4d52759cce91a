"""Generate digits 0-9 from a checkpoint; save a grid and the denoising progression beside it."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout too

from diffusion101.cli import (Parser, add_common, add_sampler_flags, check_number, check_outputs,
                             check_seed, resolve_device, run_cli, sampler_options)


def main(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--ckpt", default=None, help="model checkpoint (default: model.pt if it "
                   "exists, else the checkpoint shipped with the package)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="a LoRA adapter with its strength (default 1); repeat to stack several")
    p.add_argument("--merge", action=argparse.BooleanOptionalAction, default=True,
                   help="fuse adapters into the weights (default) or add them in the forward "
                        "pass (--no-merge)")
    p.add_argument("--out", default="imgs/digits.png", help="grid PNG; the progression figure "
                   "goes beside it as <name>_progress.png")
    p.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--n-per-digit", type=int, default=1)
    p.add_argument("--npz", default=None, help="also write images (uint8 N,H,W) and labels here")
    add_sampler_flags(p)
    add_common(p)
    a = p.parse_args(argv)
    check_seed(a.seed)
    check_number("--n-per-digit", a.n_per_digit, 1, 10000, integer=True)
    device = resolve_device(a.device)
    from diffusion101.models import default_checkpoint
    from diffusion101.denoise import generate, parse_lora_specs
    from diffusion101.images import progress_path
    ckpt, loras = default_checkpoint(a.ckpt), parse_lora_specs(a.lora)
    check_outputs({"--out": a.out, "--out's progress figure": progress_path(a.out), "--npz": a.npz},
                  inputs={"--ckpt": ckpt, **{f"--lora {p}": p for p, _ in loras}})
    generate(ckpt, a.out, device, loras=loras, merge=a.merge, seed=a.seed or 0, digits=a.digits,
             n_per_digit=a.n_per_digit, npz=a.npz, sample_options=sampler_options(a),
             use_ema=False if a.no_ema else None)


if __name__ == "__main__":
    sys.exit(run_cli(main))
