import gzip
import os
import shutil
from pathlib import Path

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


def test_batched_resize_matches_torchvision_pil_path(monkeypatch):
    # The reference applies Resize((48, 48)) to each PIL image, then ToTensor and x * 2 - 1.
    test = dataset.load_mnist(train=False, img_size=28)
    ours = dataset.resize_uint8(test.images[:64], 48)
    for i in range(64):
        pil = TFv1.resize(Image.fromarray(test.images[i].numpy()), [48, 48])
        ref = torch.from_numpy(np.array(pil))
        assert (ours[i].int() - ref.int()).abs().max().item() <= 1  # rounding only
    x, y = dataset.ImageData(ours, test.labels[:64]).batch(torch.arange(4))
    assert x.shape == (4, 1, 48, 48) and x.min() >= -1 and x.max() <= 1 and y.dtype == torch.int64
    # in chunks (a bounded temporary): the same bytes as one resize of all of them
    monkeypatch.setattr(dataset, "RESIZE_PIXELS", 5 * 48 * 48)
    assert torch.equal(dataset.resize_uint8(test.images[:64], 48), ours)


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


def _folder(root, spec: dict):
    """An image folder: spec maps a class folder to a list of PIL images."""
    for name, images in spec.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            img.save(root / name / f"{i}.png")
    return root


def test_a_folder_of_mixed_modes_becomes_labelled_uint8_in_the_models_channels(tmp_path):
    red = Image.new("RGB", (20, 10), (255, 0, 0))
    spec = {"b_rgb": [red, red.convert("RGBA")], "a_grey": [Image.new("L", (8, 8), 200)],
            "c_modes": [red.convert("P"), Image.new("I;16", (5, 5), 300), red.convert("CMYK").convert("RGB")]}
    root = _folder(tmp_path / "data", spec)
    (root / ".ipynb_checkpoints").mkdir()  # hidden: not a class
    (root / "a_grey" / "notes.txt").write_text("skipped")
    (root / "b_rgb" / "._0.png").write_bytes(b"macOS metadata, not an image")  # hidden: skipped
    logged = []
    data, names = dataset.load_image_folder(root, 16, channels=3, log=logged.append)
    assert names == ["a_grey", "b_rgb", "c_modes"]  # sorted: the labels 0, 1, 2
    assert data.images.shape == (6, 3, 16, 16) and data.images.dtype == torch.uint8
    assert data.labels.tolist() == [0, 1, 1, 2, 2, 2]
    assert data.images[0].float().mean() == 200 and data.images[1, 0].min() == 255
    assert data.images[1, 1:].max() == 0  # pure red, resized, stays pure red
    assert logged == [f"{root}: skipped 2 file(s) that are not images"]
    grey, _ = dataset.load_image_folder(root, 16, channels=1, log=logged.append)
    assert grey.images.shape == (6, 16, 16)
    x, y = grey.batch(torch.tensor([0, 1]))
    assert x.shape == (2, 1, 16, 16) and x.min() >= -1 and x.max() <= 1
    x, _ = data.batch(torch.tensor([1]))
    assert x.shape == (1, 3, 16, 16) and x[0, 0].min() == 1 and x[0, 1].max() == -1


def test_a_folder_for_a_model_maps_its_class_names_to_the_models_labels(tmp_path):
    digits = tuple("0123456789")
    img = Image.new("L", (8, 8))
    data, names = dataset.load_image_folder(_folder(tmp_path / "ok", {"7": [img], "3": [img, img]}),
                                            16, known=digits)
    assert names == ["3", "7"] and data.labels.tolist() == [3, 3, 7]
    # Unicode digits that str.isdigit() accepts (int() refuses '³', reads '٣' as 3) are no
    # names of the model: refused, never mapped to a label by accident
    for odd in ("³", "٣", "03", "cat"):
        root = _folder(tmp_path / f"odd{len(odd)}{ord(odd[0])}", {"1": [img], odd: [img]})
        with pytest.raises(UserError, match=f"the model has no class '{odd}'"):
            dataset.load_image_folder(root, 16, known=digits)


