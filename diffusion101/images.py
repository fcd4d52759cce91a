"""Writing what a sampler made: the grid PNG, the denoising-progression figure, the npz of
samples. Every file goes through the atomic writer, so an interrupted write leaves no half file."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from .files import atomic_write


def progress_path(out) -> Path:
    """Where the denoising progression goes: beside the grid, as <name>_progress.png."""
    out = Path(out)
    return out.with_name(out.stem + "_progress.png")


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Samples in about [-1, 1] -> floats in [0, 1] on the CPU, as images are shown and saved."""
    return ((images.float().cpu() + 1) / 2).clamp(0, 1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 1, S, S) in [-1, 1] -> (N, S, S) uint8 0..255, the same rounding as save_image."""
    x = to_unit(images[:, 0])
    return x.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).numpy()


def save_grid(images: torch.Tensor, path, nrow: int) -> None:
    from torchvision.utils import save_image  # torchvision is slow to import: on first use
    grid_images = to_unit(images)
    atomic_write(path, lambda f: save_image(grid_images, f, nrow=nrow, padding=2, format="png"))


def save_progression(frames: torch.Tensor, digits, path) -> None:
    """Rows: digits; columns: the intermediate x_t, from noise (left) to the result (right)."""
    import matplotlib  # slow to import, and only this figure needs it
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    rows, cols = frames.shape[0], frames.shape[1]
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.6, rows * 0.6), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(to_unit(frames[r, c, 0]).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(str(digits[r]), rotation=0, labelpad=8)
    fig.suptitle("denoising progression: noise (left) to digit (right)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, metadata={"Software": None})  # no version stamp: same bytes each run
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def save_npz(images: torch.Tensor, labels, path) -> None:
    """images: uint8 (N, H, W) 0..255; labels: int64 (N,), for external evaluation."""
    arrays = {"images": to_uint8(images), "labels": np.asarray(labels, dtype=np.int64)}
    atomic_write(path, lambda f: np.savez(f, **arrays))
