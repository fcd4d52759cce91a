"""The speed settings (diffusion101/speed.py): what 'auto' turns on where, and the one-token
shortcut of the cross-attention, which must compute the very bits of the full attention."""
import pytest
import torch

from diffusion101.presets import get_preset
from diffusion101.cross_attn import CrossAttention
from diffusion101.speed import OneTokenAttention, Speed, use_one_token_shortcut


def test_speed_options_auto_is_cuda_only_and_reference_keeps_fp32():
    recipe = get_preset("cpu").train
    on_cuda = Speed.for_device(recipe, torch.device("cuda"))
    # every setting but CUDA graphs, which only train.compile=graphs turns on
    assert on_cuda.enabled() == [name for name in vars(Speed()) if name != "cuda_graphs"]
    assert Speed.for_device(recipe, torch.device("cpu")) == Speed()  # all off: plain fp32
    ref_cuda = Speed.for_device(get_preset("reference").train, torch.device("cuda"))
    assert not ref_cuda.bf16 and not ref_cuda.tf32 and ref_cuda.channels_last


def test_the_shortcut_setting_swaps_the_attention_and_back():
    from diffusion101.unet import UNet
    model = UNet(get_preset("tiny").model)
    recipe = get_preset("tiny").train
    recipe.one_token_shortcut = "on"
    net = Speed.for_device(recipe, torch.device("cpu")).network(model)
    kinds = {type(m) for m in net.modules() if isinstance(m, CrossAttention)}
    assert net is model and kinds == {OneTokenAttention}
    use_one_token_shortcut(model, False)
    assert {type(m) for m in model.modules() if isinstance(m, CrossAttention)} == {CrossAttention}


def _forward_and_grads(attn, x, ctx, shortcut: bool):
    """Output, input gradient and every parameter's gradient, with the shortcut on or off."""
    use_one_token_shortcut(attn, shortcut)
    attn.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = attn(x, ctx)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    grads = {n: p.grad.clone() for n, p in attn.named_parameters() if p.requires_grad}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_the_one_token_shortcut_is_the_full_computation(train, lora):
    # one label token: the shortcut skips Q, K and the softmax; output and gradients must be
    # those of the full computation, bit for bit (the weights it uses are exactly ones)
    from diffusion101.lora import inject_lora
    torch.manual_seed(0)
    attn = CrossAttention(8, 4, 4, 16, 6).train(train)
    if lora:
        inject_lora(attn, r=2, alpha=1.0, targets=("w_q", "w_k", "w_v"))
        with torch.no_grad():  # adapters that act (B starts at zero)
            for name, p in attn.named_parameters():
                if "lora_b" in name:
                    p.normal_()
    x, ctx = torch.randn(3, 8, 5, 5), torch.randn(3, 1, 6)
    fast = _forward_and_grads(attn, x, ctx, shortcut=True)
    full = _forward_and_grads(attn, x, ctx, shortcut=False)
    assert torch.equal(fast[0], full[0]) and torch.equal(fast[1], full[1])
    assert fast[2].keys() == full[2].keys() and fast[2]
    for name in full[2]:
        assert torch.equal(fast[2][name], full[2][name]), name
        if ".w_q" in f".{name}" or ".w_k" in f".{name}":
            assert not full[2][name].any(), name  # the softmax over one key passes no gradient


def test_the_shortcut_is_taken_only_with_one_token():
    torch.manual_seed(0)
    attn = CrossAttention(8, 4, 4, 16, 6)
    use_one_token_shortcut(attn)
    called = []
    real = attn.attention
    attn.attention = lambda *a: called.append(1) or real(*a)
    attn(torch.randn(1, 8, 3, 3), torch.randn(1, 1, 6))
    assert called == []
    attn(torch.randn(1, 8, 3, 3), torch.randn(1, 4, 6))
    assert called == [1]


def test_a_one_token_unet_trains_the_same_with_and_without_the_shortcut():
    from conftest import one_token_unet_output_and_grads
    fast = one_token_unet_output_and_grads(shortcut=True, device="cpu")
    full = one_token_unet_output_and_grads(shortcut=False, device="cpu")
    assert all(torch.equal(u, v) for u, v in zip(fast, full))


def test_the_sampling_graph_is_refused_off_cuda_in_one_line():
    from diffusion101.config import UserError
    from diffusion101.speed import GraphedNetwork
    from diffusion101.unet import UNet
    with pytest.raises(UserError, match="needs the model on a CUDA device"):
        GraphedNetwork(UNet(get_preset("tiny").model))
