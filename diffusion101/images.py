"""Writing what a sampler made: the grid PNG, the denoising-progression figure, the GIF of the
reverse walk, the npz of samples. Pillow writes the pictures (no torchvision, no matplotlib:
both are slow to import for a few PNGs). Every file goes through the atomic writer, so an
interrupted write leaves no half file."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .files import atomic_write

PADDING = 2  # black pixels between and around the tiles of a grid


def progress_path(out) -> Path:
    """Where the denoising progression goes: beside the grid, as <name>_progress.png."""
    out = Path(out)
    return out.with_name(out.stem + "_progress.png")


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Samples in about [-1, 1] -> floats in [0, 1] on the CPU, as images are shown and saved."""
    return ((images.float().cpu() + 1) / 2).clamp(0, 1)


def unit_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Floats in [0, 1] -> uint8 0..255, rounded to nearest (torchvision's save_image rounding)."""
    return x.mul(255).add(0.5).clamp(0, 255).to(torch.uint8)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, S, S) -> (N, S, S); (N, 3, S, S) -> (N, S, S, 3), as pictures are stored and shown."""
    return x[:, 0] if x.shape[1] == 1 else x.permute(0, 2, 3, 1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, S, S) in [-1, 1] -> uint8 0..255, (N, S, S) grey or (N, S, S, 3) RGB."""
    return unit_to_uint8(channels_last(to_unit(images))).numpy()


def grid_image(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """(N, C, S, S) in [-1, 1] -> one (3, H, W) image in [0, 1]: the tiles in rows of nrow,
    PADDING black pixels around each, grey repeated into RGB; a single image gets no padding
    (torchvision's make_grid, whose PNGs this package wrote before)."""
    tiles = to_unit(images)
    n, c, s, _ = tiles.shape
    if c == 1:
        tiles = tiles.expand(n, 3, s, s)
    if n == 1:
        return tiles[0]
    cols, rows = min(nrow, n), math.ceil(n / nrow)
    step = s + PADDING
    grid = torch.zeros(3, rows * step + PADDING, cols * step + PADDING)
    for k in range(n):
        y, x = divmod(k, cols)
        grid[:, y * step + PADDING:(y + 1) * step, x * step + PADDING:(x + 1) * step] = tiles[k]
    return grid


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="png")
    return buf.getvalue()


def pil_image(grid: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> an RGB PIL image."""
    return Image.fromarray(unit_to_uint8(grid).permute(1, 2, 0).numpy())


CAPTION_HEIGHT = 14  # pixels of the strip that names the columns of a grid


def fitted(draw: ImageDraw.ImageDraw, text: str, width: float) -> str:
    """`text`, cut short (ending in '.') until it is at most `width` pixels wide."""
    while len(text) > 1 and draw.textlength(text) > width:
        text = text[:-2] + "."
    return text


def captioned(picture: Image.Image, captions, step: int) -> Image.Image:
    """The grid `picture` below a white strip naming its columns (each `step` pixels wide)."""
    page = Image.new("RGB", (picture.width, picture.height + CAPTION_HEIGHT), "white")
    page.paste(picture, (0, CAPTION_HEIGHT))
    draw = ImageDraw.Draw(page)
    for k, caption in enumerate(captions):
        draw.text((PADDING + k * step, 1), fitted(draw, caption, step - 1), fill="black")
    return page


def save_grid(images: torch.Tensor, path, nrow: int, captions=None) -> None:
    """The images as one grid PNG, nrow to a row; with captions, the columns are named."""
    picture = pil_image(grid_image(images, nrow))
    if captions is not None:
        picture = captioned(picture, captions, images.shape[-1] + PADDING)
    data = png_bytes(picture)
    atomic_write(path, lambda f: f.write(data))


def save_progression(frames: torch.Tensor, labels, path) -> None:
    """One picture of the walk: a row per image, its label (a name) on the left; the columns
    are the kept x_t, from pure noise (left) to the result (right). frames: (N, F, C, S, S)."""
    n, f, c, s, _ = frames.shape
    mosaic = pil_image(grid_image(frames.reshape(n * f, c, s, s), f))  # a row per image
    labels = [str(label) for label in labels]
    measure = ImageDraw.Draw(mosaic)
    margin = max([24] + [int(measure.textlength(label)) + 8 for label in labels])
    title = 16
    page = Image.new("RGB", (mosaic.width + margin, mosaic.height + title), "white")
    page.paste(mosaic, (margin, title))
    draw = ImageDraw.Draw(page)
    draw.text((margin, 2), "noise  ->  sample", fill="black")
    step = s + PADDING
    for r, label in enumerate(labels):
        draw.text((4, title + PADDING + r * step + s // 2 - 5), str(label), fill="black")
    data = png_bytes(page)
    atomic_write(path, lambda f_: f_.write(data), derived=True)  # named after the grid


def save_gif(frames: torch.Tensor, path, nrow: int, scale: int = 2, ms_per_frame: int = 120) -> None:
    """The reverse walk as an animated GIF: frame j is the grid of every image's j-th kept x_t
    (frames: (N, F, C, S, S)), scaled up `scale` times; the last frame stays four times as long."""
    pictures = []
    for j in range(frames.shape[1]):
        picture = pil_image(grid_image(frames[:, j], nrow))
        pictures.append(picture.resize((picture.width * scale, picture.height * scale),
                                       Image.NEAREST))
    durations = [ms_per_frame] * (len(pictures) - 1) + [4 * ms_per_frame]
    buf = io.BytesIO()
    pictures[0].save(buf, format="gif", save_all=True, append_images=pictures[1:],
                     duration=durations, loop=0)
    data = buf.getvalue()
    atomic_write(path, lambda f: f.write(data))


def save_npz(images: torch.Tensor, labels, path) -> None:
    """images: uint8 (N, H, W) 0..255 ((N, H, W, 3) in RGB); labels: int64 (N,), for external
    evaluation."""
    arrays = {"images": to_uint8(images), "labels": np.asarray(labels, dtype=np.int64)}
    atomic_write(path, lambda f: np.savez(f, **arrays))
