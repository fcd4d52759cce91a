import torch

from diffusion101.conv_block import ConvBlock


def test_shapes_and_time_dependence():
    torch.manual_seed(0)
    block = ConvBlock(1, 64, time_emb_dim=256, q_dim=16, v_dim=16, ffn_dim=32, cls_dim=32).eval()
    x, ctx = torch.randn(2, 1, 48, 48), torch.randn(2, 1, 32)
    t1, t2 = torch.randn(2, 256), torch.randn(2, 256)
    y1 = block(x, t1, ctx)
    assert y1.shape == (2, 64, 48, 48)
    assert not torch.allclose(y1, block(x, t2, ctx))  # the timestep reaches the output
    small = ConvBlock(8, 16, 16, 8, 8, 16, 8)
    assert small(torch.randn(3, 8, 4, 4), torch.randn(3, 16), torch.randn(3, 1, 8)).shape == (3, 16, 4, 4)
