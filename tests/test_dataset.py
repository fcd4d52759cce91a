import gzip
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TFv1

from diffusion101 import dataset
from diffusion101.config import UserError


def test_real_mnist_counts_and_labels():
    train = dataset.load_mnist(train=True, img_size=28)
    test = dataset.load_mnist(train=False, img_size=28)
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 28, 28)
    assert torch.bincount(train.labels).tolist()[:3] == [5923, 6742, 5958]  # MNIST's known counts
    assert train.labels[:5].tolist() == [5, 0, 4, 1, 9]


def test_batched_resize_matches_torchvision_pil_path():
    # The reference applies Resize((48, 48)) to each PIL image, then ToTensor and x * 2 - 1.
    test = dataset.load_mnist(train=False, img_size=28)
    ours = dataset.resize_uint8(test.images[:64], 48)
    for i in range(64):
        pil = TFv1.resize(Image.fromarray(test.images[i].numpy()), [48, 48])
        ref = torch.from_numpy(np.array(pil))
        assert (ours[i].int() - ref.int()).abs().max().item() <= 1  # rounding only
    x, y = dataset.MNISTData(ours, test.labels[:64]).batch(torch.arange(4))
    assert x.shape == (4, 1, 48, 48) and x.min() >= -1 and x.max() <= 1 and y.dtype == torch.int64


def test_epoch_order_is_a_seeded_permutation_split_by_rank():
    a = dataset.epoch_batches(100, 16, seed=1, epoch=0)
    assert [len(b) for b in a] == [16] * 6 + [4]
    assert sorted(torch.cat(a).tolist()) == list(range(100))
    assert torch.equal(torch.cat(a), torch.cat(dataset.epoch_batches(100, 16, seed=1, epoch=0)))
    assert not torch.equal(torch.cat(a), torch.cat(dataset.epoch_batches(100, 16, seed=1, epoch=1)))
    r0 = torch.cat(dataset.epoch_batches(100, 8, 1, 0, rank=0, world=2))
    r1 = torch.cat(dataset.epoch_batches(100, 8, 1, 0, rank=1, world=2))
    assert set(r0.tolist()).isdisjoint(r1.tolist()) and len(r0) + len(r1) == 100


def _copy_data(tmp_path):
    src = dataset.DATA_DIR
    dst = tmp_path / "mnist"
    shutil.copytree(src, dst)
    return dst


def test_missing_file_is_one_clear_error(tmp_path):
    data = _copy_data(tmp_path)
    (data / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match="missing"):
        dataset.prepare_raw(data, tmp_path / "cache")


def test_corrupt_file_is_one_clear_error(tmp_path):
    data = _copy_data(tmp_path)
    with gzip.open(data / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"not mnist")
    with pytest.raises(UserError, match="corrupt"):
        dataset.prepare_raw(data, tmp_path / "cache")


def test_an_image_too_large_to_decode_safely_is_a_user_error(tmp_path, monkeypatch):
    # PIL refuses images past its pixel limit (a "decompression bomb"); with the limit lowered,
    # a small image stands in for a 30000 x 30000 one
    (tmp_path / "3").mkdir()
    Image.new("L", (40, 40)).save(tmp_path / "3" / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(UserError, match="cannot read image .*big.png"):
        dataset.load_image_folder(tmp_path, 16)
