"""Write the built-in LoRA style target, bold MNIST (strokes dilated by a 3x3 max filter), as
a torchvision ImageFolder (DIR/0 .. DIR/9), the same kind of folder a user brings.

  python scripts/make_style_data.py --out data/bold --n 6000
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout too

from diffusion101.cli import Parser, check_number, check_outputs, check_seed, run_cli


def main(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--out", required=True, help="folder to create (must not exist)")
    p.add_argument("--n", type=int, default=6000, help="how many training digits to transform")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    import shutil

    import torch

    from diffusion101.config import UserError
    from diffusion101.dataset import MNISTData, bold, load_mnist, write_image_folder
    out = Path(a.out)
    if out.exists():
        raise UserError(f"{out} exists; choose a new folder")
    check_number("--n", a.n, 10, 60000, integer=True)
    check_seed(a.seed)
    check_outputs({}, folders={"--out's parent": out.parent if str(out.parent) else Path(".")})
    train = load_mnist(train=True, img_size=28)
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(a.seed))[: a.n]
    # Written under a temporary name and renamed when complete: an interrupted run leaves
    # no half-made folder that a rerun would refuse and a fine-tune would trip on.
    tmp = out.with_name(f".{out.name}.partial{os.getpid()}")
    try:
        write_image_folder(MNISTData(bold(train.images[idx]), train.labels[idx]), tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {a.n} bold digits to {out}/0..9")


if __name__ == "__main__":
    sys.exit(run_cli(main))
