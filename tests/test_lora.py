import pytest
import torch
from torch import nn

from diffusion101 import checkpoint
from diffusion101.config import UserError
from diffusion101.presets import get_preset
from diffusion101.lora import (DEFAULT, LoRALinear, apply_lora_file, inject_lora, lora_layers,
                               lora_state_dict, merge_lora, unmerge_lora)
from diffusion101.unet import UNet


def _inputs(n=4, size=16):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 1, size, size, generator=g), torch.randint(0, 100, (n,), generator=g),
            torch.randint(0, 10, (n,), generator=g))


def _model_with_lora(targets=("w_q", "w_k", "w_v")):
    torch.manual_seed(0)
    model = UNet(get_preset("tiny").model).eval()
    base_out = model(*_inputs())
    n = inject_lora(model, r=4, alpha=2.0, targets=targets)
    return model, base_out, n


def _randomize(model, name=DEFAULT, std=0.5):
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if name in layer.lora_b:
                layer.lora_b[name].normal_(0, std)


def test_injected_equals_base_at_init():
    model, base_out, n = _model_with_lora()
    assert n == 9  # 3 cross-attention blocks x (w_q, w_k, w_v)
    assert torch.equal(model(*_inputs()), base_out)  # B = 0: exactly the base
    for _, layer in lora_layers(model):
        assert torch.count_nonzero(layer.lora_b[DEFAULT]) == 0 and layer.lora_a[DEFAULT].abs().sum() > 0


def test_only_lora_requires_grad():
    model, _, _ = _model_with_lora()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_a." in n or ".lora_b." in n for n in trainable)
    assert len(lora_state_dict(model)) == len(trainable) == 18


def test_merge_equals_unmerged_and_unmerge_restores():
    model, _, _ = _model_with_lora()
    _randomize(model)
    base_weights = {n: layer.base.weight.clone() for n, layer in lora_layers(model)}
    unmerged = model(*_inputs())
    merge_lora(model)
    merged = model(*_inputs())
    assert torch.allclose(merged, unmerged, atol=1e-5)
    for n, layer in lora_layers(model):
        a, b = layer.lora_a[DEFAULT], layer.lora_b[DEFAULT]
        assert torch.allclose(layer.base.weight, base_weights[n] + (a @ b).T * 2.0 / 4, atol=1e-6)
    unmerge_lora(model)
    for n, layer in lora_layers(model):
        assert torch.equal(layer.base.weight, base_weights[n])
    assert torch.allclose(model(*_inputs()), unmerged, atol=1e-5)


def test_two_adapters_with_scales_merged_equals_unmerged():
    torch.manual_seed(0)
    model = UNet(get_preset("tiny").model).eval()
    inject_lora(model, 4, 1.0, name="style", strength=0.7)
    inject_lora(model, 2, 2.0, targets=("w_v", "z_linear"), name="other", strength=0.3)
    _randomize(model, "style")
    _randomize(model, "other")
    unmerged = model(*_inputs())
    merge_lora(model)
    assert torch.allclose(model(*_inputs()), unmerged, atol=1e-5)
    unmerge_lora(model, "style")  # the other stays merged
    merge_lora(model, "style")
    assert torch.allclose(model(*_inputs()), unmerged, atol=1e-5)


def test_merge_unmerge_ten_times_restores_the_base_exactly():
    model, _, _ = _model_with_lora()
    _randomize(model, std=5.0)
    base = {n: layer.base.weight.clone() for n, layer in lora_layers(model)}
    for _ in range(10):
        merge_lora(model)
        unmerge_lora(model)
    for n, layer in lora_layers(model):
        w = layer.base.weight
        assert ((w - base[n]).norm() / base[n].norm()).item() <= 1e-6
        assert torch.equal(w, base[n])


def test_lora_forward_formula_and_init():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = LoRALinear(base)
    layer.add_adapter("x", r=2, alpha=3.0, strength=0.5)
    with torch.no_grad():
        layer.lora_b["x"].normal_()
    x = torch.randn(4, 6)
    a, b = layer.lora_a["x"], layer.lora_b["x"]
    assert torch.allclose(layer(x), base(x) + x @ a @ b * 1.5 * 0.5, atol=1e-6)
    bound = (6 / ((1 + 5) * 2)) ** 0.5  # kaiming-uniform, a = sqrt(5), fan_in = r = 2
    assert a.abs().max().item() <= bound


