"""MeanFlow (diffusion101/meanflow.py): the target against the exact average velocity of Gaussian
data, the Jacobian-vector product against finite differences, an oracle that lands on x_0 in
one jump, r = t as flow matching, the trained-in guidance, the adaptive weights, training and
a checkpoint, and the refusals."""
import dataclasses
import math

import pytest
import torch
from torch import nn

from conftest import run_script
from diffusion101.config import DiffusionConfig, ModelConfig, SampleConfig, UserError
from diffusion101.denoise import make_objective, make_sampler, sample
from diffusion101.flow import FlowMatching
from diffusion101.meanflow import ADAPTIVE_C, MeanFlow, MeanFlowJumps
from diffusion101.networks import build_network
from diffusion101.presets import get_preset
from diffusion101.settings import validate

# (timesteps 11: the network reads t on 0..10, as the preset's does)
MEANFLOW = DiffusionConfig(objective="meanflow", timesteps=11, clip="none", adaptive_p=0.0)


class GaussianOracle(nn.Module):
    """The exact average velocity when every pixel of the data is N(mu, sigma^2) on its own.
    Along flow matching's path x_t has mean m_t = (1 - t) mu and deviation
    s_t = sqrt((1 - t)^2 sigma^2 + t^2), and the flow carries x_t to
    x_r = m_r + (s_r / s_t)(x_t - m_t) (the one monotone map between two Gaussians), so
    u(x_t, r, t) = (x_t - x_r) / (t - r), and at r = t the velocity, its limit."""

    def __init__(self, mu: float, sigma: float, time_scale: float):
        super().__init__()
        self.mu, self.sigma, self.time_scale = mu, sigma, time_scale
        self.cfg, self.null_label = ModelConfig(img_size=2, num_classes=10), 10

    def mean(self, t):
        return (1 - t) * self.mu

    def dev(self, t):
        return torch.sqrt((1 - t) ** 2 * self.sigma ** 2 + t ** 2)

    def u(self, x, r, t):
        r, t = (v.view(-1, *[1] * (x.dim() - 1)) for v in (r, t))
        span = t - r
        x_r = self.mean(r) + self.dev(r) / self.dev(t) * (x - self.mean(t))
        average = (x - x_r) / torch.where(span > 0, span, torch.ones_like(span))
        # d/dt of m_t + s_t z at fixed z = (x - m_t) / s_t: the velocity at r = t
        d_dev = ((t - 1) * self.sigma ** 2 + t) / self.dev(t)
        velocity = -self.mu + d_dev * (x - self.mean(t)) / self.dev(t)
        return torch.where(span > 0, average, velocity)

    def forward(self, x, times, y):
        times = times if times.dim() == 2 else torch.stack([times, torch.zeros_like(times)], 1)
        t = times[:, 0] / self.time_scale
        return self.u(x, t - times[:, 1] / self.time_scale, t)


