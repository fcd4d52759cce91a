import torch

from diffusion101.presets import get_preset
from diffusion101.networks import count_parameters
from diffusion101.unet import UNet


def spec_parameter_shapes() -> dict:
    """The reference UNet written out from docs/REFERENCE.md, layer by layer, independently of unet.py."""
    shapes = {"time_emb.1.weight": (256, 256), "time_emb.1.bias": (256,), "cls_emb.weight": (10, 32)}

    def block(prefix, cin, cout):
        shapes.update({
            f"{prefix}.seq1.0.weight": (cout, cin, 3, 3), f"{prefix}.seq1.0.bias": (cout,),
            f"{prefix}.seq1.1.weight": (cout,), f"{prefix}.seq1.1.bias": (cout,),
            f"{prefix}.time_emb_linear.weight": (cout, 256), f"{prefix}.time_emb_linear.bias": (cout,),
            f"{prefix}.seq2.0.weight": (cout, cout, 3, 3), f"{prefix}.seq2.0.bias": (cout,),
            f"{prefix}.seq2.1.weight": (cout,), f"{prefix}.seq2.1.bias": (cout,),
            f"{prefix}.crossattn.w_q.weight": (16, cout), f"{prefix}.crossattn.w_q.bias": (16,),
            f"{prefix}.crossattn.w_k.weight": (16, 32), f"{prefix}.crossattn.w_k.bias": (16,),
            f"{prefix}.crossattn.w_v.weight": (16, 32), f"{prefix}.crossattn.w_v.bias": (16,),
            f"{prefix}.crossattn.z_linear.weight": (cout, 16), f"{prefix}.crossattn.z_linear.bias": (cout,),
            f"{prefix}.crossattn.norm1.weight": (cout,), f"{prefix}.crossattn.norm1.bias": (cout,),
            f"{prefix}.crossattn.feedforward.0.weight": (32, cout),
            f"{prefix}.crossattn.feedforward.0.bias": (32,),
            f"{prefix}.crossattn.feedforward.2.weight": (cout, 32),
            f"{prefix}.crossattn.feedforward.2.bias": (cout,),
            f"{prefix}.crossattn.norm2.weight": (cout,), f"{prefix}.crossattn.norm2.bias": (cout,),
        })

    chs = [1, 64, 128, 256, 512, 1024]
    for i in range(5):
        block(f"enc_convs.{i}", chs[i], chs[i + 1])
    for j, c in enumerate([1024, 512, 256, 128]):  # ConvTranspose2d(k2, s2, c -> c/2)
        shapes[f"deconvs.{j}.weight"] = (c, c // 2, 2, 2)
        shapes[f"deconvs.{j}.bias"] = (c // 2,)
        block(f"dec_convs.{j}", c, c // 2)  # concat [skip, up] = 2 * (c/2) channels in
    shapes["output.weight"] = (1, 64, 1, 1)
    shapes["output.bias"] = (1,)
    return shapes


def test_reference_matches_spec_layer_by_layer():
    model = UNet(get_preset("reference").model)
    got = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert got == spec_parameter_shapes()
    assert count_parameters(model) == 32_175_313
    assert sum(v.numel() for v in model.state_dict().values()) == 32_187_235
    assert len(model.maxpools) == 4
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 18


def test_reference_at_48_px_maps_each_image_on_its_own():
    # In eval mode (BatchNorm's running statistics) an image's output depends on its own
    # input, timestep and label only, not on what else is in the batch
    torch.manual_seed(0)
    model = UNet(get_preset("reference").model).eval()
    x = torch.randn(3, 1, 48, 48)
    with torch.no_grad():
        out = model(x[:2], torch.tensor([0, 999]), torch.tensor([3, 7]))
        other = model(torch.stack([x[0], x[2]]), torch.tensor([0, 500]), torch.tensor([3, 1]))
    assert out.shape == (2, 1, 48, 48)
    assert torch.allclose(out[0], other[0], atol=1e-5) and not torch.allclose(out[1], other[1])


def test_tiny_forward_and_label_dependence():
    torch.manual_seed(0)
    model = UNet(get_preset("tiny").model).eval()
    x, t = torch.randn(4, 1, 16, 16), torch.tensor([0, 10, 50, 99])
    a = model(x, t, torch.tensor([0, 1, 2, 3]))
    b = model(x, t, torch.tensor([4, 5, 6, 7]))
    assert a.shape == (4, 1, 16, 16)
    assert not torch.allclose(a, b)  # the label reaches the output


def test_options_past_the_reference():
    cfg = get_preset("tiny").model
    cfg.null_class, cfg.cond_tokens, cfg.norm = True, 4, "group"
    model = UNet(cfg)
    assert model.cls_emb.weight.shape == (11, 4 * cfg.cls_emb_dim) and model.null_label == 10
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([1, 2])
    out = model(x, t, torch.tensor([10, 3]))
    assert out.shape == (2, 1, 16, 16)
    assert not torch.allclose(out[0], model(x, t, torch.tensor([4, 3]))[0])  # the null label is its own


def _attention_levels(model):
    """The levels (0: full resolution) whose encoder and decoder blocks have cross-attention."""
    levels = len(model.enc_convs)
    enc = {i for i, b in enumerate(model.enc_convs) if b.crossattn is not None}
    dec = {levels - 2 - j for j, b in enumerate(model.dec_convs) if b.crossattn is not None}
    return enc, dec


def test_attention_only_from_the_level_asked_for():
    cfg = get_preset("tiny").model
    cfg.channels = (8, 16, 32)
    for start, enc, dec in [(0, {0, 1, 2}, {0, 1}), (1, {1, 2}, {1}), (2, {2}, set())]:
        cfg.attn_from_level = start
        torch.manual_seed(0)
        model = UNet(cfg).eval()
        assert _attention_levels(model) == (enc, dec)
        x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 5])
        # the label still reaches the output through the levels that keep attention
        assert not torch.allclose(model(x, t, torch.tensor([1, 1])), model(x, t, torch.tensor([2, 2])))


def test_residual_blocks_throughout_and_the_label_reaches_the_output():
    from diffusion101.conv_block import ResBlock
    cfg = get_preset("tiny").model
    cfg.block, cfg.norm = "residual", "group"
    torch.manual_seed(0)
    model = UNet(cfg).eval()
    blocks = list(model.enc_convs) + list(model.dec_convs)
    assert all(isinstance(b, ResBlock) for b in blocks)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 60])
    a = model(x, t, torch.tensor([1, 2]))
    assert a.shape == (2, 1, 16, 16) and not torch.allclose(a, model(x, t, torch.tensor([3, 4])))
