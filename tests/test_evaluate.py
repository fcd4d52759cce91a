import numpy as np
import pytest
import torch

from diffusion101 import evaluate
from diffusion101.classifier import classify
from diffusion101.config import UserError
from diffusion101.dataset import load_mnist, resize_uint8
from diffusion101.fid import feature_stats, frechet_distance

from conftest import run_script


@pytest.fixture(scope="module")
def test_digits():
    return load_mnist(train=False, img_size=28)


def test_shipped_classifier_reads_test_digits(test_digits):
    clf, blob = evaluate.load_classifier()
    assert blob["test_accuracy"] >= 0.993
    m = evaluate.score(evaluate.uint8_to_unit(test_digits.images[:2000]), test_digits.labels[:2000])
    assert m["accuracy"] >= 0.99


def test_self_fid_is_zero_and_noise_is_far_above_floor(test_digits):
    clf, blob = evaluate.load_classifier()
    x = evaluate.uint8_to_unit(test_digits.images)
    _, feats = classify(clf, x)
    mu, sigma = feature_stats(feats)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    # the stored test statistics are these very features
    assert frechet_distance(mu, sigma, blob["test_mu"], blob["test_sigma"]) < 1e-6
    noise = torch.rand(2000, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    m = evaluate.score(noise, evaluate.test_set_labels(2000))
    assert m["fid"] > 20 * m["fid_floor_mean"]
    assert m["accuracy"] < 0.5


def test_resized_48_and_back_scores_like_real_digits(test_digits):
    # The reference generates 48x48: scoring resizes to 28x28 (antialiased) first.
    idx = torch.randperm(10000, generator=torch.Generator().manual_seed(3))[:2000]
    big = evaluate.uint8_to_unit(resize_uint8(test_digits.images[idx], 48))
    m = evaluate.score(big[:, None], test_digits.labels[idx])
    assert m["accuracy"] >= 0.99
    assert m["floor_n"] == 2000 and m["fid"] <= 2 * m["fid_floor_mean"]
    # training digits at 48 px score like the floor too: the comparison is resolution-fair
    train = load_mnist(train=True, img_size=28)
    j = torch.randperm(60000, generator=torch.Generator().manual_seed(4))[:2000]
    m = evaluate.score(evaluate.uint8_to_unit(resize_uint8(train.images[j], 48)), train.labels[j])
    assert m["fid"] <= 2 * m["fid_floor_mean"], m["fid"]


def test_npz_round_trip(tmp_path, test_digits):
    path = tmp_path / "s.npz"
    np.savez(path, images=test_digits.images[:500].numpy(), labels=test_digits.labels[:500].numpy())
    m = evaluate.evaluate_npz(path)
    assert m["n"] == 500 and m["accuracy"] >= 0.98
    np.savez(path, images=np.zeros((3, 28, 28), np.float32), labels=np.zeros(3, np.int64))
    with pytest.raises(UserError, match="uint8"):
        evaluate.evaluate_npz(path)


def test_the_evaluate_command_on_a_tiny_model(tmp_path, capsys):
    # (in-process, an untrained tiny model; benchmarks/gpu_check.py's dry run, tested in
    # test_gpu_check.py, runs the train and evaluate scripts one after the other.) At 28 px,
    # where the test set's stored statistics apply (at tiny's own 16 px the command would first
    # classify all 10,000 test digits resized: the 48 px test above covers that).
    import json
    from diffusion101 import checkpoint
    from diffusion101.commands import evaluate as evaluate_command
    from diffusion101.presets import get_preset
    from diffusion101.unet import UNet
    cfg = get_preset("tiny")
    cfg.model.img_size = 28
    checkpoint.save(checkpoint.model_file(cfg, "tiny", {"model": UNet(cfg.model).state_dict(),
                                                        "step": 3}), tmp_path / "m.pt")
    evaluate_command(["--ckpt", str(tmp_path / "m.pt"), "--n", "40", "--sampler", "ddim",
                      "--steps", "5", "--json", str(tmp_path / "r.json")])
    m = json.loads((tmp_path / "r.json").read_text())
    assert m["n"] == 40 and 0 <= m["accuracy"] <= 1 and m["fid"] > 0 and m["images_per_second"] > 0
    assert sorted(m["per_digit_accuracy"]) == [str(d) for d in range(10)]
    assert "conditional accuracy" in capsys.readouterr().out


def test_generation_batch_size_does_not_change_deterministic_samples():
    # The CPU default batch (100) is chosen for speed; with a deterministic sampler it must not
    # change which digits come out: the start noise is drawn in the same order either way.
    from diffusion101.presets import get_preset
    from diffusion101.unet import UNet
    cfg = get_preset("tiny")
    model = UNet(cfg.model).eval()
    import dataclasses
    sc = dataclasses.replace(cfg.sample, sampler="ddim", steps=5, guidance=1.0)
    a, la, _ = evaluate.generate_images(model, cfg, 30, "cpu", 3, sc, batch_size=7)
    b, lb, _ = evaluate.generate_images(model, cfg, 30, "cpu", 3, sc, batch_size=30)
    assert torch.equal(la, lb) and a.shape == (30, 1, 16, 16)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)  # float32 GEMM blocking differs by batch


