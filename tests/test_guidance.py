"""The guidance rules that mix predicted x_0 (diffusion101/guidance.py), beside plain
classifier-free guidance, which denoise.predict() computes inline."""
import dataclasses

import pytest
import torch

from diffusion101 import guidance
from diffusion101.config import SampleConfig, UserError
from diffusion101.presets import get_preset
from diffusion101.settings import validate
from diffusion101.diffusion import NoiseSchedule
from diffusion101.guidance import needs_uncond


def test_every_rule_is_a_config_choice_and_back():
    field = {f.name: f for f in dataclasses.fields(SampleConfig)}["guidance_rule"]
    assert set(field.metadata["choices"]) == {"cfg", "apg", "auto"}
    assert callable(guidance.apg) and callable(guidance.auto)  # cfg is one line in denoise.py
    assert SampleConfig().guidance_rule == "cfg"
    cfg = get_preset("cpu")
    cfg.sample.guidance_rule = "nope"
    with pytest.raises(UserError, match="sample.guidance_rule must be one of cfg, apg, auto"):
        validate(cfg)
    cfg.sample.guidance_rule = "auto"
    with pytest.raises(UserError, match="needs sample.guide"):
        validate(cfg)
    for name, value in (("apg_eta", 1.5), ("apg_momentum", -1.0), ("apg_momentum", 1.0),
                        ("apg_norm_threshold", -1.0), ("guide_cfg", float("nan"))):
        bad = get_preset("cpu")
        setattr(bad.sample, name, value)
        with pytest.raises(UserError, match=f"sample.{name} must be"):
            validate(bad)


def _setting(prediction="v", clip="none"):
    cfg = get_preset("tiny").diffusion
    cfg.prediction, cfg.clip = prediction, clip
    g = torch.Generator().manual_seed(0)
    cond, uncond, x_t = (torch.randn(3, 1, 4, 4, generator=g) for _ in range(3))
    return NoiseSchedule(cfg), cond, uncond, x_t


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_x0_and_back_is_the_identity_and_matches_the_schedule(prediction):
    schedule, out, _, x_t = _setting(prediction)
    x0 = schedule.to_x0(out, 40, x_t)
    assert torch.allclose(x0, schedule.predict_x0_eps(out, 40, x_t)[0], atol=1e-5)
    assert torch.allclose(schedule.from_x0(x0, 40, x_t), out, atol=1e-4)
    # an output of the other kind that implies the same x_0 reads back as that x_0
    other = "v" if prediction == "eps" else "eps"
    a, s = schedule.sqrt_alpha_bar[40], schedule.sqrt_one_minus_alpha_bar[40]
    eps = (x_t - a * x0) / s
    other_out = eps if other == "eps" else a * eps - s * x0
    assert torch.allclose(schedule.to_x0(other_out, 40, x_t, other), x0, atol=1e-4)


