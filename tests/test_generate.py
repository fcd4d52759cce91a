"""The sampling job (diffusion101/generate.py): sampler options resolved against the
checkpoint's own, and what the job writes: the digits it drew before the redesigns."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion101.settings import parse_value
from diffusion101.config import Config, UserError
from diffusion101.presets import get_preset
from diffusion101.generate import Outputs, generate, load_for_sampling, resolve_sampler
from diffusion101.evaluate import evaluate_model
from diffusion101.images import PADDING
from diffusion101.model_files import SHIPPED_PATH


@pytest.mark.parametrize("bad", ["0.5", "a,b", "0.7,0.2", "-0.1,0.5", "0,1.5"])
def test_bad_guidance_interval(bad):
    cfg = get_preset("cpu-ddpm")
    with pytest.raises(UserError):
        resolve_sampler(cfg, guidance_interval=parse_value(bad, (0.0, 1.0)))  # as the flag reads it
    assert resolve_sampler(cfg, guidance_interval=parse_value("0.1,0.7", (0.0, 1.0))).guidance_interval == (0.1, 0.7)


def test_options_left_at_none_keep_the_checkpoints_and_another_sampler_gets_its_steps():
    cfg = get_preset("cpu-ddpm")
    assert resolve_sampler(cfg) == cfg.sample
    assert resolve_sampler(cfg, sampler="ddim").steps == 25
    assert resolve_sampler(cfg, sampler="ddpm").steps == cfg.diffusion.timesteps
    assert resolve_sampler(cfg, timestep_spacing="logsnr", guidance_rule="cfg").timestep_spacing == "logsnr"
    with pytest.raises(UserError, match="sample.guidance_rule"):
        resolve_sampler(cfg, guidance_rule="xyz")
    assert resolve_sampler(cfg, guidance_rule="apg", apg_eta=0.5).apg_eta == 0.5
    with pytest.raises(UserError, match="unknown sampler option 'apg_beta'"):
        resolve_sampler(cfg, apg_beta=0.5)
    with pytest.raises(UserError, match="needs sample.guide"):
        resolve_sampler(cfg, guidance_rule="auto")


# What `diffusion101-sample --seed 0 --npz g.npz` gave from the shipped checkpoint before the
# redesigns (the npz's digits 0-9, uint8). Another CPU sums floats in another order, and a
# 20-step walk carries such differences to the last bit of a pixel, so the check allows what
# reordering does (a pixel one level off, rarely more) and not what a changed sampler does.
REFERENCE = Path(__file__).parent / "data" / "shipped_seed0.npz"


def test_the_shipped_checkpoint_still_samples_its_reference_digits(tmp_path):
    model = load_for_sampling(SHIPPED_PATH, "cpu")
    images = generate(model, model.config.sample, list(range(10)), 1, 0,
                      Outputs(tmp_path / "g.png", npz=tmp_path / "g.npz"), log=lambda *a: None)
    assert images.shape == (10, 1, 28, 28)
    got, want = np.load(tmp_path / "g.npz"), np.load(REFERENCE)
    assert got["labels"].tolist() == want["labels"].tolist() == list(range(10))
    off = np.abs(got["images"].astype(int) - want["images"].astype(int))
    assert (off <= 1).mean() >= 0.999 and off.max() <= 8, (np.bincount(off.ravel()), off.max())
    # the grid shows the npz's digits, bit for bit: one row of 28 px tiles, 2 px apart
    grid = np.asarray(Image.open(tmp_path / "g.png").convert("L"))
    tiles = [grid[PADDING:PADDING + 28, PADDING + 30 * i:PADDING + 30 * i + 28] for i in range(10)]
    assert np.array_equal(np.stack(tiles), got["images"])


def _tiny_file(path, **change):
    """A tiny model file with fields of its config changed ('model.img_size': 32, ...)."""
    from diffusion101 import checkpoint
    from diffusion101.unet import UNet
    cfg = get_preset("tiny")
    for key, value in change.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    torch.manual_seed(0)
    checkpoint.save(checkpoint.model_file(cfg, "tiny", {"model": UNet(cfg.model).state_dict()}), path)
    return str(path)


def test_a_guide_must_draw_the_same_images_at_the_same_noise_levels(tmp_path):
    from diffusion101.generate import load_guide
    model = load_for_sampling(_tiny_file(tmp_path / "m.pt"), "cpu", log=lambda *a: None)
    v_guide = _tiny_file(tmp_path / "v.pt", **{"diffusion.prediction": "v"})
    guide = load_guide(resolve_sampler(model.config, guidance_rule="auto", guidance=2,
                                       guide=v_guide), model)
    assert guide.prediction == "v" and not guide.net.training  # another prediction is fine
    assert load_guide(resolve_sampler(model.config, guidance_rule="cfg"), model) is None
    bad = {"size": ({"model.img_size": 32, "model.channels": (8, 16)}, "another image size"),
           "classes": ({"model.num_classes": 12}, "another classes"),
           "schedule": ({"diffusion.schedule": "cosine"}, "another noise schedule"),
           "length": ({"diffusion.timesteps": 200}, "another noise schedule"),
           "objective": ({"diffusion.objective": "flow", "sample.sampler": "euler",
                          "sample.steps": 4}, "another noise schedule")}
    for name, (change, match) in bad.items():
        path = _tiny_file(tmp_path / f"{name}.pt", **change)
        with pytest.raises(UserError, match=match):
            load_guide(resolve_sampler(model.config, guidance_rule="auto", guidance=2, guide=path),
                       model)
    with pytest.raises(UserError, match="checkpoint not found"):
        load_guide(resolve_sampler(model.config, guidance_rule="auto", guidance=2,
                                   guide="absent.pt"), model)


class NaNNet(torch.nn.Module):
    """A network whose every prediction is NaN (as an unstable schedule or a huge adapter
    gives), for 16 px grey images."""
    cfg = get_preset("tiny").model
    null_label = None

    def forward(self, x, t, y):
        return torch.full_like(x, float("nan"))


def test_samples_that_came_out_nan_are_refused_and_nothing_is_written(tmp_path):
    import diffusion101 as d
    from diffusion101.generate import Pipeline
    cfg = get_preset("tiny")
    model = Pipeline(NaNNet(), cfg, torch.device("cpu"))
    outputs = Outputs(tmp_path / "g.png", npz=tmp_path / "g.npz", gif=tmp_path / "g.gif")
    with pytest.raises(UserError, match="2 of 2 samples came out NaN or inf"):
        generate(model, cfg.sample, [1, 2], 1, 0, outputs, log=lambda *a: None)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="came out NaN or inf"):
        d.sample(model, classes=[3])
    with pytest.raises(UserError, match="10 of 10 samples came out NaN or inf.*nothing was scored"):
        evaluate_model(NaNNet(), cfg, 10, "cpu", 0)


def test_training_skips_a_grid_or_an_evaluation_whose_samples_came_out_nan():
    # the loss is finite (the sampler, not the weights, may be what failed): training goes on,
    # says so, and draws no black grid into TensorBoard
    from types import SimpleNamespace

    from diffusion101 import train
    images, logged = [], []
    writer = SimpleNamespace(add_image=lambda *a: images.append(a), add_scalar=lambda *a: images.append(a))
    run = SimpleNamespace(writer=writer, cfg=get_preset("tiny"), device="cpu", log=logged.append)
    state = SimpleNamespace(sampling_model=NaNNet, step=7, train_seconds=0.0, lap=lambda: None,
                            start_clock=lambda: None)
    train.log_grid(run, state)
    train.evaluate(run, state)
    assert images == [] and logged[-2] == "grid at step 7 not drawn: its samples came out NaN or inf"
    assert logged[-1].startswith("eval at step 7 skipped: 100 of 100 samples came out NaN")
