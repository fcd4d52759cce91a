import pytest
import torch

from diffusion101.cross_attn import CrossAttention


def test_pixels_are_tokens_shuffling_them_shuffles_the_output():
    # Every pixel attends to the label tokens on its own: permuting the pixels permutes the
    # output the same way, at any resolution (the reference's 48 x 48 down to 3 x 3)
    torch.manual_seed(0)
    attn = CrossAttention(channels=64, q_dim=16, v_dim=16, ffn_dim=32, cls_dim=32)
    ctx = torch.randn(2, 4, 32)
    for hw in (48, 3):
        x = torch.randn(2, 64, hw, hw)
        perm = torch.randperm(hw * hw)
        shuffled = x.flatten(2)[:, :, perm].reshape(x.shape)
        out = attn(x, ctx)
        assert out.shape == (2, 64, hw, hw)
        assert torch.allclose(attn(shuffled, ctx), out.flatten(2)[:, :, perm].reshape(x.shape), atol=1e-5)


def test_one_token_makes_queries_and_keys_irrelevant():
    # With a single key the softmax is 1: changing w_q or w_k must not change the output.
    torch.manual_seed(0)
    attn = CrossAttention(8, 4, 4, 16, 6)
    x, ctx = torch.randn(3, 8, 5, 5), torch.randn(3, 1, 6)
    before = attn(x, ctx)
    with torch.no_grad():
        attn.w_q.weight.normal_()
        attn.w_k.weight.normal_()
    assert torch.allclose(attn(x, ctx), before, atol=1e-6)


def test_output_layernormed_over_channels():
    attn = CrossAttention(8, 4, 4, 16, 6)
    out = attn(torch.randn(2, 8, 4, 4), torch.randn(2, 1, 6))
    mean = out.mean(dim=1)  # over channels, per pixel; LayerNorm's affine is identity at init
    assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-5)


def test_forward_equals_the_formulas_written_out():
    # softmax(Q K^T / sqrt(q_dim)) V, Linear back, residual + LayerNorm, FFN, residual + LayerNorm,
    # computed here in float64 from the module's own weights, with four label tokens
    import torch.nn.functional as F
    torch.manual_seed(0)
    attn = CrossAttention(8, 4, 4, 16, 6)
    with torch.no_grad():  # non-trivial LayerNorm affines, so they are checked too
        for norm in (attn.norm1, attn.norm2):
            norm.weight.normal_()
            norm.bias.normal_()
    x, ctx = torch.randn(2, 8, 5, 5), torch.randn(2, 4, 6)
    d = {k: v.double() for k, v in attn.state_dict().items()}
    pix = x.double().permute(0, 2, 3, 1).reshape(2, 25, 8)              # (B, HW, C)
    q = pix @ d["w_q.weight"].T + d["w_q.bias"]                          # (B, HW, 4)
    k = ctx.double() @ d["w_k.weight"].T + d["w_k.bias"]                 # (B, 4 tokens, 4)
    v = ctx.double() @ d["w_v.weight"].T + d["w_v.bias"]
    weights = torch.softmax(torch.einsum("bpq,btq->bpt", q, k) / 2.0, dim=-1)  # sqrt(4) = 2
    z = torch.einsum("bpt,btv->bpv", weights, v) @ d["z_linear.weight"].T + d["z_linear.bias"]
    z = F.layer_norm(z + pix, (8,), d["norm1.weight"], d["norm1.bias"])
    hidden = torch.relu(z @ d["feedforward.0.weight"].T + d["feedforward.0.bias"])
    out = F.layer_norm(hidden @ d["feedforward.2.weight"].T + d["feedforward.2.bias"] + z, (8,),
                       d["norm2.weight"], d["norm2.bias"])
    expected = out.reshape(2, 5, 5, 8).permute(0, 3, 1, 2)
    torch.testing.assert_close(attn(x, ctx).double(), expected, rtol=1e-5, atol=1e-5)
    assert weights.std(dim=1).mean() > 1e-3  # with several tokens the weights vary by pixel


def test_with_several_tokens_the_queries_matter():
    torch.manual_seed(0)
    attn = CrossAttention(8, 4, 4, 16, 6)
    x, ctx = torch.randn(2, 8, 5, 5), torch.randn(2, 4, 6)  # four label tokens
    before = attn(x, ctx)
    with torch.no_grad():
        attn.w_q.weight.normal_()
    assert not torch.allclose(attn(x, ctx), before, atol=1e-4)  # unlike the one-token case