def test_a_folder_of_too_many_classes_is_refused(tmp_path):
    for i in range(1001):
        (tmp_path / f"c{i}").mkdir()
    with pytest.raises(UserError, match="1001 class sub-folders; at most 1000"):
        dataset.load_image_folder(tmp_path, 16)


def test_a_folder_reached_twice_through_a_link_is_refused(tmp_path):
    img = Image.new("L", (8, 8), 200)
    root = _folder(tmp_path / "data", {"a": [img], "b": [img]})
    data, _ = dataset.load_image_folder(root, 16, log=lambda *a: None)
    assert len(data.labels) == 2
    # a link back up (ImageFolder would read the images once per level, dozens of times)
    (root / "a" / "loop").symlink_to("..")
    with pytest.raises(UserError, match="/data and .*/data/a/loop are the same folder"):
        dataset.load_image_folder(root, 16)
    (root / "a" / "loop").unlink()
    (root / "b" / "again").symlink_to(root / "a")  # a's images a second time, as b's
    with pytest.raises(UserError, match="are the same folder"):
        dataset.load_image_folder(root, 16)


def test_the_shapes_set_is_rgb_and_one_folder_per_shape(tmp_path):
    dataset.write_shapes(tmp_path / "shapes", 8, size=28, seed=1)
    data, names = dataset.load_image_folder(tmp_path / "shapes", 28, channels=3, log=print)
    assert names == list(dataset.SHAPES) and data.labels.bincount().tolist() == [2, 2, 2, 2]
    assert data.images.shape == (8, 3, 28, 28)
    assert [p.name for p in tmp_path.iterdir()] == ["shapes"]  # no half-made folder left
    # one bright shape on black: a good part of every picture is background
    black = (data.images.amax(dim=1) < 16).float().mean(dim=(1, 2))
    assert (black > 0.2).all() and (data.images.amax(dim=(1, 2, 3)) >= 64).all()


def test_only_regular_files_are_read_from_an_image_folder(tmp_path):
    # a FIFO named like an image would block training forever at its first read; a link to a
    # device the same. Only regular files (or links to them) count as images.
    import os
    root = _folder(tmp_path / "data", {"a": [Image.new("L", (8, 8), 50)], "b": [Image.new("L", (8, 8), 90)]})
    os.mkfifo(root / "a" / "pipe.png")
    os.symlink("/dev/zero", root / "b" / "zeros.png")
    os.symlink(root / "a" / "0.png", root / "b" / "linked.png")  # a link to an image is one
    logged = []
    data, _ = dataset.load_image_folder(root, 8, log=logged.append)
    assert data.labels.tolist() == [0, 1, 1] and logged == [f"{root}: skipped 2 file(s) that are not images"]


def test_a_training_set_that_cannot_be_held_in_memory_is_refused_before_it_is_read(tmp_path,
                                                                                 monkeypatch):
    # MNIST at 512 px is 14.6 GiB of uint8 (and 0.75 GiB of the resize's floats): counted first,
    # not found out by the OOM killer (a SIGKILL, no message) after minutes of resizing
    from diffusion101 import memory
    monkeypatch.setattr(memory, "device_memory", lambda device: 2 ** 30)  # a 1 GiB machine
    read = []
    monkeypatch.setattr(dataset, "resize_uint8", lambda *a: read.append(a))
    with pytest.raises(UserError, match=r"MNIST: 60,000 images of 512 px held in memory needs "
                                        r"about 15.4 GiB; this process may take 1.0 GiB on the cpu device"):
        dataset.load_mnist(img_size=512)
    root = _folder(tmp_path / "data", {"a": [Image.new("L", (8, 8))] * 3, "b": [Image.new("L", (8, 8))]})
    monkeypatch.setattr(dataset, "read_folder_image", lambda *a: read.append(a))
    monkeypatch.setattr(dataset, "RESIZE_PIXELS", 0)
    monkeypatch.setattr(memory, "device_memory", lambda device: 4 * 3 * 64 * 64 - 1)
    with pytest.raises(UserError, match="4 images of 64 px held in memory"):
        dataset.load_image_folder(root, 64, channels=3)
    assert read == []


