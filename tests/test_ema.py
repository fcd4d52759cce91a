import torch

from diffusion101.ema import EMA


def test_update_matches_formula():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ema = EMA(model, decay=0.9)
    start = [p.clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(5.0)
    ema.update(model, step=1000)  # past the warm-up: d = decay
    for s, p0, p in zip(ema.model.parameters(), start, model.parameters()):
        assert torch.allclose(s, 0.9 * p0 + 0.1 * p, atol=1e-7)
    assert torch.equal(ema.model[1].running_mean, model[1].running_mean)  # buffers copied
    assert not any(p.requires_grad for p in ema.model.parameters())
    # two more updates toward a fixed target: shadow = target + 0.81 (shadow - target)
    before = [s.clone() for s in ema.model.parameters()]
    ema.update(model, 1000)
    ema.update(model, 1001)
    for s, b, p in zip(ema.model.parameters(), before, model.parameters()):
        assert torch.allclose(s, p + 0.81 * (b - p), atol=1e-6)


def test_warmup_shortens_the_window_early():
    model = torch.nn.Linear(3, 3)
    ema = EMA(model, decay=0.999)
    assert ema.decay_at(0) == 0.1 and abs(ema.decay_at(90) - 91 / 100) < 1e-12
    assert ema.decay_at(100_000) == 0.999
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, 0)  # d = 0.1: the shadow jumps nine tenths of the way
    assert torch.allclose(ema.model.weight, model.weight - 0.1, atol=1e-6)