def test_npz_that_cannot_be_scored_is_refused_with_one_line(tmp_path, test_digits):
    good_images = test_digits.images[:20].numpy()
    good_labels = test_digits.labels[:20].numpy()
    cases = {
        "empty": (np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.int64), "uint8 \\(N, H, W\\)"),
        "one image": (good_images[:1], good_labels[:1], "at least 10"),
        "labels (N, 1)": (good_images, good_labels[:, None], "labels must be integers"),
        "string labels": (good_images, good_labels.astype(str), "labels must be integers"),
        "labels past 9": (good_images, good_labels + 5, "0..9"),
        "negative labels": (good_images, good_labels - 10, "0..9"),
        "one label short": (good_images, good_labels[:-1], "labels must be integers"),
    }
    for name, (images, labels, message) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, images=images, labels=labels)
        with pytest.raises(UserError, match=message):
            evaluate.evaluate_npz(path)
    np.savez(tmp_path / "ok.npz", images=good_images, labels=good_labels)
    data = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cannot be read"):
        evaluate.evaluate_npz(tmp_path / "cut.npz")
    np.savez(tmp_path / "nolabels.npz", images=good_images)
    with pytest.raises(UserError, match="no 'labels'"):
        evaluate.evaluate_npz(tmp_path / "nolabels.npz")
    assert evaluate.evaluate_npz(tmp_path / "ok.npz")["n"] == 20


def test_evaluate_json_with_the_shipped_checkpoint(tmp_path):
    # no --ckpt and no model.pt: the shipped student, whose path must still go into the JSON
    run_script("evaluate", "--n", "10", "--steps", "2", "--json", "r.json",
               cwd=tmp_path)
    import json
    m = json.loads((tmp_path / "r.json").read_text())
    assert m["ckpt"].endswith("cpu_student.safetensors") and m["n"] == 10 and m["steps"] == 2


def test_generated_labels_follow_the_test_sets_proportions(test_digits):
    counts = torch.bincount(test_digits.labels, minlength=10).double()
    for n in (10, 37, 2000, 10000):
        labels = evaluate.test_set_labels(n)
        got = torch.bincount(labels, minlength=10).double()
        assert len(labels) == n and labels.min() >= 0 and labels.max() <= 9
        assert (got - counts / counts.sum() * n).abs().max() < 1  # largest remainder: within 1
    assert evaluate.test_set_labels(20)[:10].tolist() == list(range(10))  # interleaved
    assert torch.equal(torch.bincount(evaluate.test_set_labels(10000), minlength=10),
                       torch.bincount(test_digits.labels, minlength=10))  # N = 10,000: exactly the test set


def test_an_npz_is_read_within_limits_whatever_it_claims(tmp_path, test_digits):
    # read the headers first: a claim of 71 TiB, a member that is no array, a stream that does
    # not inflate, images too big or not square are refused before any array is allocated
    import io
    import zipfile
    images, labels = test_digits.images[:20].numpy(), test_digits.labels[:20].numpy()

    def npz(path, members: dict, compress=zipfile.ZIP_STORED):
        with zipfile.ZipFile(path, "w", compress) as zf:
            for name, data in members.items():
                zf.writestr(name, data)
        return path

    def npy(array=None, header=None) -> bytes:
        f = io.BytesIO()
        if header is None:
            np.save(f, array)
        else:
            np.lib.format.write_array_header_1_0(f, header)
        return f.getvalue()
    huge = {"descr": "|u1", "fortran_order": False, "shape": (10 ** 7, 2800, 2800)}  # 71 TiB
    cases = {
        "claims 71 TiB": ({"images.npy": npy(header=huge), "labels.npy": npy(labels)}, "claims"),
        "no array": ({"images.npy": b"just text", "labels.npy": npy(labels)}, "cannot be read"),
        "too big": ({"images.npy": npy(np.zeros((10, 300, 300), np.uint8)), "labels.npy": npy(labels[:10])},
                    "square images of 8 to 256"),
        "not square": ({"images.npy": npy(np.zeros((10, 28, 32), np.uint8)), "labels.npy": npy(labels[:10])},
                       "square images"),
    }
    for name, (members, message) in cases.items():
        with pytest.raises(UserError, match=message):
            evaluate.evaluate_npz(npz(tmp_path / f"{name}.npz", members))
    good = npz(tmp_path / "deflated.npz", {"images.npy": npy(images), "labels.npy": npy(labels)},
               zipfile.ZIP_DEFLATED)
    assert evaluate.evaluate_npz(good)["n"] == 20
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as zf:
        start = zf.getinfo("images.npy").header_offset + 30 + len("images.npy") + 200
    data[start:start + 64] = bytes(64)  # the deflate stream broken inside images.npy
    (tmp_path / "broken.npz").write_bytes(bytes(data))
    with pytest.raises(UserError, match="cannot be read"):
        evaluate.evaluate_npz(tmp_path / "broken.npz")