def test_the_mnist_cache_is_unpacked_again_when_cut_and_refused_in_one_line_when_unwritable(tmp_path):
    # a file cut short under a stamp that survived is unpacked again; a cache under a file
    # (HOME set to a file) is one line, and no temporary file is left behind
    cache = tmp_path / "cache"
    dataset.prepare_raw(dataset.DATA_DIR, cache)
    target = cache / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    whole = target.read_bytes()
    target.write_bytes(whole[:100])
    dataset.prepare_raw(dataset.DATA_DIR, cache)
    assert target.read_bytes() == whole
    (tmp_path / "home").write_text("a file, not a folder")
    with pytest.raises(UserError, match="cannot unpack MNIST into .*DIFFUSION101_CACHE"):
        dataset.prepare_raw(dataset.DATA_DIR, tmp_path / "home" / ".cache")
    assert not [p for p in cache.rglob(".*tmp*")]


def test_an_empty_or_unset_cache_variable_is_the_default_cache(monkeypatch, tmp_path):
    """DIFFUSION101_CACHE= (set, empty) once meant the working folder: MNIST (53 MB) and the
    page's runtime unpacked wherever the command ran."""
    default = Path.home() / ".cache" / "diffusion101"
    monkeypatch.setenv("DIFFUSION101_CACHE", "")
    assert dataset.cache_dir() == default
    monkeypatch.delenv("DIFFUSION101_CACHE")
    assert dataset.cache_dir() == default
    monkeypatch.setenv("DIFFUSION101_CACHE", str(tmp_path))
    assert dataset.cache_dir() == tmp_path


def test_an_unpacked_file_is_used_only_when_its_content_is_proven(tmp_path):
    """No stamp to trust: the cache's file itself must hash to the listed sum. A file of the
    right size but other bytes, and a cut file under an old stamp rewritten to its size, are
    both unpacked again."""
    cache = tmp_path / "cache"
    dataset.prepare_raw(dataset.DATA_DIR, cache)
    raw = cache / "MNIST" / "raw"
    labels, images = raw / "t10k-labels-idx1-ubyte", raw / "t10k-images-idx3-ubyte"
    whole_labels, whole_images = labels.read_bytes(), images.read_bytes()
    labels.write_bytes(whole_labels[:16] + bytes(len(whole_labels) - 16))  # same size
    images.write_bytes(whole_images[:1000])
    (raw / "t10k-images-idx3-ubyte.sha256").write_text("anything 1000")
    dataset.prepare_raw(dataset.DATA_DIR, cache)
    assert labels.read_bytes() == whole_labels and images.read_bytes() == whole_images


def test_an_image_over_pils_pixel_limit_is_one_error_and_no_warning(tmp_path, monkeypatch):
    """PIL warns of an image over its limit (and refuses one twice over): both are the same one
    refusal, with no warning line printed above it."""
    import warnings
    for side in (12, 20):  # 144 pixels: PIL's warning; 400: its error (limit 100)
        path = tmp_path / f"{side}.png"
        Image.new("L", (side, side)).save(path)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(UserError, match=rf"cannot read image .*{side}\.png: .*pixels"):
                dataset.read_folder_image(str(path), 16, 1)
        assert caught == []
        monkeypatch.undo()


def test_a_class_folder_that_cannot_be_listed_says_so(tmp_path, monkeypatch):
    """ImageFolder passes over a folder it may not list; the error names that, not "no image
    file" (a stand-in for the permission: root, as in CI, lists any folder)."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.new("L", (8, 8)).save(tmp_path / name / "0.png")
    real_listdir, real_scandir = os.listdir, os.scandir
    locked = str(tmp_path / "b")

    def denied(path="."):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(os, "listdir", lambda p=".": denied(p) if str(p) == locked else real_listdir(p))
    monkeypatch.setattr(os, "scandir", lambda p=".": denied(p) if str(p) == locked else real_scandir(p))
    with pytest.raises(UserError, match=r"b cannot be read \(Permission denied\)"):
        dataset.load_image_folder(tmp_path, 8, log=lambda *a: None)