def test_the_target_is_the_exact_average_velocity_in_expectation():
    """Per image the target is noisy (it holds the velocity of that image's own line); given
    x_t its mean is u(x_t, r, t). Regressed on x_t over many draws, it gives u's slope and
    intercept, which the oracle computes in closed form."""
    objective = MeanFlow(MEANFLOW)
    oracle = GaussianOracle(mu=0.5, sigma=0.3, time_scale=objective.time_scale)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = 0.5 + 0.3 * torch.randn(n, 1, 1, 1, generator=g)
    noise = torch.randn(n, 1, 1, 1, generator=g)
    t, r = torch.full((n,), 0.8), torch.full((n,), 0.3)
    pred, target = objective.prediction_and_target(oracle, x0, noise, torch.stack([t, r], 1),
                                                   torch.zeros(n, dtype=torch.long))
    x_t = objective.add_noise(x0, noise, t).flatten()
    design = torch.stack([torch.ones(n), x_t], 1).double()
    intercept, slope = torch.linalg.lstsq(design, target.flatten().double()[:, None]).solution.flatten()
    # u is affine in x_t: u = (1 - k) / d x_t + (k m_t - m_r) / d with k = s_r / s_t, d = t - r
    k = (oracle.dev(torch.tensor(0.3)) / oracle.dev(torch.tensor(0.8))).item()
    d, m_t, m_r = 0.5, oracle.mean(0.8), oracle.mean(0.3)
    assert abs(slope - (1 - k) / d) < 0.02 and abs(intercept - (k * m_t - m_r) / d) < 0.02
    assert torch.allclose(pred.flatten(), oracle.u(x_t.view(n, 1, 1, 1), r, t).flatten(), atol=1e-5)
    # with the marginal velocity in place of each image's own, the identity holds exactly
    v = oracle(x_t.view(n, 1, 1, 1), objective.net_time(t), None)
    u, du_dt = objective.total_derivative(oracle, x_t.view(n, 1, 1, 1), t, r, None, v)
    assert torch.allclose(v - 0.5 * du_dt, u, atol=1e-4)


def _tiny(backbone="unet"):
    cfg = get_preset("tiny")
    cfg.model.interval_input, cfg.model.norm = True, "group"
    if backbone == "dit":
        cfg.model = dataclasses.replace(cfg.model, backbone="dit", patch_size=4, width=32,
                                        depth=2, heads=2)
    cfg.diffusion = dataclasses.replace(MEANFLOW)
    cfg.train.loss = "mse"
    cfg.sample = SampleConfig(sampler="jump", steps=1)
    validate(cfg)
    return cfg


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_the_jacobian_vector_product_matches_finite_differences(backbone):
    cfg = _tiny(backbone)
    torch.manual_seed(1)
    net = build_network(cfg.model)
    for p in net.parameters():  # the DiT starts at zero (adaLN-Zero): give it a slope
        p.data.add_(0.05 * torch.randn_like(p))
    net = net.double()  # float64: central differences of float32 drown in rounding
    objective = MeanFlow(cfg.diffusion)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 16, 16, generator=g, dtype=torch.float64)
    v = torch.randn(4, 1, 16, 16, generator=g, dtype=torch.float64)
    t = torch.tensor([0.9, 0.7, 0.5, 0.3], dtype=torch.float64)
    r = torch.tensor([0.1, 0.0, 0.4, 0.2], dtype=torch.float64)
    y = torch.tensor([0, 3, 7, 9])
    u, du_dt = objective.total_derivative(net, x, t, r, y, v)

    def at(s):
        return net(x + s * v, objective.net_times(t + s, r), y)
    h = 1e-6
    with torch.no_grad():
        slope = (at(h) - at(-h)) / (2 * h)
        assert torch.allclose(u, at(0.0), atol=1e-12)
    assert ((du_dt - slope).norm() / du_dt.norm()).item() < 1e-5


@pytest.mark.parametrize("steps", [1, 3])
def test_an_oracle_lands_on_the_data_in_one_jump_or_several(steps):
    """The exact average velocity carries each noise to mu + sigma eps, the image the flow
    itself would draw from it: in one jump from t = 1 to 0, or in three."""
    cfg = dataclasses.replace(MEANFLOW)
    oracle = GaussianOracle(mu=0.5, sigma=0.3, time_scale=MeanFlow(cfg).time_scale)
    sample_cfg = SampleConfig(sampler="jump", steps=steps)
    sampler = make_sampler(sample_cfg, cfg)
    assert isinstance(sampler, MeanFlowJumps)
    start = torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    images, frames = sample(oracle, sampler, torch.arange(6), sample_cfg, start=start, n_frames=steps)
    assert torch.allclose(images, 0.5 + 0.3 * start, atol=1e-5)
    assert frames.shape[1] == steps


