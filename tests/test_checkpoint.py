import os
import subprocess
import sys

import pytest
import torch

from diffusion101 import checkpoint
from diffusion101 import model_files as models
from diffusion101.config import UserError, get_preset
from diffusion101.unet import UNet

from conftest import ROOT, tiny_checkpoint


def test_round_trip_under_weights_only(tmp_path):
    path = tmp_path / "model.pt"
    checkpoint.save(tiny_checkpoint(), path)
    raw = torch.load(path, weights_only=True)
    assert raw["step"] == 3 and raw["config"]["model"]["img_size"] == 16
    model, ckpt, cfg = models.load_model(path)
    for k, v in tiny_checkpoint()["model"].items():
        assert torch.equal(model.state_dict()[k], v)
    assert cfg.model.channels == (8, 16)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left


def test_fingerprint_tracks_weights():
    a, b = tiny_checkpoint(0)["model"], tiny_checkpoint(1)["model"]
    # equal for the same numbers in other tensors and another key order ...
    copy = {k: a[k].clone() for k in reversed(list(a))}
    assert checkpoint.fingerprint(a) == checkpoint.fingerprint(copy)
    assert checkpoint.fingerprint(a) != checkpoint.fingerprint(b)
    assert len(checkpoint.fingerprint(a)) == 64
    # ... and different when one number moves by one float32 step, or a name changes
    key = next(k for k, v in a.items() if v.is_floating_point())
    nudged = dict(copy)
    nudged[key] = copy[key].clone()
    nudged[key].view(-1)[0] = torch.nextafter(nudged[key].view(-1)[0], torch.tensor(float("inf")))
    assert checkpoint.fingerprint(nudged) != checkpoint.fingerprint(a)
    renamed = {("x." + k if k == key else k): v for k, v in copy.items()}
    assert checkpoint.fingerprint(renamed) != checkpoint.fingerprint(a)


class _Payload:
    """Unpickling this would create a marker file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"model": _Payload(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(UserError, match="pickled Python objects.*convert"):
        models.load_model(path)
    assert not marker.exists()


def test_whole_module_pickle_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(UNet(get_preset("tiny").model), path)  # what the reference saved
    with pytest.raises(UserError, match="pickled Python objects"):
        models.load_model(path)


def test_truncated_and_foreign_files(tmp_path):
    path = tmp_path / "model.pt"
    checkpoint.save(tiny_checkpoint(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        models.load_model(path)
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="truncated or corrupt"):
        models.load_model(path)
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(UserError, match="not a Diffusion-101 model checkpoint"):
        models.load_model(path)
    with pytest.raises(UserError, match="not found"):
        models.load_model(tmp_path / "absent.pt")


def test_weights_of_another_architecture_refused(tmp_path):
    ckpt = tiny_checkpoint()
    ckpt["config"]["model"]["channels"] = [8, 32]  # config says one thing, weights another
    checkpoint.save(ckpt, tmp_path / "m.pt")
    with pytest.raises(UserError, match="does not fit this architecture"):
        models.load_model(tmp_path / "m.pt")


def test_crash_between_write_and_replace_keeps_previous(tmp_path):
    path = tmp_path / "model.pt"
    checkpoint.save(tiny_checkpoint(0), path)
    before = path.read_bytes()
    code = ("import torch, sys; sys.path.insert(0, sys.argv[2]); from diffusion101 import checkpoint;"
            "checkpoint.save({'format': 'x', 'model': torch.ones(1000)}, sys.argv[1])")
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(ROOT)],
                          env=dict(os.environ, DIFFUSION101_FAULT="kill_before_replace"))
    assert proc.returncode == -9  # SIGKILL, after the temporary file was written and synced
    assert path.read_bytes() == before
    model, ckpt, _ = models.load_model(path)
    assert ckpt["step"] == 3


def test_save_into_missing_folder_is_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        checkpoint.save(tiny_checkpoint(), tmp_path / "nope" / "model.pt")
