"""Flow matching (diffusion101/flow.py): the path and its velocity in closed form, x_0 from a
velocity, the samplers' orders on ODEs with known solutions, guidance on velocities, the
objective in a checkpoint, and the refusals."""
import dataclasses
import math

import pytest
import torch

from diffusion101 import checkpoint
from diffusion101.config import DiffusionConfig, SampleConfig, UserError
from diffusion101.presets import get_preset
from diffusion101.denoise import make_sampler, predict, sample
from diffusion101.flow import FlowEuler, FlowHeun, FlowMatching, shifted
from diffusion101.settings import validate
from diffusion101.unet import UNet

FLOW = DiffusionConfig(objective="flow", clip="none")


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, 1, 4, 4, generator=g) * 2 - 1, torch.randn(3, 1, 4, 4, generator=g)


def test_the_path_and_its_velocity_in_closed_form():
    flow = FlowMatching(FLOW)
    x0, eps = _batch()
    t = torch.tensor([0.0, 0.3, 1.0])
    x_t = flow.add_noise(x0, eps, t)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[2], eps[2])
    assert torch.allclose(x_t[1], 0.7 * x0[1] + 0.3 * eps[1], atol=1e-7)
    # the target is the path's derivative in t, at every t
    h = 1e-3
    for s in (0.1, 0.5, 0.9):
        slope = (flow.add_noise(x0, eps, s + h) - flow.add_noise(x0, eps, s - h)) / (2 * h)
        assert torch.allclose(slope, flow.target(x0, eps, torch.full((3,), s)), atol=1e-3)
    # the network reads t on DDPM's timestep scale
    assert flow.net_time(torch.tensor([1.0])).item() == FLOW.timesteps - 1


def test_x0_comes_back_from_a_velocity_and_back_again():
    flow = FlowMatching(FLOW)
    x0, eps = _batch()
    for t in (0.05, 0.4, 0.95):
        x_t, v = flow.add_noise(x0, eps, t), eps - x0
        assert torch.allclose(flow.to_x0(v, t, x_t), x0, atol=1e-6)
        assert torch.allclose(flow.from_x0(x0, t, x_t), v, atol=1e-5)


def test_training_times_uniform_and_logit_normal():
    g = torch.Generator().manual_seed(0)
    uniform = FlowMatching(dataclasses.replace(FLOW, t_sampling="uniform")).sample_timesteps(100_000, g)
    assert 0 < uniform.min() and uniform.max() < 1 and abs(uniform.mean() - 0.5) < 0.01
    cfg = dataclasses.replace(FLOW, t_sampling="logit_normal", logit_mean=0.5, logit_std=0.8)
    t = FlowMatching(cfg).sample_timesteps(100_000, g)
    logit = torch.log(t / (1 - t))  # normal of the settings' mean and scale, within sampling error
    assert abs(logit.mean() - 0.5) < 0.01 and abs(logit.std() - 0.8) < 0.01


def test_the_shift_bends_the_grid_towards_the_noise():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.equal(shifted(t, 1.0), t)
    assert shifted(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)
    s = FlowEuler(FLOW, shift=3.0)
    s.set_timesteps(4)
    uniform = torch.linspace(1, 0, 5, dtype=torch.float64)
    assert s.sigmas[0] == 1 and s.sigmas[-1] == 0 and (s.sigmas[1:-1] > uniform[1:-1]).all()
    assert torch.allclose(s.sigmas, shifted(uniform, 3.0))


def _walk(sampler, model, x, steps):
    """The loop of denoise.sample without a network: set_timesteps, then step after step."""
    sampler.set_timesteps(steps)
    outs = []
    for t in sampler.timesteps.tolist():
        outs.append(sampler.step(model(x, t), t, x))
        x = outs[-1].prev_sample
    return outs


@pytest.mark.parametrize("kind", [FlowEuler, FlowHeun])
def test_a_network_that_knows_x0_lands_on_it(kind):
    # v = (x_t - x_0) / t is the straight path's velocity through x_t: constant along it, so
    # one Euler step from the noise reaches x_0, and so does every walk; every predicted x_0 is
    # x_0, and Heun asks the network 2n - 1 times
    x0, eps = _batch()
    oracle = lambda x, t: (x - x0) / t  # noqa: E731
    sampler = kind(FLOW)
    for steps in (1, 3, 8):
        walk = _walk(sampler, oracle, eps, steps)
        assert len(walk) == (steps if kind is FlowEuler else 2 * steps - 1)
        assert torch.allclose(walk[-1].prev_sample, x0, atol=1e-5)
        assert all(torch.allclose(o.pred_original_sample, x0, atol=1e-4) for o in walk)


def test_heun_is_second_order_and_euler_first():
    # dx/dt = a x from t = 1 to t = 0: x(0) = x(1) exp(-a). Doubling the steps divides Euler's
    # error by about 2 and Heun's by about 4 (its last step, to t = 0, is an Euler step: second
    # order too in the global error, which it dominates at these step sizes).
    a, x1 = 1.5, torch.ones(1, 1, 1, 1, dtype=torch.float64)
    exact = x1 * math.exp(-a)

    def error(kind, steps):
        end = _walk(kind(FLOW), lambda x, t: a * x, x1, steps)[-1].prev_sample
        return (end - exact).abs().item()

    heun = [error(FlowHeun, n) for n in (8, 16, 32)]
    euler = [error(FlowEuler, n) for n in (8, 16, 32)]
    for coarse, fine in zip(heun, heun[1:]):
        assert 3.5 < coarse / fine < 4.7, heun  # 4.53, then 4.25: towards 4
    for coarse, fine in zip(euler, euler[1:]):
        assert 1.8 < coarse / fine < 2.2, euler
    assert heun[0] < euler[0] / 10