def test_r_equal_to_t_is_flow_matching():
    cfg = _tiny()
    net = build_network(cfg.model)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(5, 1, 16, 16, generator=g) * 2 - 1, torch.randn(5, 1, 16, 16, generator=g)
    t, y = torch.rand(5, generator=g), torch.arange(5)
    mean = MeanFlow(cfg.diffusion).prediction_and_target(net, x0, noise, torch.stack([t, t], 1), y)
    flow = FlowMatching(cfg.diffusion).prediction_and_target(net, x0, noise, t, y)
    for a, b in zip(mean, flow):
        assert torch.allclose(a, b, atol=1e-6)
    # and the training times: r <= t always, r < t for about interval_share of the images
    times = MeanFlow(dataclasses.replace(cfg.diffusion, interval_share=0.3)).sample_timesteps(
        20_000, torch.Generator().manual_seed(0))
    assert (times[:, 1] <= times[:, 0]).all()
    assert abs((times[:, 1] < times[:, 0]).float().mean().item() - 0.3) < 0.02
    flat = MeanFlow(dataclasses.replace(cfg.diffusion, interval_share=0.0)).sample_timesteps(
        100, torch.Generator().manual_seed(0))
    assert torch.equal(flat[:, 0], flat[:, 1])


def test_guidance_is_trained_into_the_target():
    """Labelled images: w v + (1 - w) u(x_t, t, t | null); images whose label was dropped: v."""
    class Fixed(nn.Module):
        null_label = 10

        def forward(self, x, times, y):  # the unconditional answer is 2 everywhere
            return torch.where((y == 10).view(-1, 1, 1, 1), 2.0, -1.0) + 0 * x
    objective = MeanFlow(dataclasses.replace(MEANFLOW, trained_guidance=3.0))
    v = torch.ones(2, 1, 2, 2)
    guided = objective.guided_velocity(Fixed(), torch.zeros(2, 1, 2, 2), torch.tensor([0.5, 0.5]),
                                       v, torch.tensor([4, 10]))
    assert torch.equal(guided[0], torch.full((1, 2, 2), 3 * 1 + (1 - 3) * 2.0))
    assert torch.equal(guided[1], v[1])


def test_the_adaptive_weights_in_closed_form():
    objective = MeanFlow(dataclasses.replace(MEANFLOW, adaptive_p=0.75))
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    pred[2] = target[2]  # an image already right keeps a finite weight
    a, b = objective.weighted(pred, target)
    error = (pred - target).square().flatten(1).mean(1)
    expected = (error / (error + ADAPTIVE_C) ** 0.75).mean()
    assert math.isclose(torch.nn.functional.mse_loss(a, b).item(), expected.item(), rel_tol=1e-5)


def test_a_meanflow_model_learns_a_fixed_batch_and_its_file_samples(tmp_path, fake_data):
    from diffusion101.generate import load_for_sampling
    from diffusion101.speed import Speed
    from diffusion101.train import train_step
    from diffusion101.train_run import train
    from diffusion101.train_state import build_state
    cfg = _tiny()
    cfg.diffusion.interval_share = 0.5
    torch.manual_seed(0)
    state = build_state(cfg, "cpu", Speed(), total_steps=60)
    objective = make_objective(cfg.diffusion)
    x0, y = fake_data.batch(torch.arange(16))
    losses = []
    for _ in range(60):
        state.generator.manual_seed(0)  # the same times, intervals and noise: a fixed batch
        losses.append(train_step(state, objective, (x0, y), cfg.train, Speed()))
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    cfg.train.max_steps = 3
    ckpt = train(cfg, "tiny", tmp_path / "m.pt", tmp_path / "runs", "cpu", data=fake_data,
                 log=lambda *a: None)
    model = load_for_sampling(tmp_path / "m.pt", "cpu", log=lambda *a: None)
    assert model.config.diffusion.objective == "meanflow" and model.config.model.interval_input
    weights = ckpt["ema"] if "ema" in ckpt else ckpt["model"]  # (sampling takes the EMA)
    for key, value in weights.items():
        assert torch.equal(model.net.state_dict()[key], value)
    walks = [sample(model.net, make_sampler(model.config.sample, model.config.diffusion),
                    torch.arange(3), model.config.sample, torch.Generator().manual_seed(0))[0]
             for _ in range(2)]
    assert torch.equal(*walks) and walks[0].shape == (3, 1, 16, 16)


