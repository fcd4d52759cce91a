"""MNIST, carried inside the package and read offline through torchvision's MNIST layout.

The four original IDX files (gzip) live in ``diffusion101/data/mnist/`` with their sha256.
On first use they are checked and unpacked to ``<cache>/MNIST/raw/``, where
``torchvision.datasets.MNIST(download=False)`` reads them. The whole split is then resized
once, kept in memory as uint8, and batches are normalised to [-1, 1] on the fly: no PIL per
image, no worker processes.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
import numpy as np
from PIL import Image, ImageDraw

from .config import UserError
from .classes import MAX_CLASSES, check_class_name
from .memory import check_fits
from .settings import validate

# torchvision (slow to import) is imported where it is used.

DATA_DIR = Path(__file__).parent / "data" / "mnist"
FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def cache_dir() -> Path:
    # set but empty counts as unset: Path("") is the working folder, which is no cache
    return Path(os.environ.get("DIFFUSION101_CACHE") or Path.home() / ".cache" / "diffusion101")


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
    lines = [line.split() for line in sums_file.read_text().splitlines() if line.strip()]
    return {name: digest for digest, name in lines}


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
        # The unpacked file is used only when its own sha256 is the one SHA256SUMS lists for
        # it (hashing it takes a few ms): a file cut short, edited, or another file of that
        # name is unpacked again, whatever lies beside it in the cache.
        if target.is_file() and _sha256(target) == sums.get(name):
            continue
        tmp = raw / f".{name}.tmp{os.getpid()}"
        try:
            raw.mkdir(parents=True, exist_ok=True)
            with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
                dst.write(src.read())
            os.replace(tmp, target)
        except OSError as e:  # a full disk, HOME set to a file, a read-only cache
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise UserError(f"cannot unpack MNIST into {raw} ({e.strerror or e}); set "
                            f"DIFFUSION101_CACHE to a writable folder with 60 MB free") from None
    return root


# Images resized at once: their float copies are the resize's temporary memory, kept bounded
# (a chunk of images of RESIZE_PIXELS pixels in all).
RESIZE_PIXELS = 2 ** 26


def check_image_set(n: int, channels: int, size: int, where: str) -> None:
    """Refuse a training set that cannot be held in memory (uint8, `n` images of `size` px)
    with the resize's temporary floats, before one image is read."""
    check_fits(n * channels * size * size + 3 * 4 * RESIZE_PIXELS, "cpu",
               f"{where}: {n:,} images of {size} px held in memory",
               "train at a smaller model.img_size, or on fewer images")


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, size, size) uint8, bilinear like torchvision's Resize on PIL."""
    if images.shape[-1] == size:
        return images
    from torchvision.transforms.v2 import functional as TF
    out = torch.empty((len(images), size, size), dtype=torch.uint8)  # no second copy to join
    step = max(1, RESIZE_PIXELS // (size * size))
    for i in range(0, len(images), step):
        out[i:i + step] = TF.resize(images[i:i + step, None], [size, size], antialias=True)[:, 0]
    return out


def bytes_on(device, *tensors: torch.Tensor) -> int:
    """The bytes `tensors` hold in `device`'s memory (0 when they live elsewhere): what training
    counts of its data beside the network before it starts (on a CPU, one memory)."""
    kind = torch.device(device).type
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type == kind)


class Batch(NamedTuple):
    """What the training loop takes: images (B, C, S, S) in about [-1, 1], labels (B,), and
    distillation's own noise for each image (distill.Pairs), or None for a fresh draw (an
    (images, labels) pair, as ImageData.batch gives, reads as Batch(images, labels))."""
    images: torch.Tensor
    labels: torch.Tensor
    noise: torch.Tensor | None = None


@dataclass
class ImageData:
    """Labelled images in memory: MNIST, or a folder of one's own."""
    images: torch.Tensor  # (N, S, S) uint8 grey, or (N, C, S, S) with C channels
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device) -> "ImageData":
        return ImageData(self.images.to(device), self.labels.to(device))

    def bytes_on(self, device) -> int:
        return bytes_on(device, self.images)

    def batch(self, idx: torch.Tensor, device="cpu") -> tuple:
        """Images as (B, C, S, S) float in [-1, 1] (ToTensor, then x * 2 - 1) and labels (B,)."""
        idx = idx.to(self.images.device)  # the set may live on the GPU already
        x = self.images[idx].to(device, non_blocking=True)
        x = (x[:, None] if x.dim() == 3 else x).float().div_(255.0).mul_(2.0).sub_(1.0)
        return x, self.labels[idx].to(device, non_blocking=True)