def test_cfg_mixes_the_predicted_x0_by_the_same_weights():
    schedule, cond, uncond, x_t = _setting("eps")
    for w in (0.0, 1.0, 2.5):
        out = uncond + w * (cond - uncond)  # as denoise.predict() combines them
        # the x_0 the guided output implies is the same mix of the two predicted x_0
        x0 = schedule.predict_x0_eps(out, 40, x_t)[0]
        x0_c, x0_u = (schedule.predict_x0_eps(o, 40, x_t)[0] for o in (cond, uncond))
        assert torch.allclose(x0, x0_u + w * (x0_c - x0_u), atol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_apg_with_eta_one_and_nothing_else_is_cfg(prediction):
    schedule, cond, uncond, x_t = _setting(prediction)
    for w in (0.0, 1.75, 4.0):
        sc = SampleConfig(guidance=w, guidance_rule="apg", apg_eta=1.0)
        got = guidance.apg(schedule, x_t, 40, cond, uncond, sc, {})
        assert torch.allclose(got, uncond + w * (cond - uncond), atol=1e-4)


def test_apg_keeps_the_orthogonal_part_scales_the_parallel_and_caps_the_norm():
    schedule, cond, uncond, x_t = _setting("v")
    x0_c, x0_u = schedule.to_x0(cond, 40, x_t), schedule.to_x0(uncond, 40, x_t)
    w, diff = 3.0, x0_c - x0_u

    def x0_of(sc, memory=None):
        return schedule.to_x0(guidance.apg(schedule, x_t, 40, cond, uncond, sc,
                                              {} if memory is None else memory), 40, x_t)

    def dot(a, b):
        return (a.double() * b.double()).flatten(1).sum(1).float()

    step = (x0_of(SampleConfig(guidance=w, apg_eta=0.0)) - x0_c) / (w - 1)
    assert dot(step, x0_c).abs().max() < 1e-4  # eta 0: only the part orthogonal to x0_cond
    parallel = diff - step
    assert torch.allclose(parallel, dot(diff, x0_c).view(-1, 1, 1, 1) /
                          dot(x0_c, x0_c).view(-1, 1, 1, 1) * x0_c, atol=1e-4)
    half = (x0_of(SampleConfig(guidance=w, apg_eta=0.5)) - x0_c) / (w - 1)
    assert torch.allclose(half, step + 0.5 * parallel, atol=1e-4)
    # a threshold r caps the term's norm per image before the projection
    capped = SampleConfig(guidance=w, apg_eta=1.0, apg_norm_threshold=0.1)
    term = (x0_of(capped) - x0_c) / (w - 1)
    assert torch.allclose(term.flatten(1).norm(dim=1), torch.full((3,), 0.1), atol=1e-4)
    # momentum: the second guided step adds beta times the first one's term
    memory, moving = {}, SampleConfig(guidance=w, apg_eta=1.0, apg_momentum=-0.5)
    first = x0_of(moving, memory)
    second = x0_of(moving, memory)
    assert torch.allclose(first, x0_of(SampleConfig(guidance=w, apg_eta=1.0)), atol=1e-5)
    assert torch.allclose((second - x0_c) / (w - 1), 0.5 * diff, atol=1e-4)


@pytest.mark.parametrize("prediction, guide_prediction", [("v", "v"), ("v", "eps"), ("eps", "v")])
def test_autoguidance_by_the_model_itself_is_the_conditional_model(prediction, guide_prediction):
    schedule, cond, uncond, x_t = _setting(prediction)
    x0 = schedule.to_x0(cond, 40, x_t)
    a, s = schedule.sqrt_alpha_bar[40], schedule.sqrt_one_minus_alpha_bar[40]
    eps = (x_t - a * x0) / s
    same = eps if guide_prediction == "eps" else a * eps - s * x0  # the guide says what cond says
    for w in (1.0, 2.0, 5.0):
        sc = SampleConfig(guidance=w, guidance_rule="auto", guide="g.pt")
        out = guidance.auto(schedule, x_t, 40, cond, None, same, guide_prediction, sc)
        assert torch.allclose(out, cond, atol=1e-4)
    # another guide: the model's x_0 pushed away from the guide's by w - 1; a cfg term on top
    guide = torch.randn_like(cond)
    sc = SampleConfig(guidance=2.0, guidance_rule="auto", guide="g.pt", guide_cfg=1.5)
    out = guidance.auto(schedule, x_t, 40, cond, uncond, guide, prediction, sc)
    x0_g, x0_u = schedule.to_x0(guide, 40, x_t), schedule.to_x0(uncond, 40, x_t)
    want = x0 + (x0 - x0_g) + 0.5 * (x0 - x0_u)
    assert torch.allclose(schedule.to_x0(out, 40, x_t), want, atol=1e-4)
    assert needs_uncond(sc) and not needs_uncond(dataclasses.replace(sc, guide_cfg=1.0))