def test_guidance_mixes_velocities_and_w_one_is_the_conditional_velocity():
    cfg = get_preset("tiny")
    cfg.diffusion.objective, cfg.model.null_class = "flow", True
    torch.manual_seed(0)
    model = UNet(cfg.model).eval()
    sampler = make_sampler(SampleConfig(sampler="euler", steps=4), cfg.diffusion)
    x, y = torch.randn(4, 1, 16, 16), torch.tensor([0, 3, 5, 9])
    with torch.no_grad():
        t_net = torch.full((4,), 0.75 * (cfg.diffusion.timesteps - 1))
        cond, uncond = model(x, t_net, y), model(x, t_net, torch.full_like(y, model.null_label))
        for w in (1.0, 2.5):
            got = predict(model, sampler, x, 0.75, y, SampleConfig(sampler="euler", guidance=w))
            assert torch.allclose(got, uncond + w * (cond - uncond), atol=1e-5)


def _flow_file(path, sampler="euler"):
    cfg = get_preset("tiny")
    cfg.diffusion = DiffusionConfig(objective="flow", timesteps=100, t_sampling="logit_normal")
    cfg.sample = SampleConfig(sampler=sampler, steps=4)
    validate(cfg)
    torch.manual_seed(0)
    checkpoint.save(checkpoint.model_file(cfg, "tiny", {"model": UNet(cfg.model).state_dict()}), path)
    return path


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_checkpoint_says_how_to_sample_it(tmp_path, suffix):
    from diffusion101.generate import load_for_sampling, resolve_sampler
    path = _flow_file(tmp_path / f"flow{suffix}")
    model = load_for_sampling(path, "cpu", log=lambda *a: None)
    assert model.config.diffusion.objective == "flow"
    assert model.config.diffusion.t_sampling == "logit_normal"
    sc = resolve_sampler(model.config, sampler="heun", steps=3)
    images, _ = sample(model.net, make_sampler(sc, model.config.diffusion), torch.tensor([1, 2]),
                       sc, torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()
    # a flow model refuses a DDPM sampler, and a DDPM model a flow one, in one line
    with pytest.raises(UserError, match="does not walk diffusion.objective=flow: use euler or heun"):
        resolve_sampler(model.config, sampler="dpm")
    with pytest.raises(UserError, match="objective=ddpm: use ddpm, ddim or dpm"):
        make_sampler(SampleConfig(sampler="euler"), get_preset("tiny").diffusion)


def test_a_flow_model_learns_a_fixed_batch_and_trains_through_the_loop(tmp_path, fake_data):
    from diffusion101.speed import Speed
    from diffusion101.denoise import make_objective
    from diffusion101.train import train_step
    from diffusion101.train_run import train
    from diffusion101.train_state import build_state
    cfg = get_preset("tiny")
    cfg.diffusion.objective, cfg.diffusion.t_sampling, cfg.sample.sampler = "flow", "logit_normal", "euler"
    cfg.sample.steps = 4
    torch.manual_seed(0)
    state = build_state(cfg, "cpu", Speed(), total_steps=100)
    objective = make_objective(cfg.diffusion)
    x0, y = fake_data.batch(torch.arange(16))
    losses = []
    for _ in range(100):
        state.generator.manual_seed(0)  # the same times and noise every step: a fixed batch
        losses.append(train_step(state, objective, (x0, y), cfg.train, Speed()))
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    cfg.train.max_steps = 5
    ckpt = train(cfg, "tiny", tmp_path / "f.pt", tmp_path / "runs", "cpu", data=fake_data,
                 log=lambda *a: None)
    assert ckpt["config"]["diffusion"]["objective"] == "flow" and ckpt["step"] == 5


def test_settings_that_flow_matching_cannot_take_are_refused():
    from diffusion101.denoise import check_config
    cfg = get_preset("cpu")
    validate(cfg)
    cfg.train.snr_gamma = 5.0
    with pytest.raises(UserError, match="snr_gamma"):
        validate(cfg)
    cfg = get_preset("cpu")
    cfg.sample.sampler = "dpm"
    with pytest.raises(UserError, match="use euler or heun"):
        check_config(cfg)


@pytest.mark.parametrize("kind", [FlowEuler, FlowHeun])
def test_a_network_that_predicts_x0_walks_as_its_velocity_does(kind):
    # diffusion.prediction=x0 (Li and He 2025): an oracle that outputs x_0 itself lands on it
    # in any number of steps, as the velocity oracle does; its loss is on the velocity it means
    x0, eps = _batch()
    cfg = dataclasses.replace(FLOW, prediction="x0")
    sampler = kind(cfg)
    for steps in (1, 3, 8):
        walk = _walk(sampler, lambda x, t: x0, eps, steps)
        assert torch.allclose(walk[-1].prev_sample, x0, atol=1e-5)
        assert all(torch.allclose(o.pred_original_sample, x0, atol=1e-5) for o in walk)
    flow, t = FlowMatching(cfg), torch.tensor([0.01, 0.5, 1.0])
    x_t = flow.add_noise(x0, eps, t)
    pred, target = flow.prediction_and_target(lambda x, tt, y: x0, x0, eps, t, None)
    assert torch.allclose(pred[1:], target[1:], atol=1e-5)  # the path's own velocity, eps - x_0
    # below T_MIN the division is by T_MIN: finite, and the target is not reached exactly
    assert torch.isfinite(pred).all() and not torch.allclose(pred[0], target[0], atol=1e-3)
    assert torch.equal(flow.to_x0(x0, t, x_t), x0) and torch.equal(flow.from_x0(x0, t, x_t), x0)
    bad = get_preset("cpu-ddpm")
    bad.diffusion.prediction = "x0"
    with pytest.raises(UserError, match="prediction=x0 is flow matching's"):
        validate(bad)
