"""MNIST, carried inside the package and read offline through torchvision's MNIST layout.

The four original IDX files (gzip) live in ``diffusion101/data/mnist/`` with their sha256.
On first use they are checked and unpacked to ``<cache>/MNIST/raw/``, where
``torchvision.datasets.MNIST(download=False)`` reads them. The whole split is then resized
once, kept in memory as uint8, and batches are normalised to [-1, 1] on the fly: no PIL per
image, no worker processes.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from .config import UserError

# torchvision takes about 1.5 s to import, so its datasets and transforms are imported where
# they are used.

DATA_DIR = Path(__file__).parent / "data" / "mnist"
FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def cache_dir() -> Path:
    return Path(os.environ.get("DIFFUSION101_CACHE", Path.home() / ".cache" / "diffusion101"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _expected_sums(data_dir: Path) -> dict:
    sums_file = data_dir / "SHA256SUMS"
    if not sums_file.is_file():
        raise UserError(f"MNIST checksum list missing: {sums_file}")
    sums = {}
    for line in sums_file.read_text().splitlines():
        if line.strip():
            digest, name = line.split()
            sums[name] = digest
    return sums


def prepare_raw(data_dir: Path = DATA_DIR, root: Path | None = None) -> Path:
    """Check the carried .gz files and unpack them where torchvision's MNIST looks. Returns root."""
    root = Path(root) if root is not None else cache_dir()
    raw = root / "MNIST" / "raw"
    sums = _expected_sums(data_dir)
    for name in FILES:
        gz = data_dir / f"{name}.gz"
        if not gz.is_file():
            raise UserError(f"MNIST file missing: {gz} (the project carries it; is the clone complete?)")
        digest = _sha256(gz)
        if digest != sums.get(gz.name):
            raise UserError(f"MNIST file corrupt: {gz} has sha256 {digest[:12]}..., "
                            f"expected {sums.get(gz.name, '?')[:12]}...")
        target = raw / name
        stamp = raw / f"{name}.sha256"
        # The stamp records which verified .gz the unpacked file came from.
        if target.is_file() and stamp.is_file() and stamp.read_text() == digest:
            continue
        raw.mkdir(parents=True, exist_ok=True)
        tmp = raw / f".{name}.tmp{os.getpid()}"
        with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
            dst.write(src.read())
        os.replace(tmp, target)
        stamp.write_text(digest)
    return root


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, size, size) uint8, bilinear like torchvision's Resize on PIL."""
    if images.shape[-1] == size:
        return images
    from torchvision.transforms.v2 import functional as TF
    out = []
    for chunk in images.split(4096):  # bounded temporary memory
        out.append(TF.resize(chunk[:, None], [size, size], antialias=True)[:, 0])
    return torch.cat(out)


@dataclass
class MNISTData:
    images: torch.Tensor  # (N, S, S) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batch(self, idx: torch.Tensor, device="cpu"):
        """Images as (B, 1, S, S) float in [-1, 1] (ToTensor, then x * 2 - 1) and labels (B,)."""
        idx = idx.to(self.images.device)  # the set may live on the GPU already
        x = self.images[idx].to(device, non_blocking=True)
        x = x[:, None].float().div_(255.0).mul_(2.0).sub_(1.0)
        return x, self.labels[idx].to(device, non_blocking=True)


def load_mnist(train: bool = True, img_size: int = 28) -> MNISTData:
    from torchvision.datasets import MNIST
    root = prepare_raw()
    ds = MNIST(str(root), train=train, download=False)
    return MNISTData(resize_uint8(ds.data, img_size), ds.targets.long())


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of one epoch, a function of (seed, epoch) alone, so a resumed run
    replays exactly the batches the interrupted one would have seen."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1):
    """Index tensors of each batch in one epoch; with `world` processes, each takes every
    world-th index (the DistributedSampler's split) so ranks see disjoint data. The order is
    first padded by repeating its start, as DistributedSampler does, so that every rank has
    the same number of batches (a rank with one batch fewer would hang the others)."""
    order = epoch_order(n, seed, epoch)
    if world > 1 and n % world:
        order = torch.cat([order, order[: world - n % world]])
    order = order[rank::world]
    return list(order.split(batch_size))


def load_image_folder(root, img_size: int, num_classes: int = 10) -> MNISTData:
    """A torchvision ImageFolder whose sub-folders are named 0-9: any image size or mode,
    converted to one channel and resized to img_size, kept as uint8 like MNIST."""
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.v2 import functional as TF
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    try:
        folder = ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f"{root} is not an image folder with class sub-folders ({e})") from None
    names = sorted(folder.class_to_idx)
    wrong = [n for n in names if not (n.isdigit() and 0 <= int(n) < num_classes)]
    if wrong:
        raise UserError(f"{root}: sub-folders must be named 0-{num_classes - 1}, found {wrong[:3]}")
    images, labels = [], []
    for path, idx in folder.samples:
        try:
            img = folder.loader(path).convert("L")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            # (PIL refuses images so large that decoding them could exhaust memory)
            raise UserError(f"cannot read image {path}: {e}") from None
        t = TF.pil_to_tensor(img)  # (1, H, W) uint8
        images.append(TF.resize(t, [img_size, img_size], antialias=True)[0])
        labels.append(int(names[idx]))
    if not images:
        raise UserError(f"{root} holds no images")
    return MNISTData(torch.stack(images), torch.tensor(labels, dtype=torch.long))


def bold(images: torch.Tensor) -> torch.Tensor:
    """The built-in style target: strokes thickened by a 3x3 grey dilation (max filter)."""
    x = images[:, None].float()
    return F.max_pool2d(x, 3, stride=1, padding=1)[:, 0].to(torch.uint8)


def write_style_data(out, n: int, seed: int = 0) -> None:
    """n random training digits made bold (bold()), written as an ImageFolder at `out` (a new
    folder in an existing one). The folder is written under a temporary name and renamed when complete, so
    an interrupted run leaves no half-made folder that a rerun would refuse and a fine-tune
    would trip on."""
    out = Path(out)
    train = load_mnist(train=True, img_size=28)
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    tmp = out.with_name(f".{out.name}.partial{os.getpid()}")
    try:
        write_image_folder(MNISTData(bold(train.images[idx]), train.labels[idx]), tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {n} bold digits to {out}/0..9")


def write_image_folder(data: MNISTData, root) -> None:
    """Write digits as PNGs in the ImageFolder layout root/<label>/<index>.png."""
    root = Path(root)
    for d in range(10):
        (root / str(d)).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(data.images, data.labels.tolist())):
        Image.fromarray(img.numpy()).save(root / str(label) / f"{i:05d}.png")
