"""The guidance rules (diffusion101/guidance.py): one function each, chosen by name."""
import dataclasses

import pytest
import torch

from diffusion101 import guidance
from diffusion101.config import SampleConfig, UserError, get_preset, validate
from diffusion101.diffusion import NoiseSchedule


def test_every_rule_is_a_config_choice_and_back():
    field = {f.name: f for f in dataclasses.fields(SampleConfig)}["guidance_rule"]
    assert set(field.metadata["choices"]) == set(guidance.RULES)
    assert SampleConfig().guidance_rule == "cfg"
    cfg = get_preset("cpu")
    cfg.sample.guidance_rule = "nope"
    with pytest.raises(UserError, match="sample.guidance_rule must be one of cfg"):
        validate(cfg)


def test_cfg_is_the_classifier_free_combination_and_mixes_x0_alike():
    cfg = get_preset("tiny").diffusion
    cfg.clip = "none"
    schedule = NoiseSchedule(cfg)
    g = torch.Generator().manual_seed(0)
    cond, uncond, x_t = (torch.randn(2, 1, 4, 4, generator=g) for _ in range(3))
    for w in (0.0, 1.0, 2.5):
        out = guidance.cfg(cond, uncond, x_t, 40, schedule, w)
        assert torch.allclose(out, (1 - w) * uncond + w * cond, atol=1e-6)
        # the x_0 the guided output implies is the same mix of the two predicted x_0
        x0 = schedule.predict_x0_eps(out, 40, x_t)[0]
        x0_c, x0_u = (schedule.predict_x0_eps(o, 40, x_t)[0] for o in (cond, uncond))
        assert torch.allclose(x0, x0_u + w * (x0_c - x0_u), atol=1e-4)
