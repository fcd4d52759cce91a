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
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import UserError

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
    world-th index (the DistributedSampler's split) so ranks see disjoint data."""
    order = epoch_order(n, seed, epoch)[rank::world]
    return list(order.split(batch_size))