@pytest.mark.parametrize("targets,count", [(("w_v",), 3), (("w_q", "w_k"), 6),
                                           (("z_linear", "time_emb_linear"), 6)])
def test_targets_choose_layers(targets, count):
    model, _, n = _model_with_lora(targets)
    assert n == count
    assert all(name.rsplit(".", 1)[-1] in targets for name, _ in lora_layers(model))


def test_adapter_file_checks_base_and_layers():
    model, _, _ = _model_with_lora()
    _randomize(model)
    base_state = UNet(get_preset("tiny").model).state_dict()
    adapter = {"lora": lora_state_dict(model), "base_fingerprint": checkpoint.fingerprint(base_state),
               "lora_config": {"r": 4, "alpha": 2.0, "targets": ["w_q", "w_k", "w_v"]}}
    fresh = UNet(get_preset("tiny").model)
    with pytest.raises(UserError, match="another base"):
        apply_lora_file(fresh, adapter, "0" * 64, "a.pt")
    other = get_preset("tiny").model
    other.channels = (8,)  # one level: no decoder, so fewer attention blocks
    with pytest.raises(UserError, match="does not have"):
        apply_lora_file(UNet(other), adapter, adapter["base_fingerprint"], "a.pt")
    apply_lora_file(fresh, adapter, adapter["base_fingerprint"], "a.pt", name="a", strength=1.0)
    assert all(torch.equal(v, lora_state_dict(fresh, "a")[k]) for k, v in adapter["lora"].items())


def _q_k_adapter_effect(cfg):
    """Output change from a random adapter on Q and K alone."""
    torch.manual_seed(0)
    model = UNet(cfg).eval()
    inputs = _inputs(2, cfg.img_size)
    with torch.no_grad():
        before = model(*inputs)
        inject_lora(model, 4, 4.0, targets=("w_q", "w_k"))
        _randomize(model, std=1.0)
        return (model(*inputs) - before).abs().max().item()


def test_q_and_k_adapters_do_nothing_with_one_token_but_act_with_several():
    # One key per class: softmax over one key is always 1, so Q and K cannot matter.
    reference = get_preset("reference").model
    assert _q_k_adapter_effect(reference) == 0.0
    multi = get_preset("tiny").model
    multi.cond_tokens = 4
    assert _q_k_adapter_effect(multi) > 1e-3


def test_a_hand_edited_adapter_file_is_refused_with_the_field(tmp_path):
    adapter = {"format": checkpoint.LORA_FORMAT, "lora": {}, "base_fingerprint": "0" * 64,
               "lora_config": {"r": 8, "alpha": float("nan"), "targets": ["w_q"]}}
    checkpoint.save(adapter, tmp_path / "a.pt")
    with pytest.raises(UserError, match=r"lora\.alpha must be a finite number"):
        checkpoint.load_lora_file(tmp_path / "a.pt")
    adapter["lora_config"].update(alpha=1.0, r=0)
    checkpoint.save(adapter, tmp_path / "a.pt")
    with pytest.raises(UserError, match=r"lora\.r must be an integer"):
        checkpoint.load_lora_file(tmp_path / "a.pt")


def test_a_safetensors_adapter_round_trips_and_refuses_another_base(tmp_path):
    import json

    from safetensors import safe_open
    adapter = checkpoint.lora_file(get_preset("tiny"), {"a.lora_a": torch.ones(4, 2),
                                                        "a.lora_b": torch.zeros(2, 3)},
                                   2, 1.0, ["w_q"], "f" * 64, 7)
    checkpoint.save(adapter, tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["lora_config"]) == {"r": 2, "alpha": 1.0, "targets": ["w_q"]}
    assert json.loads(meta["base_fingerprint"]) == "f" * 64 and meta["format"] == checkpoint.LORA_FORMAT
    back = checkpoint.load_lora_file(tmp_path / "a.safetensors")
    assert back["steps"] == 7 and torch.equal(back["lora"]["a.lora_a"], torch.ones(4, 2))
    with pytest.raises(UserError, match="trained on another base model"):
        apply_lora_file(nn.Linear(4, 3), back, "0" * 64, "a.safetensors")
