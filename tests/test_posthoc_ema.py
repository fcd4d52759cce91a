"""Post-hoc EMA (diffusion101/posthoc_ema.py): the EMA rebuilt from weight snapshots."""
import math

import pytest
import torch

from diffusion101 import checkpoint
from diffusion101.config import UserError, get_preset
from diffusion101.posthoc_ema import export_rebuilt, list_snapshots, rebuild, snapshot_folder
from diffusion101.train import train


def _run(tmp_path, fake_data, every: int, decay: float = 0.9, steps: int = 12) -> dict:
    """A 16 px run of the cpu recipe (EMA, BatchNorm) keeping snapshots every `every` steps."""
    cfg = get_preset("cpu")
    cfg.model.img_size, cfg.model.channels, cfg.model.time_emb_dim = 16, (8, 16), 16
    cfg.train.batch_size, cfg.train.warmup_steps, cfg.sample.steps = 16, 2, 2
    cfg.train.max_steps, cfg.train.ema_decay, cfg.train.snapshot_every = steps, decay, every
    cfg.train.grid_every = 0
    return train(cfg, "cpu", tmp_path / "m.pt", tmp_path / "runs", "cpu", data=fake_data,
                 log=lambda *a: None)


def test_the_ema_rebuilt_from_every_step_is_the_ema_training_kept(tmp_path, fake_data):
    saved = _run(tmp_path, fake_data, every=1)
    folder = snapshot_folder(tmp_path / "m.pt")
    assert folder.name == "m.snapshots"
    assert [step for step, _ in list_snapshots(folder)] == list(range(13))
    weights, last = rebuild(folder, 0.9)
    assert last["step"] == 12 and set(weights) == set(saved["ema"])
    for name, value in saved["ema"].items():
        assert torch.allclose(weights[name], value, atol=1e-6), name
    # decay 0 is no averaging at all: the last weights
    plain, _ = rebuild(folder, 0.0)
    assert all(torch.equal(plain[k], v) for k, v in saved["model"].items())
    # a snapshot samples like any model file, and the rebuilt EMA is one too
    out = export_rebuilt(folder, 0.9, tmp_path / "ema.safetensors", log=lambda *a: None)
    again = checkpoint.load_model_checkpoint(tmp_path / "ema.safetensors")
    assert out["exported_from_ema"] and again["config"]["train"]["ema_decay"] == 0.9
    assert all(torch.equal(again["model"][k], v) for k, v in weights.items())


def test_sparser_snapshots_fold_each_stretch_into_one_update(tmp_path, fake_data):
    saved = _run(tmp_path, fake_data, every=4)
    folder = snapshot_folder(tmp_path / "m.pt")
    assert [step for step, _ in list_snapshots(folder)] == [0, 4, 8, 12]
    weights, _ = rebuild(folder, 0.9)
    # the same average over each stretch's last weights: near the running EMA, not equal to it
    diff = max((weights[k] - v).abs().max().item() for k, v in saved["ema"].items()
               if v.is_floating_point())
    assert 0 < diff < 0.05
    # up to step 8 (an earlier EMA, e.g. a guide) is the rebuild of a folder that ends there
    early, last = rebuild(folder, gamma=5.0, until=9)
    assert last["step"] == 8
    (folder / "step_0000012.pt").rename(tmp_path / "moved.pt")
    alone, _ = rebuild(folder, gamma=5.0)
    assert all(torch.equal(early[k], v) for k, v in alone.items())
    assert not all(torch.equal(early[k], v) for k, v in weights.items())
    with pytest.raises(UserError, match="no snapshot after step 0 up to step 3"):
        rebuild(folder, 0.9, until=3)


def test_folders_that_cannot_be_rebuilt_are_refused(tmp_path, fake_data):
    with pytest.raises(UserError, match="snapshot folder not found"):
        rebuild(tmp_path / "absent", 0.9)
    _run(tmp_path, fake_data, every=4, steps=4)
    folder = snapshot_folder(tmp_path / "m.pt")
    (folder / "step_0000004.pt").unlink()
    with pytest.raises(UserError, match="holds 1 snapshot"):
        rebuild(folder, 0.9)
    with pytest.raises(UserError, match="the EMA decay must be"):
        rebuild(folder, 1.0)
    other = checkpoint.load_model_checkpoint(folder / "step_0000000.pt")
    other["config"]["model"]["channels"] = [8, 32]
    checkpoint.save(other, folder / "step_0000008.pt")
    with pytest.raises(UserError, match="another model"):
        rebuild(folder, 0.9)


def test_the_power_function_profile_weighs_step_s_as_s_to_the_gamma():
    from diffusion101.posthoc_ema import combined_decay, power_decay, sigma_rel
    # replaying the decays over steps 1..t on scalar 'weights' w_s = s: step s weighs
    # (s^(g+1) - (s-1)^(g+1)) / t^(g+1), the discrete s^g profile
    for gamma in (0.0, 3.0, 8.0):
        ema = 0.0
        for i in range(200):
            ema += (1 - power_decay(gamma, i)) * ((i + 1) - ema)
        s = torch.arange(1, 201, dtype=torch.float64)
        weights = (s ** (gamma + 1) - (s - 1) ** (gamma + 1)) / 200 ** (gamma + 1)
        assert abs(weights.sum().item() - 1) < 1e-12
        assert abs(ema - float((weights * s).sum())) < 1e-9
    assert power_decay(5.0, 0) == 0.0  # the first weights are dropped as soon as there are others
    assert combined_decay(0.0, 3, 7, gamma=2.0) == math.prod(power_decay(2.0, i) for i in range(3, 7))
    assert abs(sigma_rel(16.97) - 0.05) < 1e-3 and abs(sigma_rel(6.94) - 0.10) < 1e-3


def test_the_command_writes_an_earlier_ema_and_refuses_bad_flags(tmp_path, fake_data):
    from diffusion101.commands import posthoc_ema
    _run(tmp_path, fake_data, every=4, steps=8)
    folder = snapshot_folder(tmp_path / "m.pt")
    posthoc_ema([str(folder), str(tmp_path / "guide.pt"), "--gamma", "5", "--until", "4"])
    guide = checkpoint.load_model_checkpoint(tmp_path / "guide.pt")
    expected, _ = rebuild(folder, gamma=5.0, until=4)
    assert guide["step"] == 4 and all(torch.equal(guide["model"][k], v) for k, v in expected.items())
    for flags, message in ((["--gamma", "5", "--until", "0"], "--until must be"),
                           (["--gamma", "5", "--decay", "0.9"], "one of --decay and --gamma"),
                           (["--decay", "0.9", "--until", "3"], "no snapshot after step 0 up to step 3")):
        with pytest.raises(UserError, match=message):
            posthoc_ema([str(folder), str(tmp_path / "other.pt"), *flags])
    assert not (tmp_path / "other.pt").exists()
