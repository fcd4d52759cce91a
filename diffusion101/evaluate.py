"""Measure what a model generates: an MNIST classifier's conditional accuracy, and FID in that
classifier's feature space.

Inception-based FID needs downloaded weights and looks at the wrong features for 28x28 digits;
the usual practice for MNIST is a small MNIST classifier: how often it reads the digit that was
asked for, and the Frechet distance between its penultimate-layer features of generated digits
and of the 10,000 test digits. The classifier's weights, the test set's feature statistics and
the real-data floors ship in ``diffusion101/weights/classifier.pt``.
"""
from __future__ import annotations

import dataclasses
import lzma
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from . import checkpoint
from .classifier import CLASSIFIER_PATH, DigitClassifier, classify
from .config import EVERY_STEP, SampleConfig, UserError
from .dataset import load_mnist, resize_uint8
from .denoise import finite_samples, make_sampler, sample, sampling_batch
from .fid import feature_stats, frechet_distance
from .classes import class_names, is_mnist_model
from .guidance import interval_text
from .memory import check_fits


def uint8_to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float [-1, 1], as the dataset normalises."""
    return images.float() / 255.0 * 2 - 1


# ---- the shipped classifier ----------------------------------------------------------------

_CACHE: dict = {}


def load_classifier(path=CLASSIFIER_PATH, device="cpu"):
    """(classifier in eval mode, its file: test-set feature stats and the real-data floors)."""
    key = (str(path), str(device))
    if key not in _CACHE:
        blob = checkpoint.load(path, "classifier")
        clf = DigitClassifier()
        checkpoint.load_state(clf, blob["model"], str(path))
        _CACHE[key] = (clf.to(device).eval(), blob)
    return _CACHE[key]


def floor_for(blob: dict, n: int):
    """The real-data FID floor (mean, std over draws) at the cached size closest to n."""
    sizes = sorted(blob["floor"], key=lambda k: abs(int(k) - n))
    k = sizes[0]
    return int(k), blob["floor"][k]["mean"], blob["floor"][k]["std"]


def reference_stats(img_size: int, device="cpu"):
    """Feature statistics of the 10,000 test digits as a model of this resolution sees them.

    A 48 px model learns digits upsampled from 28 px; scoring resizes its output back to 28.
    The round trip blurs, and this feature space notices (docs/EVALUATION.md measures by how
    much, on real test digits), so at other resolutions the
    reference is the test set through the same round trip, and the best a model can do is
    the same real-data floor as at 28 px."""
    clf, blob = load_classifier(device=device)
    if img_size == 28:
        return blob["test_mu"], blob["test_sigma"]
    key = ("test_stats", img_size)
    if key not in _CACHE:
        test = load_mnist(train=False, img_size=28)
        _, feats = classify(clf, uint8_to_unit(resize_uint8(test.images, img_size)).to(device))
        _CACHE[key] = feature_stats(feats.cpu())
    return _CACHE[key]


def score(images: torch.Tensor, labels: torch.Tensor, device="cpu") -> dict:
    """Conditional accuracy (overall, per digit) and FID vs the test set, for images in [-1, 1]
    of any size (N, 1, S, S) or (N, S, S)."""
    clf, blob = load_classifier(device=device)
    preds, feats = classify(clf, images.to(device))
    preds, labels = preds.cpu(), labels.cpu()
    correct = preds == labels
    per_digit = {int(d): float(correct[labels == d].float().mean()) for d in labels.unique()}
    mu, sigma = feature_stats(feats.cpu())
    fid = frechet_distance(mu, sigma, *reference_stats(images.shape[-1], device))
    n_floor, floor_mean, floor_std = floor_for(blob, len(labels))
    return {"n": int(len(labels)), "accuracy": float(correct.float().mean()),
            "per_digit_accuracy": per_digit,
            "mean_digit_accuracy": sum(per_digit.values()) / len(per_digit), "fid": fid,
            "floor_n": n_floor,
            "fid_floor_mean": floor_mean, "fid_floor_std": floor_std,
            "fid_over_floor": fid / floor_mean}


def test_set_labels(n: int) -> torch.Tensor:
    """n labels in the test set's digit proportions (largest remainder), interleaved 0-9.

    FID compares against the test set's features, and the real-data floor draws training
    digits in MNIST's own proportions (1 is the most frequent digit of the test set, 5 the
    rarest); asking for the ten digits equally often would add a mismatch that is the label
    mix's, not the model's (docs/EVALUATION.md)."""
    if "test_label_counts" not in _CACHE:
        _CACHE["test_label_counts"] = torch.bincount(load_mnist(train=False, img_size=28).labels)
    counts = _CACHE["test_label_counts"].double()
    share = counts / counts.sum() * n
    per_digit = share.floor().long()
    left = n - int(per_digit.sum())
    per_digit[torch.argsort(share - share.floor(), descending=True)[:left]] += 1
    # interleaved (0, 1, ..., 9, 0, 1, ...) while each digit lasts, so any prefix is mixed too
    rounds = [torch.arange(len(per_digit))[per_digit > r] for r in range(int(per_digit.max()))]
    return torch.cat(rounds)


def generate_images(model, cfg, n: int, device, seed: int, sample_cfg=None,
                    batch_size: int = 0, guide=None):
    """n digits in the test set's proportions from a model in eval mode, in batches, with the
    sampler options `sample_cfg` (a config.SampleConfig; default the model's own, cfg.sample);
    returns (images, labels, seconds)."""
    batch_size = batch_size or sampling_batch(device)
    sample_cfg = sample_cfg or cfg.sample
    labels = test_set_labels(n)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    sampler = make_sampler(sample_cfg, cfg.diffusion, device)
    out = []
    start = time.perf_counter()
    for chunk in labels.split(batch_size):
        images, _ = sample(model, sampler, chunk.to(device), sample_cfg, generator, guide=guide)
        out.append(finite_samples(images, "nothing was scored").cpu())  # not as black digits
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return torch.cat(out), labels, time.perf_counter() - start


# What the metrics record of the sampler (sample.use_ema is left out: --no-ema overrides it).
SAMPLING_FIELDS = [f.name for f in dataclasses.fields(SampleConfig) if f.name != "use_ema"]


def require_digits(cfg) -> None:
    """Accuracy and FID read images with an MNIST classifier: a model of other classes (a
    folder of one's own) has no such judge here."""
    if not is_mnist_model(cfg.model):
        names = class_names(cfg.model)
        raise UserError(f"this model draws {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}"
                        f" ({cfg.model.in_channels} channel(s)); accuracy and FID need a "
                        f"classifier of that data, and the shipped one reads grey MNIST digits")


def evaluate_model(model, cfg, n: int, device, seed: int, sample_cfg=None,
                   batch_size: int = 0, guide=None) -> dict:
    """Generate n digits with the sampler options `sample_cfg` (default cfg.sample; `guide`:
    the guide network of its rule auto) and score them; the metrics carry those options too."""
    require_digits(cfg)
    sample_cfg = sample_cfg or cfg.sample
    images, labels, seconds = generate_images(model, cfg, n, device, seed, sample_cfg, batch_size,
                                              guide)
    metrics = score(images, labels, device)
    sampling = {name: getattr(sample_cfg, name) for name in SAMPLING_FIELDS}
    metrics.update(sampling, guidance_interval=list(sample_cfg.guidance_interval),
                   sample_seconds=seconds, images_per_second=n / seconds)
    return metrics


NPZ_MIN = 10  # FID needs a covariance over the features: ten images at the very least
NPZ_MAX = 1_000_000  # as many as --n generates
NPZ_SIDE = (8, 256)  # pixels a side: the classifier reads its input resized to 28


def npy_header(zf: zipfile.ZipFile, name: str, path) -> tuple:
    """(dtype, shape) of the array `name` of an npz from its header alone: a header may claim
    a 71 TiB array, and only the claim is read. One whose data would not fit the member's
    stored size is refused."""
    member = f"{name}.npy"
    if member not in zf.namelist():
        raise UserError(f"{path} has no '{name}' array (a samples file holds 'images' and 'labels')")
    with zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise UserError(f"{path}: '{name}' is an .npy of format version {version}, which "
                            f"this version does not read")
        shape, _, dtype = readers[version](f)
        header = f.tell()
    if dtype.hasobject or header + dtype.itemsize * int(np.prod(shape)) != zf.getinfo(member).file_size:
        raise UserError(f"{path}: '{name}' claims {dtype} {shape}, which its stored bytes are not")
    return dtype, tuple(shape)


def evaluate_npz(path, num_classes: int = 10) -> dict:
    """Score samples written by denoise.py --npz: images uint8 (N, H, W), labels integers
    (N,) in 0..num_classes-1. Anything else is refused with one line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"npz not found: {p}")
    try:  # a file that cannot be opened is no "zip of arrays": say why it cannot
        open(p, "rb").close()
    except OSError as e:
        raise UserError(f"{p} cannot be read ({e.strerror or e})") from None
    if not zipfile.is_zipfile(p):  # np.load would read an .npy or a pickle as something else
        raise UserError(f"{p} cannot be read as an npz of samples: it is no zip of arrays (an "
                        f".npy, a pickle or a cut file?); denoise.py --npz writes one")
    try:
        with zipfile.ZipFile(p) as zf:  # what each array claims to be, before reading it
            shapes = {name: npy_header(zf, name, p) for name in ("images", "labels")}
        (images_dtype, images_shape), (labels_dtype, labels_shape) = shapes["images"], shapes["labels"]
        if images_dtype != np.uint8 or len(images_shape) != 3 or min(images_shape) == 0:
            raise UserError(f"{p}: images must be uint8 (N, H, W), not {images_dtype} {images_shape}")
        n, h, w = images_shape
        if h != w or not NPZ_SIDE[0] <= h <= NPZ_SIDE[1] or n > NPZ_MAX:
            raise UserError(f"{p}: images of {n} x {h} x {w} pixels; scoring takes square images of "
                            f"{NPZ_SIDE[0]} to {NPZ_SIDE[1]} pixels a side, at most {NPZ_MAX:,} of them")
        if labels_dtype.kind not in "iu" or labels_shape != (n,):
            raise UserError(f"{p}: labels must be integers (N,) with N = {n}, not "
                            f"{labels_dtype} {labels_shape}")
        # what the arrays unpack to, and the float copy that scoring makes: counted first (a
        # few MB of zeros compressed can claim gigabytes)
        check_fits(n * h * w * (1 + 4 + 4), "cpu", f"{p}: {n:,} images of {h} px, read and "
                   f"scored", "score fewer images")
        with np.load(p, allow_pickle=False) as d:
            images, labels = d["images"], d["labels"]
    except UserError:  # (a ValueError: said already)
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, lzma.LZMAError,
            NotImplementedError, RuntimeError) as e:
        # (zipfile: a member flagged encrypted is a RuntimeError, a compression method it does
        # not know a NotImplementedError)
        raise UserError(f"{p} cannot be read as an npz of samples ({e})") from None
    # labels stored big-endian read right in numpy, but torch takes native byte order only
    labels = labels.astype(labels.dtype.newbyteorder("="), copy=False)
    if len(labels) < NPZ_MIN:
        raise UserError(f"{p}: {len(labels)} images; scoring needs at least {NPZ_MIN}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"{p}: labels must lie in 0..{num_classes - 1}, found "
                        f"{labels.min()}..{labels.max()}")
    return score(uint8_to_unit(torch.from_numpy(images)), torch.from_numpy(labels).long())


def format_report(m: dict) -> str:
    spacing = m.get("timestep_spacing", "uniform")
    rule = m.get("guidance_rule", "cfg")
    lines = [f"n = {m['n']}" + (f", sampler {m['sampler']}, {m['steps']} steps, guidance "
                                f"{m['guidance']}" + (f" ({rule})" if rule != "cfg" else "")
                                if "sampler" in m else "")
             + interval_text(m.get("guidance_interval", EVERY_STEP))
             + (f", {spacing} timestep spacing" if spacing != "uniform" and m.get("sampler") != "ddpm" else ""),
             f"conditional accuracy: {100 * m['accuracy']:.2f}%"
             + (f" (mean over digits {100 * m['mean_digit_accuracy']:.2f}%)"
                if "mean_digit_accuracy" in m else ""),
             "per digit: " + "  ".join(f"{d}: {100 * a:.1f}%" for d, a in
                                       sorted(m["per_digit_accuracy"].items())),
             f"FID (classifier features): {m['fid']:.3f}   real-data floor at n={m['floor_n']}: "
             f"{m['fid_floor_mean']:.3f} +- {m['fid_floor_std']:.3f}  (ratio {m['fid_over_floor']:.2f})"]
    if "sample_seconds" in m:
        lines.append(f"sampling: {m['sample_seconds']:.1f} s, {m['images_per_second']:.1f} images/s")
    return "\n".join(lines)
