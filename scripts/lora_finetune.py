"""Fine-tune LoRA adapters on the cross-attention Q/K/V of a trained model; save only them."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout too

from diffusion101.cli import (Parser, add_common, check_outputs, check_seed, lock_output,
                             resolve_device, run_cli)


def main(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--base", default="model.pt", help="the trained model (default: model.pt)")
    p.add_argument("--out", default="lora.pt", help="adapter path (default: lora.pt)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--r", type=int, help="LoRA rank (default: the checkpoint's config, 8)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default: the checkpoint's config, 1)")
    p.add_argument("--lr", type=float, help="learning rate (default: the checkpoint's lora.lr)")
    p.add_argument("--data", default="mnist",
                   help="'mnist', or an ImageFolder with sub-folders 0-9 (any size or mode)")
    p.add_argument("--targets", default=None,
                   help="comma-separated Linear layer names to adapt (default: w_q,w_k,w_v); "
                        "e.g. w_q,w_k,w_v,z_linear,feedforward.0,feedforward.2,time_emb_linear")
    p.add_argument("--full", action="store_true",
                   help="fine-tune every weight instead (for comparison); --out is then a model")
    add_common(p)
    a = p.parse_args(argv)
    check_seed(a.seed)
    device = resolve_device(a.device)
    check_outputs({"--out": a.out}, inputs={"--base": a.base,
                                            "--data": None if a.data == "mnist" else a.data})
    lock_output(a.out)
    from diffusion101.lora_finetune import finetune
    targets = [t for t in a.targets.split(",") if t] if a.targets else None
    finetune(a.base, a.out, device, lora={"r": a.r, "alpha": a.alpha, "epochs": a.epochs,
                                          "max_steps": a.max_steps, "lr": a.lr, "targets": targets},
             seed=a.seed or 0, data=a.data, full=a.full)


if __name__ == "__main__":
    sys.exit(run_cli(main))
