import os
import subprocess
import sys

import pytest
import torch

from diffusion101 import checkpoint
from diffusion101.config import UserError, get_preset
from diffusion101.unet import UNet

from conftest import ROOT


def _ckpt(seed=0):
    torch.manual_seed(seed)
    cfg = get_preset("tiny")
    model = UNet(cfg.model)
    return {"format": checkpoint.MODEL_FORMAT, "preset": "tiny", "config": cfg.to_dict(),
            "model": model.state_dict(), "epoch": 1, "step": 3, "step_in_epoch": 0}


def test_round_trip_under_weights_only(tmp_path):
    path = tmp_path / "model.pt"
    checkpoint.save(_ckpt(), path)
    raw = torch.load(path, weights_only=True)
    assert raw["step"] == 3 and raw["config"]["model"]["img_size"] == 16
    model, ckpt, cfg = checkpoint.load_model(path)
    for k, v in _ckpt()["model"].items():
        assert torch.equal(model.state_dict()[k], v)
    assert cfg.model.channels == (8, 16)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left


def test_fingerprint_tracks_weights():
    a, b = _ckpt(0)["model"], _ckpt(1)["model"]
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
        checkpoint.load_model(path)
    assert not marker.exists()


def test_whole_module_pickle_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(UNet(get_preset("tiny").model), path)  # what the reference saved
    with pytest.raises(UserError, match="pickled Python objects"):
        checkpoint.load_model(path)


def test_truncated_and_foreign_files(tmp_path):
    path = tmp_path / "model.pt"
    checkpoint.save(_ckpt(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        checkpoint.load_model(path)
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="truncated or corrupt"):
        checkpoint.load_model(path)
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(UserError, match="not a Diffusion-101 model checkpoint"):
        checkpoint.load_model(path)
    with pytest.raises(UserError, match="not found"):
        checkpoint.load_model(tmp_path / "absent.pt")


def test_weights_of_another_architecture_refused(tmp_path):
    ckpt = _ckpt()
    ckpt["config"]["model"]["channels"] = [8, 32]  # config says one thing, weights another
    checkpoint.save(ckpt, tmp_path / "m.pt")
    with pytest.raises(UserError, match="does not fit this architecture"):
        checkpoint.load_model(tmp_path / "m.pt")


def test_crash_between_write_and_replace_keeps_previous(tmp_path):
    path = tmp_path / "model.pt"
    checkpoint.save(_ckpt(0), path)
    before = path.read_bytes()
    code = ("import torch, sys; sys.path.insert(0, sys.argv[2]); from diffusion101 import checkpoint;"
            "checkpoint.save({'format': 'x', 'model': torch.ones(1000)}, sys.argv[1])")
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(ROOT)],
                          env=dict(os.environ, DIFFUSION101_FAULT="kill_before_replace"))
    assert proc.returncode == -9  # SIGKILL, after the temporary file was written and synced
    assert path.read_bytes() == before
    model, ckpt, _ = checkpoint.load_model(path)
    assert ckpt["step"] == 3


def test_save_into_missing_folder_is_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        checkpoint.save(_ckpt(), tmp_path / "nope" / "model.pt")


def test_export_keeps_the_ema_weights_only(tmp_path):
    full = _ckpt(0)
    full["ema"] = _ckpt(1)["model"]
    full["optimizer"] = {"state": {}, "param_groups": []}
    checkpoint.save(full, tmp_path / "full.pt")
    checkpoint.export_for_sampling(tmp_path / "full.pt", tmp_path / "slim.pt",
                                   ["sample.guidance=3"], log=lambda *a: None)
    model, slim, cfg = checkpoint.load_model(tmp_path / "slim.pt")
    assert cfg.sample.guidance == 3.0
    with pytest.raises(UserError, match="only change sampler defaults"):
        checkpoint.export_for_sampling(tmp_path / "full.pt", tmp_path / "x.pt", ["model.norm=group"])
    with pytest.raises(UserError, match=r"sample\.guidance"):
        checkpoint.export_for_sampling(tmp_path / "full.pt", tmp_path / "x.pt", ["sample.guidance=nan"])
    assert not (tmp_path / "x.pt").exists()
    assert "optimizer" not in slim and "ema" not in slim and slim["exported_from_ema"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in full["ema"].items())
    # an adapter trained on the full checkpoint fits its export: same base fingerprint
    assert checkpoint.base_fingerprint(full) == checkpoint.base_fingerprint(slim)
    assert checkpoint.base_fingerprint(full) != checkpoint.fingerprint(full["model"])


def test_default_checkpoint_prefers_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    said = []
    assert checkpoint.default_checkpoint("x.pt", log=said.append) == "x.pt"
    assert checkpoint.default_checkpoint(None, log=said.append) == checkpoint.SHIPPED_PATH
    assert "shipped checkpoint" in said[0]
    (tmp_path / "model.pt").write_bytes(b"")
    assert checkpoint.default_checkpoint(None, log=said.append) == "model.pt"


def test_converter_reads_reference_format_files_and_the_result_samples(tmp_path):
    # The reference's files: a bare state dict, or the whole pickled module, with its names
    # (the same as the package's but for the timestep buffer, `half_emb` there).
    from diffusion101.denoise import sample_digits
    from diffusion101.diffusion import make_scheduler
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    model = UNet(cfg.model)
    ours = {k: v.clone() for k, v in model.state_dict().items()}
    embedding = model.time_emb[0]
    embedding.register_buffer("half_emb", embedding._buffers.pop("freqs"))
    assert "time_emb.0.half_emb" in model.state_dict() and "time_emb.0.freqs" not in model.state_dict()
    torch.save(model.state_dict(), tmp_path / "state.pt")
    torch.save(model, tmp_path / "module.pt")
    for name in ("state", "module"):
        checkpoint.convert_pickled(tmp_path / f"{name}.pt", tmp_path / f"{name}_new.pt", "tiny",
                                   trusted=True, log=lambda *a: None)
        converted, _, ccfg = checkpoint.load_model(tmp_path / f"{name}_new.pt")
        for k, v in converted.state_dict().items():
            assert torch.equal(v, ours[k]), (name, k)
        images, _ = sample_digits(converted.eval(), make_scheduler("ddpm", ccfg.diffusion),
                                  range(10), 1, 0, "cpu")
        assert images.shape == (10, 1, 16, 16) and torch.isfinite(images).all()
