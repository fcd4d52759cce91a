"""The writers of sampled images: npz, grid PNG, progression figure, GIF of the walk."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from diffusion101.images import (PADDING, grid_image, progress_path, save_gif, save_grid, save_npz,
                                 save_progression, to_uint8)


def test_npz_and_grid(tmp_path):
    images = torch.linspace(-1, 1, 2 * 16 * 16).reshape(2, 1, 16, 16)
    save_npz(images, [3, 4], tmp_path / "s.npz")
    d = np.load(tmp_path / "s.npz")
    assert d["images"].dtype == np.uint8 and d["images"].shape == (2, 16, 16)
    assert d["labels"].dtype == np.int64 and d["labels"].tolist() == [3, 4]
    assert d["images"].min() == 0 and d["images"].max() == 255
    save_grid(images, tmp_path / "g.png", nrow=2)
    assert Image.open(tmp_path / "g.png").size == (2 * 16 + 3 * 2, 16 + 2 * 2)
    assert to_uint8(images).tolist() == d["images"].tolist()
    # 0 -> 0, 1 -> 255, and the midpoint rounds half up, as save_image does
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0]).reshape(3, 1, 1, 1)).ravel().tolist() == [0, 128, 255]


@pytest.mark.parametrize("n, nrow", [(10, 10), (7, 3), (1, 4)])
def test_grid_is_torchvisions_make_grid_and_the_png_its_save_image(tmp_path, n, nrow):
    from torchvision.utils import make_grid, save_image
    images = torch.rand(n, 1, 6, 6, generator=torch.Generator().manual_seed(n)) * 2.4 - 1.2
    unit = ((images + 1) / 2).clamp(0, 1)
    assert torch.equal(grid_image(images, nrow), make_grid(unit, nrow=nrow, padding=PADDING))
    save_grid(images, tmp_path / "ours.png", nrow)
    save_image(unit, tmp_path / "theirs.png", nrow=nrow, padding=PADDING)
    assert (tmp_path / "ours.png").read_bytes() == (tmp_path / "theirs.png").read_bytes()


def test_progression_figure_goes_beside_the_grid(tmp_path):
    out = tmp_path / "imgs" / "grid.png"
    assert progress_path(out) == tmp_path / "imgs" / "grid_progress.png"
    frames = torch.linspace(-1, 1, 2 * 3 * 8 * 8).reshape(2, 3, 1, 8, 8)  # 2 digits, 3 frames
    progress_path(out).parent.mkdir()
    save_progression(frames, [4, 7], progress_path(out))
    page = np.asarray(Image.open(progress_path(out)).convert("L"))
    # the tiles sit right of the label margin, below the title: row r, column j is frame j
    # of image r, as the grid of the frames in rows of 3 would place it
    mosaic = to_uint8(grid_image(frames.reshape(6, 1, 8, 8), 3)[None, :1] * 2 - 1)[0]
    assert page.shape[1] > mosaic.shape[1] and page.shape[0] > mosaic.shape[0]
    top, left = page.shape[0] - mosaic.shape[0], page.shape[1] - mosaic.shape[1]
    assert (page[top:, left:] == mosaic).all()


def test_gif_has_a_frame_per_kept_step_and_holds_the_last(tmp_path):
    frames = torch.linspace(-1, 1, 3 * 12 * 8 * 8).reshape(3, 12, 1, 8, 8)
    save_gif(frames, tmp_path / "walk.gif", nrow=3, scale=2)
    gif = Image.open(tmp_path / "walk.gif")
    durations, pictures = [], []
    for picture in ImageSequence.Iterator(gif):
        durations.append(picture.info["duration"])
        pictures.append(picture.convert("L"))
    assert len(pictures) == 12
    assert gif.size == (2 * (3 * 8 + 4 * PADDING), 2 * (8 + 2 * PADDING))
    assert durations[-1] == 4 * durations[0] and len(set(durations[:-1])) == 1
    last = np.asarray(pictures[-1])[::2, ::2]  # undo the nearest-neighbour scale
    expected = to_uint8(grid_image(frames[:, -1], 3)[None, :1] * 2 - 1)[0]
    assert np.abs(last.astype(int) - expected).max() <= 4  # the GIF palette's rounding
