"""Score a checkpoint (or an npz of samples): conditional accuracy and FID in the shipped MNIST
classifier's feature space, with the real-data floor beside it.

  python scripts/evaluate.py --ckpt model.pt --n 10000 --json results.json
  python scripts/evaluate.py --npz samples.npz
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout too

from diffusion101.cli import (Parser, add_common, add_sampler_flags, check_number, check_outputs,
                             check_seed, resolve_device, run_cli, sampler_options)


def main(argv=None):
    p = Parser(description=__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", default=None, help="model checkpoint (default: model.pt, else the shipped one)")
    src.add_argument("--npz", default=None, help="score these samples instead of generating")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="LoRA adapter(s) to merge into the model first")
    p.add_argument("--n", type=int, default=10000, help="digits to generate, in the test set's digit proportions")
    p.add_argument("--batch-size", type=int, default=0,
                   help="digits sampled at once (default: 100 on CPU, 1000 on CUDA)")
    add_sampler_flags(p)
    p.add_argument("--json", default=None, help="also write the numbers here")
    add_common(p)
    a = p.parse_args(argv)
    from diffusion101 import evaluate
    from diffusion101.files import atomic_write
    from diffusion101.models import default_checkpoint
    from diffusion101.denoise import load_for_sampling, parse_lora_specs, resolve_sampler
    check_seed(a.seed)
    check_number("--n", a.n, 10, 1_000_000, integer=True)
    check_number("--batch-size", a.batch_size, 0, 100_000, integer=True)
    loras = parse_lora_specs(a.lora)
    ckpt = None if a.npz else default_checkpoint(a.ckpt)
    check_outputs({"--json": a.json}, inputs={"--ckpt": ckpt, "--npz": a.npz,
                                              **{f"--lora {p}": p for p, _ in loras}})
    if a.npz:
        metrics = evaluate.evaluate_npz(a.npz)
    else:
        device = resolve_device(a.device)
        model, cfg = load_for_sampling(ckpt, device, loras, False if a.no_ema else None)
        sc = resolve_sampler(cfg, **sampler_options(a))
        metrics = evaluate.evaluate_model(model, cfg, a.n, device, a.seed or 0, sc, a.batch_size)
        metrics["ckpt"], metrics["lora"] = str(ckpt), a.lora  # (the shipped one is a Path)
    print(evaluate.format_report(metrics))
    if a.json:
        text = json.dumps(metrics, indent=2).encode()
        atomic_write(a.json, lambda f: f.write(text))


if __name__ == "__main__":
    sys.exit(run_cli(main))