def load_mnist(train: bool = True, img_size: int = 28) -> ImageData:
    from torchvision.datasets import MNIST
    root = prepare_raw()
    ds = MNIST(str(root), train=train, download=False)
    check_image_set(len(ds.data), 1, img_size, "MNIST")
    return ImageData(resize_uint8(ds.data, img_size), ds.targets.long())


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


def _class_folders(root: Path) -> list:
    """The class sub-folders of an image folder, sorted: hidden ones (.ipynb_checkpoints,
    .git) are not classes."""
    try:
        return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise UserError(f"image folder {root} cannot be read ({e.strerror})") from None


def _files_once(root: Path) -> int:
    """How many files the folder holds, following links as ImageFolder does; a link back to a
    folder already listed (a loop, or one folder reached twice) is refused, since ImageFolder
    would read its images again and again until the path grows too deep."""
    seen, files = {}, 0
    for folder, _, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            raise UserError(f"{seen[real]} and {folder} are the same folder (a link loop, or a "
                            f"second link to one folder): remove the link")
        seen[real] = folder
        files += len(names)
    return files


def _image_folder(root: Path, names: list):
    """torchvision's ImageFolder over the class folders `names`: it lists the files whose
    extension is an image's (others are skipped); an empty class is allowed here and refused
    by the caller, which can name it."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    class Folder(ImageFolder):
        def find_classes(self, directory):
            return names, {name: i for i, name in enumerate(names)}

    def visible(path: str) -> bool:
        # macOS's ._name.png and other hidden files are no images; nor is anything but a
        # regular file (a FIFO named x.png would block the read forever; a device, a socket)
        return (not Path(path).name.startswith(".") and path.lower().endswith(IMG_EXTENSIONS)
                and os.path.isfile(path))

    return Folder(str(root), is_valid_file=visible, allow_empty=True)


def read_folder_image(path: str, img_size: int, channels: int) -> torch.Tensor:
    """One image of any size or mode as uint8 (channels, img_size, img_size): grey ("L") or
    RGB, resized as torchvision resizes."""
    from torchvision.transforms.v2 import functional as TF
    try:
        with warnings.catch_warnings():
            # PIL warns of an image over its pixel limit (and refuses one twice over): the
            # warning, printed above the error line, becomes that refusal
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img = img.convert("L" if channels == 1 else "RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise UserError(f"cannot read image {path}: {e}") from None
    return TF.resize(TF.pil_to_tensor(img), [img_size, img_size], antialias=True)


def load_image_folder(root, img_size: int, channels: int = 1, known=None,
                      min_classes: int = 1, log=print) -> tuple:
    """An image folder with one sub-folder per class, as (data, class names). Every image is
    converted to `channels` (1 grey, 3 RGB) and img_size, once, and kept as uint8 like MNIST.

    known None: the folder's class names (sorted) are the labels 0, 1, ...; else the names a
    model already has (`known`, in label order), and each folder must be one of them. Files
    without an image extension are skipped (and counted); an image file that cannot be read
    is refused."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"image folder {'is a file' if root.exists() else 'not found'}: {root}")
    names = _class_folders(root)
    if len(names) < min_classes:
        raise UserError(f"{root} holds {len(names)} class sub-folder(s) {names}; at least "
                        f"{min_classes} are needed (one sub-folder of images per class)")
    if len(names) > MAX_CLASSES:
        raise UserError(f"{root} holds {len(names)} class sub-folders; at most {MAX_CLASSES}")
    for name in names:
        check_class_name(name, str(root))
    if known is not None:
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UserError(f"{root}: the model has no class {unknown[0]!r} (its classes: "
                            f"{', '.join(known[:12])}{' ...' if len(known) > 12 else ''})")
    n_files = _files_once(root)
    folder = _image_folder(root, names)
    counts = torch.bincount(torch.tensor(folder.targets, dtype=torch.long), minlength=len(names))
    if int(counts.min()) == 0:
        empty = root / names[int(counts.argmin())]
        try:  # ImageFolder's walk passes over a folder it cannot list, as if it were empty
            os.listdir(empty)
        except OSError as e:
            raise UserError(f"{empty} cannot be read ({e.strerror or e})") from None
        raise UserError(f"{empty} holds no image file (.png, .jpg, .bmp, ...; the extensions "
                        f"torchvision's ImageFolder reads)")
    skipped = n_files - len(folder.samples)
    if skipped:
        log(f"{root}: skipped {skipped} file(s) that are not images")
    check_image_set(len(folder.samples), channels, img_size, str(root))
    images = torch.empty((len(folder.samples), channels, img_size, img_size), dtype=torch.uint8)
    for i, (path, _) in enumerate(folder.samples):  # into place: no list to stack, no copy
        images[i] = read_folder_image(path, img_size, channels)
    label_of = [known.index(n) if known is not None else i for i, n in enumerate(names)]
    labels = torch.tensor([label_of[i] for _, i in folder.samples], dtype=torch.long)
    return ImageData(images[:, 0] if channels == 1 else images, labels), names


