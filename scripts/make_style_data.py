"""Write the built-in LoRA style target, bold MNIST (strokes dilated by a 3x3 max filter), as
a torchvision ImageFolder (DIR/0 .. DIR/9), the same kind of folder a user brings.

  python scripts/make_style_data.py --out data/bold --n 6000
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout too

from diffusion101.cli import Parser, run_cli


def main(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--out", required=True, help="folder to create (must not exist)")
    p.add_argument("--n", type=int, default=6000, help="how many training digits to transform")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    import torch

    from diffusion101.config import UserError
    from diffusion101.dataset import MNISTData, bold, load_mnist, write_image_folder
    out = Path(a.out)
    if out.exists():
        raise UserError(f"{out} exists; choose a new folder")
    if not 10 <= a.n <= 60000:
        raise UserError("--n must be in 10..60000")
    train = load_mnist(train=True, img_size=28)
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(a.seed))[: a.n]
    write_image_folder(MNISTData(bold(train.images[idx]), train.labels[idx]), out)
    print(f"wrote {a.n} bold digits to {out}/0..9")


if __name__ == "__main__":
    sys.exit(run_cli(main))