def _zip_of(path, members: dict, compress):
    import zipfile
    with zipfile.ZipFile(path, "w", compress) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _npy(array) -> bytes:
    import io
    f = io.BytesIO()
    np.save(f, array)
    return f.getvalue()


def _patched(path, central_offset: int, value: int, size: int):
    """The zip at `path` with a field of every central-directory entry (and of every local
    header, at its own offset) set to `value`: a flag or a compression method."""
    data = bytearray(path.read_bytes())
    local_offset = {8: 6, 10: 8}[central_offset]  # the same field in the local file header
    for signature, offset in ((b"PK\x01\x02", central_offset), (b"PK\x03\x04", local_offset)):
        start = 0
        while (start := data.find(signature, start)) != -1:
            data[start + offset:start + offset + size] = value.to_bytes(size, "little")
            start += 4
    path.write_bytes(bytes(data))
    return path


def test_every_npz_variant_is_read_correctly_or_refused_in_one_line(tmp_path, test_digits):
    """Big-endian labels, Fortran order, members compressed by deflate, bzip2 or lzma score as
    the plain file does; members flagged encrypted, or compressed by a method zipfile does
    not know, are one line."""
    import zipfile
    images, labels = test_digits.images[:200].numpy(), test_digits.labels[:200].numpy()
    plain = evaluate.evaluate_npz(_zip_of(tmp_path / "plain.npz", {
        "images.npy": _npy(images), "labels.npy": _npy(labels)}, zipfile.ZIP_STORED))
    variants = {
        "big-endian labels": ({"images.npy": _npy(images), "labels.npy": _npy(labels.astype(">i8"))},
                              zipfile.ZIP_STORED),
        "big-endian int32 labels, Fortran-order images": (
            {"images.npy": _npy(np.asfortranarray(images)), "labels.npy": _npy(labels.astype(">i4"))},
            zipfile.ZIP_DEFLATED),
        "bzip2": ({"images.npy": _npy(images), "labels.npy": _npy(labels)}, zipfile.ZIP_BZIP2),
        "lzma": ({"images.npy": _npy(images), "labels.npy": _npy(labels)}, zipfile.ZIP_LZMA),
    }
    for name, (members, compress) in variants.items():
        got = evaluate.evaluate_npz(_zip_of(tmp_path / f"{name}.npz", members, compress))
        assert got["accuracy"] == plain["accuracy"] and got["fid"] == pytest.approx(plain["fid"]), name
    members = {"images.npy": _npy(images), "labels.npy": _npy(labels)}
    for name, field, value, size, said in [("encrypted", 8, 0x1, 2, "encrypted"),
                                           ("method 99", 10, 99, 2, "compression method"),
                                           ("method 97 (WavPack)", 10, 97, 2, "compression method")]:
        bad = _patched(_zip_of(tmp_path / f"{name}.npz", members, zipfile.ZIP_STORED), field, value, size)
        with pytest.raises(UserError, match=rf"cannot be read as an npz of samples .*{said}"):
            evaluate.evaluate_npz(bad)


def test_an_npz_that_unpacks_beyond_the_memory_there_is_refused_unread(tmp_path, monkeypatch):
    """A few MB of compressed zeros that unpack to gigabytes, counted against what the process
    may take (here 1 GiB), before one array is read."""
    import zipfile

    from diffusion101 import memory
    monkeypatch.setattr(memory, "device_memory", lambda device: 2 ** 30)
    images = np.zeros((100_000, 64, 64), np.uint8)  # 410 MB, a few hundred KB compressed
    path = _zip_of(tmp_path / "zeros.npz", {"images.npy": _npy(images),
                                            "labels.npy": _npy(np.zeros(100_000, np.int64))},
                   zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 5_000_000
    with pytest.raises(UserError, match=r"100,000 images of 64 px, read and scored needs about "
                                        r"3\.4 GiB; this process may take 1\.0 GiB"):
        evaluate.evaluate_npz(path)


def test_an_npz_that_cannot_be_opened_says_why(tmp_path, monkeypatch):
    """Unreadable (no read permission: a stand-in, since root reads any file) is said as such,
    not as "no zip of arrays"."""
    path = tmp_path / "s.npz"
    np.savez(path, images=np.zeros((20, 28, 28), np.uint8), labels=np.zeros(20, np.int64))

    def denied(name, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(name))
    monkeypatch.setattr(evaluate, "open", denied, raising=False)
    with pytest.raises(UserError, match=r"s\.npz cannot be read \(Permission denied\)$"):
        evaluate.evaluate_npz(path)