def bold(images: torch.Tensor) -> torch.Tensor:
    """The built-in style target: strokes thickened by a 3x3 grey dilation (max filter)."""
    x = images[:, None].float()
    return F.max_pool2d(x, 3, stride=1, padding=1)[:, 0].to(torch.uint8)


def write_folder_atomically(out, fill) -> None:
    """Call fill(folder) on a temporary folder beside `out` (a new folder in an existing one)
    and rename it to `out` when complete, so an interrupted run leaves no half-made folder
    that a rerun would refuse and a training run would trip on."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial{os.getpid()}")
    try:
        fill(tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_style_data(out, n: int, seed: int = 0) -> None:
    """n random training digits made bold (bold()), written as an ImageFolder at `out`."""
    train = load_mnist(train=True, img_size=28)
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    write_folder_atomically(out, lambda tmp: write_image_folder(
        ImageData(bold(train.images[idx]), train.labels[idx]), tmp))
    print(f"wrote {n} bold digits to {out}/0..9")


SHAPES = ("circle", "cross", "square", "triangle")  # sorted, as ImageFolder orders classes


def draw_shape(kind: str, size: int, rng) -> Image.Image:
    """One RGB picture: a shape of a random bright colour, position and size on black, drawn
    four times larger and scaled down, so that its edges are smooth."""
    big = 4 * size
    img = Image.new("RGB", (big, big))
    draw = ImageDraw.Draw(img)
    colour = tuple(int(c) for c in rng.integers(64, 256, 3))
    r = rng.uniform(0.2, 0.4) * big  # half the shape's width
    cx, cy = rng.uniform(r + 2, big - r - 2, 2)
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:  # a cross: two bars a third of its width thick
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    return img.resize((size, size), Image.LANCZOS)


def write_shapes(out, n: int, size: int = 28, seed: int = 0) -> None:
    """A toy labelled set that is not MNIST: n RGB pictures of coloured shapes (SHAPES, in
    turn), as an ImageFolder at `out` with one sub-folder per shape."""
    rng = np.random.default_rng(seed)

    def fill(tmp: Path) -> None:
        for kind in SHAPES:
            (tmp / kind).mkdir(parents=True)
        for i in range(n):
            kind = SHAPES[i % len(SHAPES)]
            draw_shape(kind, size, rng).save(tmp / kind / f"{i:05d}.png")
    write_folder_atomically(out, fill)
    print(f"wrote {n} pictures of {', '.join(SHAPES)} to {out}/")


def write_image_folder(data: ImageData, root, names=None) -> None:
    """Write images as PNGs in the ImageFolder layout root/<name>/<index>.png (names: of each
    label; default the digits)."""
    root = Path(root)
    names = names or [str(d) for d in range(10)]
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(data.images, data.labels.tolist())):
        pixels = img.numpy() if img.dim() == 2 else img.permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(root / names[label] / f"{i:05d}.png")


def training_data(cfg, log=print) -> ImageData | None:
    """The images train.data names. MNIST: None here, loaded by prepare(). A folder: loaded
    now, its class names (sorted) the labels 0, 1, ..., their number and names written into
    cfg.model, so that the checkpoint carries them."""
    if cfg.train.data == "mnist":
        return None
    data, names = load_image_folder(cfg.train.data, cfg.model.img_size, cfg.model.in_channels,
                                    min_classes=2, log=log)
    cfg.model.num_classes, cfg.model.class_names = len(names), tuple(names)
    validate(cfg)
    return data