@pytest.mark.parametrize("change,words", [
    ({"model.norm": "batch"}, "BatchNorm"),
    ({"model.interval_input": False}, "interval_input=true"),
    ({"diffusion.prediction": "x0"}, "average velocity"),
    ({"train.loss": "l1"}, "train.loss=mse"),
    ({"model.null_class": False, "train.p_uncond": 0.0}, "unconditional model"),
])
def test_what_meanflow_cannot_train_with_is_refused(change, words):
    cfg = get_preset("cpu-onestep")
    validate(cfg)
    for key, value in change.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    with pytest.raises(UserError, match=words):
        validate(cfg)


def test_meanflow_settings_on_another_objective_are_refused_and_the_command_says_one_line(tmp_path):
    cfg = get_preset("cpu")
    cfg.diffusion.trained_guidance = 2.0
    with pytest.raises(UserError, match="objective=meanflow"):
        validate(cfg)
    proc = run_script("train", "--preset", "cpu-onestep", "--set", "model.norm=batch",
                      "--out", tmp_path / "m.pt", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and not (tmp_path / "m.pt").exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "BatchNorm" in lines[0], proc.stderr


def test_lora_export_onnx_and_the_gif_take_a_meanflow_model(tmp_path, fake_data):
    """The jump sampler keeps the walk contract, so the commands need nothing of their own:
    a LoRA fine-tune (through the Jacobian-vector product), the ONNX graph (two time inputs a
    row), the GIF of a 2-jump walk."""
    import diffusion101 as d
    from diffusion101 import checkpoint, commands, onnx_export
    from diffusion101.lora_finetune import finetune
    from diffusion101.model_files import load_model
    cfg = _tiny()
    cfg.diffusion.trained_guidance, cfg.model.null_class, cfg.train.p_uncond = 2.0, True, 0.1
    validate(cfg)
    torch.manual_seed(0)
    checkpoint.save(checkpoint.model_file(cfg, "tiny", {"model": build_network(cfg.model).state_dict()}),
                    tmp_path / "m.pt")
    quiet = dict(log=lambda *a: None)
    adapter = finetune(tmp_path / "m.pt", tmp_path / "lora.pt", "cpu", lora={"max_steps": 2},
                       data=fake_data, **quiet)
    assert adapter["steps"] == 2
    adapted = d.sample(d.load(tmp_path / "m.pt", loras=[tmp_path / "lora.pt"]), classes=[1, 2], seed=0)
    assert adapted.shape == (2, 16, 16) and torch.isfinite(adapted).all()
    commands.export([str(tmp_path / "m.pt"), str(tmp_path / "m.onnx")])
    model, _, _ = load_model(tmp_path / "m.pt")
    graph = onnx_export.OnnxNetwork(tmp_path / "m.onnx")
    g = torch.Generator().manual_seed(0)
    for n in (1, 5):
        x, y = torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 11, (n,), generator=g)
        times = MeanFlow(cfg.diffusion).net_times(torch.rand(n, generator=g), torch.zeros(n))
        with torch.no_grad():
            assert (graph(x, times, y) - model.eval()(x, times, y)).abs().max() < 1e-4
    commands.sample(["--ckpt", str(tmp_path / "m.pt"), "--steps", "2", "--out",
                     str(tmp_path / "g.png"), "--gif", str(tmp_path / "w.gif")])
    from PIL import Image
    assert Image.open(tmp_path / "w.gif").n_frames >= 2
