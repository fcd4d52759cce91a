"""The evaluation classifier: a small MNIST CNN, trained once, shipped with the package.

scripts/train_classifier.py trains it on the 60,000 training digits only, checks it on the
10,000 test digits, and stores beside its weights what every evaluation compares against: the
test set's feature mean and covariance, and the real-data FID floor (N random training digits
vs the test set, mean and std over 3 draws) for a few N.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import checkpoint
from .dataset import epoch_batches, load_mnist
from .fid import feature_stats, frechet_distance

CLASSIFIER_PATH = Path(__file__).parent / "weights" / "classifier.pt"
FLOOR_SIZES = (500, 2000, 10000)
CLASSIFIER_FORMAT = "diffusion101/classifier/1"


class DigitClassifier(nn.Module):
    """Two conv stages (28 -> 14 -> 7) and a 128-wide feature layer; inputs in [-1, 1]."""

    feature_dim = 128

    def __init__(self):
        super().__init__()

        def stage(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                    nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                    nn.MaxPool2d(2)]

        self.conv = nn.Sequential(*stage(1, 32), *stage(32, 64))
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, self.feature_dim, bias=False),
                                      nn.BatchNorm1d(self.feature_dim), nn.ReLU())
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(self.feature_dim, 10)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        f = self.features(self.conv(x))  # (B, 128): the FID feature space
        logits = self.head(self.dropout(f))
        return (logits, f) if return_features else logits


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Translate each image by up to max_shift pixels (pad with background, crop back)."""
    n, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])  # (N, H)
    cols = (dx[:, None] + torch.arange(w)[None, :])  # (N, W)
    idx_n = torch.arange(n)[:, None, None]
    return padded[idx_n, 0, rows[:, :, None], cols[:, None, :]][:, None]


def train_classifier(epochs: int = 4, batch_size: int = 128, lr: float = 3e-3, seed: int = 0,
                     out=CLASSIFIER_PATH, log=print) -> dict:
    torch.manual_seed(seed)
    train, test = load_mnist(True, 28), load_mnist(False, 28)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(train) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        bar = tqdm(epoch_batches(len(train), batch_size, seed, epoch), desc=f"classifier epoch {epoch + 1}")
        for idx in bar:
            x, y = train.batch(idx)
            loss = F.cross_entropy(model(random_shift(x, g)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
    minutes = (time.perf_counter() - start) / 60
    model.eval()
    x_test, y_test = test.batch(torch.arange(len(test)))
    preds, test_feats = classify(model, x_test)
    accuracy = float((preds == y_test).float().mean())
    log(f"test accuracy {100 * accuracy:.2f}% after {epochs} epochs ({minutes:.1f} min)")
    test_mu, test_sigma = feature_stats(test_feats)
    floor = {}
    for n in FLOOR_SIZES:
        fids = []
        for draw in range(3):
            idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(draw))[:n]
            _, f = classify(model, train.batch(idx)[0])
            fids.append(frechet_distance(*feature_stats(f), test_mu, test_sigma))
        t = torch.tensor(fids, dtype=torch.float64)
        floor[n] = {"mean": float(t.mean()), "std": float(t.std()), "draws": fids}
        log(f"real-data FID floor, n={n}: {floor[n]['mean']:.3f} +- {floor[n]['std']:.3f}")
    blob = {"format": CLASSIFIER_FORMAT, "model": model.state_dict(), "test_accuracy": accuracy,
            "test_mu": test_mu, "test_sigma": test_sigma, "floor": floor,
            "train": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
                      "minutes": minutes}}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save(blob, out)
    log(f"saved {out}")
    return blob


def to_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """Any (N, 1, S, S) or (N, S, S) images in [-1, 1] -> (N, 1, 28, 28), antialiased resize."""
    if images.dim() == 3:
        images = images[:, None]
    images = images.float()
    if images.shape[-1] != 28 or images.shape[-2] != 28:
        images = F.interpolate(images, size=(28, 28), mode="bilinear", antialias=True,
                               align_corners=False)
    return images.clamp(-1, 1)


@torch.inference_mode()
def classify(clf: DigitClassifier, images: torch.Tensor, batch_size: int = 100):
    """(predicted labels (N,), features (N, 128) float64) for images in [-1, 1]. (Chunks of a
    hundred keep the activations in a CPU's cache, which larger ones do not: docs/BENCHMARKS.md.)"""
    preds, feats = [], []
    for chunk in images.split(batch_size):
        logits, f = clf(to_classifier_input(chunk), return_features=True)
        preds.append(logits.argmax(1))
        feats.append(f.double())
    return torch.cat(preds), torch.cat(feats)
