"""The writers of sampled images: npz, grid PNG, progression figure."""
import numpy as np
import torch
from PIL import Image

from diffusion101.images import progress_path, save_grid, save_npz, save_progression, to_uint8


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


def test_progression_figure_goes_beside_the_grid(tmp_path):
    out = tmp_path / "imgs" / "grid.png"
    assert progress_path(out) == tmp_path / "imgs" / "grid_progress.png"
    frames = torch.linspace(-1, 1, 2 * 3 * 8 * 8).reshape(2, 3, 1, 8, 8)  # 2 digits, 3 frames
    progress_path(out).parent.mkdir()
    save_progression(frames, [4, 7], progress_path(out))
    width, height = Image.open(progress_path(out)).size
    assert width > height > 0  # three columns of frames, two rows of digits
