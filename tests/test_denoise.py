import dataclasses

import pytest
import torch

from diffusion101.config import SampleConfig, UserError
from diffusion101.presets import get_preset
from conftest import sampler_by_name
from diffusion101.denoise import Guide, cpu_generator, grid_labels, predict, sample, sample_classes
from diffusion101.diffusion import DDPMSampler
from diffusion101.unet import UNet


def _model():
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    return UNet(cfg.model).eval(), DDPMSampler(cfg.diffusion), cfg.sample


def _ddim10(**changes):
    """DDIM over the tiny preset's 100 timesteps, ten steps (99, 88, ..., 0) unless changed."""
    cfg = get_preset("tiny")
    sc = dataclasses.replace(cfg.sample, **{"sampler": "ddim", "steps": 10, **changes})
    return sampler_by_name("ddim", cfg.diffusion, steps=sc.steps), sc


def test_sample_shapes_frames_and_range():
    model, sched, sc = _model()
    images, frames = sample_classes(model, sched, sc, [0, 3, 7], 2, seed=1, device="cpu", n_frames=20)
    assert images.shape == (6, 1, 16, 16) and frames.shape == (6, 20, 1, 16, 16)
    assert images.min() >= -1 and images.max() <= 1  # the reference's per-step clamp
    assert torch.equal(frames[:, -1], images)  # the last frame is the result


def test_same_seed_same_images_other_seed_other_images():
    model, sched, sc = _model()
    a, _ = sample_classes(model, sched, sc, range(10), 1, seed=4, device="cpu")
    b, _ = sample_classes(model, sched, sc, range(10), 1, seed=4, device="cpu")
    c, _ = sample_classes(model, sched, sc, range(10), 1, seed=5, device="cpu")
    assert torch.equal(a, b) and not torch.equal(a, c)


class Zero(torch.nn.Module):
    """A network that predicts zero noise, for 16 px grey images."""
    cfg = get_preset("tiny").model

    def forward(self, x, t, y):
        return torch.zeros_like(x)


def test_sampler_loop_is_model_then_scheduler_step():
    # One DDIM step (eta 0) from t = 99 to the end with a model that predicts zero noise
    # returns x0_hat = x_T / sqrt(alpha_bar_99), clamped by the reference's x_t clip.
    sched, sc = _ddim10(steps=1)
    x_start = torch.randn((2, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    out, _ = sample(Zero(), sched, torch.tensor([1, 2]), sc, torch.Generator().manual_seed(0))
    assert torch.allclose(out, (x_start / sched.sqrt_alpha_bar[-1]).clamp(-1, 1))


def test_the_loop_sets_the_timesteps_it_walks():
    # the loop's owner resets the walk: a sampler left at other steps walks sc.steps
    sched, sc = _ddim10(steps=4)
    sched.set_timesteps(7)
    seen = []

    class Record(Zero):
        def forward(self, x, t, y):
            seen.append(int(t[0]))
            return super().forward(x, t, y)
    sample(Record(), sched, torch.tensor([0]), sc)
    assert seen == [99, 66, 33, 0]


def _guided_model(norm="group", tokens=1):
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    cfg.model.null_class, cfg.model.norm, cfg.model.cond_tokens = True, norm, tokens
    return UNet(cfg.model).eval()


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_guidance_one_is_the_conditional_prediction(norm):
    model = _guided_model(norm)
    x, y = torch.randn(4, 1, 16, 16), torch.tensor([0, 4, 8, 9])
    sampler = DDPMSampler(get_preset("tiny").diffusion)
    with torch.no_grad():
        for t in (5, 50, 99):
            t_batch = torch.full((4,), t)
            cond, uncond = model(x, t_batch, y), model(x, t_batch, torch.full_like(y, 10))
            for w, want in ((1.0, cond), (0.0, uncond), (3.0, uncond + 3 * (cond - uncond))):
                out = predict(model, sampler, x, t, y, SampleConfig(guidance=w))
                assert torch.allclose(out, want, atol=1e-5)


def test_guidance_needs_a_null_class():
    model, sched, sc = _model()
    with pytest.raises(UserError, match="null class"):
        sample_classes(model, sched, dataclasses.replace(sc, guidance=2.0), [1], 1, seed=0,
                      device="cpu")


def test_guidance_interval_guides_only_the_steps_inside_it():
    # A wrapper records the doubled (guided) forwards: with 10 DDIM steps over T = 100 the
    # timesteps are 99, 88, ..., 0, so t/T in [0.25, 0.65] holds t = 55, 44, 33.
    model = _guided_model()

    class Count(torch.nn.Module):
        null_label, cfg = model.null_label, model.cfg

        def __init__(self):
            super().__init__()
            self.guided_t = []

        def forward(self, x, t, y):
            if len(x) == 2 * 3:
                self.guided_t.append(int(t[0]))
            return model(x, t, y)

    sched, sc = _ddim10(guidance=2.0, guidance_interval=(0.25, 0.65))
    assert sched.timesteps.tolist() == list(range(99, -1, -11))
    counter = Count()
    sample_classes(counter, sched, sc, [1, 2, 3], 1, seed=0, device="cpu")
    assert counter.guided_t == [55, 44, 33]


def test_empty_guidance_interval_is_the_conditional_sampler():
    model = _guided_model()
    sched, plain_sc = _ddim10()
    plain, _ = sample_classes(model, sched, plain_sc, [1, 2, 3], 1, seed=0, device="cpu")
    none, _ = sample_classes(model, sched, _ddim10(guidance=3.0, guidance_interval=(1.0, 1.0))[1],
                            [1, 2, 3], 1, seed=0, device="cpu")  # t/T < 1 for every step
    full, _ = sample_classes(model, sched, _ddim10(guidance=3.0)[1], [1, 2, 3], 1, seed=0,
                            device="cpu")
    assert torch.equal(plain, none) and not torch.allclose(plain, full, atol=1e-3)


def test_a_walk_guided_by_the_model_itself_is_the_conditional_walk():
    model = _guided_model("group")
    cfg = get_preset("tiny")
    cfg.diffusion.prediction = "v"
    sched = sampler_by_name("ddim", cfg.diffusion, steps=10)
    plain = SampleConfig(sampler="ddim", steps=10)
    auto = dataclasses.replace(plain, guidance=3.0, guidance_rule="auto", guide="self")
    a, _ = sample_classes(model, sched, plain, [1, 5], 1, seed=2, device="cpu")
    b, _ = sample(model, sched, grid_labels([1, 5], 1, "cpu"), auto, cpu_generator(2),
                  guide=Guide(model, "v"))
    assert torch.allclose(a, b, atol=1e-4)
    with pytest.raises(UserError, match="needs a guide network"):
        sample_classes(model, sched, auto, [1], 1, seed=2, device="cpu")
    # apg's momentum lives for one walk: the same walk twice gives the same images
    apg = dataclasses.replace(plain, guidance=3.0, guidance_rule="apg", apg_momentum=-0.5)
    c, _ = sample_classes(model, sched, apg, [1, 5], 1, seed=2, device="cpu")
    d, _ = sample_classes(model, sched, apg, [1, 5], 1, seed=2, device="cpu")
    assert torch.equal(c, d) and not torch.allclose(a, c, atol=1e-3)
