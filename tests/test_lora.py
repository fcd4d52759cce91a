import pytest
import torch

from diffusion101.config import get_preset
from diffusion101.lora import (LoRALinear, inject_lora, lora_layers, lora_state_dict, merge_lora,
                               unmerge_lora)
from diffusion101.unet import UNet


def _inputs(n=4):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 100, (n,), generator=g),
            torch.randint(0, 10, (n,), generator=g))


def _model_with_lora(targets=("w_q", "w_k", "w_v")):
    torch.manual_seed(0)
    model = UNet(get_preset("tiny").model).eval()
    base_out = model(*_inputs())
    n = inject_lora(model, r=4, alpha=2.0, targets=targets)
    return model, base_out, n


def test_injected_equals_base_at_init():
    model, base_out, n = _model_with_lora()
    assert n == 9  # 3 cross-attention blocks x (w_q, w_k, w_v)
    assert torch.equal(model(*_inputs()), base_out)  # B = 0: exactly the base
    for _, layer in lora_layers(model):
        assert torch.count_nonzero(layer.lora_b) == 0 and layer.lora_a.abs().sum() > 0


def test_only_lora_requires_grad():
    model, _, _ = _model_with_lora()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_a", ".lora_b")) for n in trainable)
    assert set(lora_state_dict(model)) == trainable


def test_merge_equals_unmerged_and_unmerge_restores():
    model, _, _ = _model_with_lora()
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_b.normal_(0, 0.5)
    base_weights = {n: layer.base.weight.clone() for n, layer in lora_layers(model)}
    unmerged = model(*_inputs())
    merge_lora(model)
    merged = model(*_inputs())
    assert torch.allclose(merged, unmerged, atol=1e-5)
    for n, layer in lora_layers(model):
        expected = base_weights[n] + (layer.lora_a @ layer.lora_b).T * layer.alpha / layer.r
        assert torch.allclose(layer.base.weight, expected, atol=1e-6)
    unmerge_lora(model)
    for n, layer in lora_layers(model):
        assert torch.allclose(layer.base.weight, base_weights[n], rtol=1e-6, atol=1e-7)
    assert torch.allclose(model(*_inputs()), unmerged, atol=1e-5)


def test_lora_forward_formula():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = LoRALinear(base, r=2, alpha=3.0)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(4, 6)
    assert torch.allclose(layer(x), base(x) + x @ layer.lora_a @ layer.lora_b * 1.5, atol=1e-6)
    bound = (6 / ((1 + 5) * 2)) ** 0.5  # kaiming-uniform, a = sqrt(5), fan_in = r = 2
    assert layer.lora_a.abs().max().item() <= bound


@pytest.mark.parametrize("targets", [("w_v",), ("w_q", "w_k")])
def test_targets_choose_layers(targets):
    model, _, n = _model_with_lora(targets)
    assert n == 3 * len(targets)
    assert all(name.rsplit(".", 1)[-1] in targets for name, _ in lora_layers(model))
