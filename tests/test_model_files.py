"""Model files (diffusion101/model_files.py): export for sampling, the default checkpoint, the
converter."""
import pytest
import torch

from diffusion101 import checkpoint
from diffusion101 import model_files as models
from diffusion101.config import UserError
from diffusion101.presets import get_preset
from diffusion101.unet import UNet

from conftest import tiny_checkpoint


def test_export_keeps_the_ema_weights_only(tmp_path):
    full = tiny_checkpoint(0)
    full["ema"] = tiny_checkpoint(1)["model"]
    full["optimizer"] = {"state": {}, "param_groups": []}
    checkpoint.save(full, tmp_path / "full.pt")
    models.export_for_sampling(tmp_path / "full.pt", tmp_path / "slim.pt",
                               ["sample.sampler=ddim", "sample.steps=50"], log=lambda *a: None)
    model, slim, cfg = models.load_model(tmp_path / "slim.pt")
    assert cfg.sample.steps == 50
    with pytest.raises(UserError, match="DDPM samples with all 100 steps"):  # nothing written
        models.export_for_sampling(tmp_path / "full.pt", tmp_path / "x.pt", ["sample.steps=50"])
    with pytest.raises(UserError, match="only change sampler defaults"):
        models.export_for_sampling(tmp_path / "full.pt", tmp_path / "x.pt", ["model.norm=group"])
    with pytest.raises(UserError, match=r"sample\.guidance"):
        models.export_for_sampling(tmp_path / "full.pt", tmp_path / "x.pt", ["sample.guidance=nan"])
    assert not (tmp_path / "x.pt").exists()
    assert "optimizer" not in slim and "ema" not in slim and slim["exported_from_ema"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in full["ema"].items())
    # an adapter trained on the full checkpoint fits its export: same base fingerprint
    assert checkpoint.base_fingerprint(full) == checkpoint.base_fingerprint(slim)
    assert checkpoint.base_fingerprint(full) != checkpoint.fingerprint(full["model"])

def test_default_checkpoint_prefers_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    said = []
    assert models.default_checkpoint("x.pt", log=said.append) == "x.pt"
    assert models.default_checkpoint(None, log=said.append) == models.STUDENT_PATH
    assert "shipped student" in said[0]
    # with adapters, the checkpoint the shipped adapter was trained on
    assert models.default_checkpoint(None, log=said.append, adapters=True) == models.SHIPPED_PATH
    (tmp_path / "model.pt").write_bytes(b"")
    assert models.default_checkpoint(None, log=said.append) == "model.pt"

def test_converter_reads_reference_format_files_and_the_result_samples(tmp_path):
    # The reference's files: a bare state dict, or the whole pickled module, with its names
    # (the same as the package's but for the timestep buffer, `half_emb` there).
    from diffusion101.denoise import sample_classes
    from conftest import sampler_by_name
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
        models.convert_pickled(tmp_path / f"{name}.pt", tmp_path / f"{name}_new.pt", "tiny",
                                   trusted=True, log=lambda *a: None)
        converted, _, ccfg = models.load_model(tmp_path / f"{name}_new.pt")
        for k, v in converted.state_dict().items():
            assert torch.equal(v, ours[k]), (name, k)
        images, _ = sample_classes(converted.eval(), sampler_by_name("ddpm", ccfg.diffusion),
                                  ccfg.sample, range(10), 1, 0, "cpu")
        assert images.shape == (10, 1, 16, 16) and torch.isfinite(images).all()


@pytest.mark.parametrize("state, match", [
    ({1: torch.ones(2)}, "entry 1 has no string name"), ({"a": {"b": torch.ones(2)}}, "entry 'a' is a dict"),
    ({"w": "text"}, "entry 'w' is a str"), ([torch.ones(2)], "holds a list"),
])
def test_convert_refuses_what_is_no_state_dict_of_named_tensors_in_one_line(tmp_path, state, match):
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(UserError, match=match):
        models.convert_pickled(tmp_path / "old.pt", tmp_path / "new.pt", "tiny", trusted=True)
    assert not (tmp_path / "new.pt").exists()


def test_convert_of_a_file_of_this_project_keeps_its_own_config(tmp_path):
    """A Diffusion-101 checkpoint pickled by a script of its own (weights_only refuses it) is
    converted under its own config and preset, not --preset's: a flow model stays a flow
    model, a model of other classes keeps its classes."""
    for change in ({"diffusion": {"objective": "flow"}, "sample": {"sampler": "euler", "steps": 4}},
                   {"model": {"num_classes": 12}}):
        ckpt = tiny_checkpoint(0)
        for section, fields in change.items():
            ckpt["config"][section].update(fields)
        if "model" in change:  # weights of that architecture
            from diffusion101.checkpoint import config_of
            from diffusion101.unet import UNet
            ckpt["model"] = UNet(config_of(ckpt).model).state_dict()
        ckpt["note"] = object  # what weights_only refuses: a global
        torch.save(ckpt, tmp_path / "old.pt")
        new = tmp_path / f"new{len(list(tmp_path.glob('new*')))}.pt"
        models.convert_pickled(tmp_path / "old.pt", new, "reference", trusted=True, log=lambda *a: None)
        _, saved, cfg = models.load_model(new)
        assert saved["preset"] == "tiny"
        for section, fields in change.items():
            assert all(getattr(getattr(cfg, section), k) == v for k, v in fields.items())
