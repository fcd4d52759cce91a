"""Post-hoc EMA (diffusion101/posthoc_ema.py): the EMA rebuilt from weight snapshots."""
import math

import pytest
import torch

from diffusion101 import checkpoint
from diffusion101.config import UserError
from diffusion101.presets import get_preset
from diffusion101.posthoc_ema import export_rebuilt, list_snapshots, rebuild, snapshot_folder
from diffusion101.train_run import train


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


def test_a_rebuild_trusts_no_snapshot(tmp_path, fake_data):
    # another run's snapshot in the folder, a float16 or NaN one, a step name that would make
    # the decay loop run for hours: each refused, or computed in closed form
    from diffusion101.posthoc_ema import LOOP_LIMIT, combined_decay
    from diffusion101.ema import decay_at
    _run(tmp_path, fake_data, every=4, steps=8)
    folder = snapshot_folder(tmp_path / "m.pt")
    good = checkpoint.load_model_checkpoint(folder / "step_0000008.pt")
    for change, words in ((lambda s: s["config"]["train"].update(seed=99), "another run"),
                          (lambda s: s["model"].update(
                              {k: v.half() for k, v in s["model"].items() if v.is_floating_point()}),
                           "float16"),
                          (lambda s: next(v for v in s["model"].values()
                                          if v.is_floating_point()).fill_(float("nan")), "NaN")):
        bad = {**good, "config": {**good["config"], "train": dict(good["config"]["train"])},
               "model": {k: v.clone() for k, v in good["model"].items()}}
        change(bad)
        checkpoint.save(bad, folder / "step_0000012.pt")
        with pytest.raises(UserError, match=words):
            rebuild(folder, 0.9)
    (folder / "step_0000012.pt").unlink()
    checkpoint.save(good, folder / f"step_{10 ** 15}.pt")  # a huge step: at once, not for hours
    rebuild(folder, 0.999)
    rebuild(folder, gamma=7.0)
    # the closed forms are the products they replace
    for decay, start, stop in ((0.9, 0, LOOP_LIMIT + 7), (0.999, 5, LOOP_LIMIT + 500), (0.0, 2, LOOP_LIMIT + 2)):
        exact = math.prod(decay_at(decay, i) for i in range(start, stop))
        assert combined_decay(decay, start, stop) == pytest.approx(exact, rel=1e-9, abs=1e-300)
    exact = math.prod((1 - 1 / (i + 1)) ** 4.0 for i in range(50, LOOP_LIMIT + 50))
    assert combined_decay(0.0, 50, LOOP_LIMIT + 50, gamma=3.0) == pytest.approx(exact, rel=1e-9)


def test_a_second_run_into_the_same_out_and_an_output_among_the_snapshots_are_refused(tmp_path, fake_data):
    from diffusion101.cli import run_cli
    from diffusion101.commands import posthoc_ema
    _run(tmp_path, fake_data, every=4, steps=8)
    folder = snapshot_folder(tmp_path / "m.pt")
    before = sorted(p.name for p in folder.iterdir())
    assert run_cli(posthoc_ema, [str(folder), str(folder / "step_0000009.pt"), "--decay", "0.9"]) == 2
    assert sorted(p.name for p in folder.iterdir()) == before
    # a link outside that names a snapshot: written through, it would replace that snapshot
    first = sorted(folder.iterdir())[0]
    kept = first.read_bytes()
    (tmp_path / "ema.pt").symlink_to(first)
    assert run_cli(posthoc_ema, [str(folder), str(tmp_path / "ema.pt"), "--decay", "0.9"]) == 2
    assert first.read_bytes() == kept
    from diffusion101.commands import train as train_command
    saved = (tmp_path / "m.pt").read_bytes()
    assert run_cli(train_command, ["--preset", "tiny", "--set", "train.snapshot_every=4", "--out",
                                   str(tmp_path / "m.pt")]) == 2  # without --resume: a new run
    assert sorted(p.name for p in folder.iterdir()) == before and (tmp_path / "m.pt").read_bytes() == saved
