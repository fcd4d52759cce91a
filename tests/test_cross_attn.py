import torch

from diffusion101.cross_attn import CrossAttention


def test_shapes():
    attn = CrossAttention(channels=64, q_dim=16, v_dim=16, ffn_dim=32, cls_dim=32)
    for hw in (48, 3):
        x = torch.randn(2, 64, hw, hw)
        assert attn(x, torch.randn(2, 1, 32)).shape == (2, 64, hw, hw)


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


def test_multi_token_softmax_is_not_constant_and_queries_matter():
    torch.manual_seed(0)
    attn = CrossAttention(8, 4, 4, 16, 6)
    x, ctx = torch.randn(2, 8, 5, 5), torch.randn(2, 4, 6)  # four label tokens
    b, c, h, w = x.shape
    q = attn.w_q(x.permute(0, 2, 3, 1).reshape(b, h * w, c))
    weights = torch.softmax(q @ attn.w_k(ctx).transpose(1, 2) / 2.0, dim=-1)  # (B, HW, 4)
    assert torch.allclose(weights.sum(-1), torch.ones(b, h * w), atol=1e-6)
    assert weights.std(dim=1).mean() > 1e-3  # the weights vary from pixel to pixel
    before = attn(x, ctx)
    with torch.no_grad():
        attn.w_q.weight.normal_()
    assert not torch.allclose(attn(x, ctx), before, atol=1e-4)  # unlike the one-token case
