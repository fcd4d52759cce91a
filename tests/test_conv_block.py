import pytest
import torch
import torch.nn.functional as F

import dataclasses

from diffusion101.config import ModelConfig
from diffusion101.conv_block import ConvBlock, ResBlock

CFG = ModelConfig(time_emb_dim=16, q_dim=8, v_dim=8, ffn_dim=16, cls_emb_dim=8)  # BatchNorm
GROUP = dataclasses.replace(CFG, norm="group")


def test_reference_block_is_conv_norm_relu_time_shift_conv_norm_relu_attention():
    # The block's formula written out from its layers, in eval mode (BatchNorm's running stats)
    torch.manual_seed(0)
    block = ConvBlock(3, 8, CFG).eval()
    x, t_emb, ctx = torch.randn(2, 3, 6, 6), torch.randn(2, 16), torch.randn(2, 1, 8)
    conv1, bn1 = block.seq1[0], block.seq1[1]
    h = F.relu(F.batch_norm(F.conv2d(x, conv1.weight, conv1.bias, padding=1), bn1.running_mean,
                            bn1.running_var, bn1.weight, bn1.bias, eps=bn1.eps))
    h = h + F.relu(F.linear(t_emb, block.time_emb_linear.weight, block.time_emb_linear.bias))[:, :, None, None]
    conv2, bn2 = block.seq2[0], block.seq2[1]
    h = F.relu(F.batch_norm(F.conv2d(h, conv2.weight, conv2.bias, padding=1), bn2.running_mean,
                            bn2.running_var, bn2.weight, bn2.bias, eps=bn2.eps))
    assert torch.allclose(block(x, t_emb, ctx), block.crossattn(h, ctx), atol=1e-6)
    assert not torch.allclose(block(x, t_emb, ctx), block(x, torch.randn(2, 16), ctx))


def test_a_block_without_attention_has_none_and_ignores_the_label():
    torch.manual_seed(0)
    for kind in (ConvBlock, ResBlock):
        block = kind(4, 8, CFG, attention=False).eval()
        assert block.crossattn is None
        assert not any("crossattn" in name for name in block.state_dict())
        x, t_emb = torch.randn(2, 4, 6, 6), torch.randn(2, 16)
        assert torch.equal(block(x, t_emb, torch.randn(2, 1, 8)), block(x, t_emb, torch.randn(2, 1, 8)))


@pytest.mark.parametrize("in_ch, out_ch", [(8, 8), (4, 8)])
def test_residual_block_with_its_last_conv_zeroed_is_its_skip(in_ch, out_ch):
    # x + conv2(...): with conv2 = 0 the block passes its input on (a 1x1 conv where the
    # channel count changes), whatever the timestep
    torch.manual_seed(0)
    block = ResBlock(in_ch, out_ch, GROUP, attention=False)
    with torch.no_grad():
        block.conv2.weight.zero_()
        block.conv2.bias.zero_()
    x = torch.randn(2, in_ch, 6, 6)
    out = block(x, torch.randn(2, 16), None)
    skip = x if in_ch == out_ch else F.conv2d(x, block.skip.weight, block.skip.bias)
    assert torch.allclose(out, skip, atol=1e-6)


def test_residual_block_time_embedding_is_a_scale_and_a_shift():
    # The second half of time_emb_linear's output shifts norm2's output, the first half scales
    # it by (1 + s): zero both halves' weights and set the biases, and conv2 must see
    # SiLU(norm2(h) * (1 + scale) + shift)
    torch.manual_seed(0)
    block = ResBlock(4, 4, GROUP, attention=False)
    scale, shift = torch.randn(4), torch.randn(4)
    with torch.no_grad():
        block.time_emb_linear.weight.zero_()
        block.time_emb_linear.bias.copy_(torch.cat([scale, shift]))
    x = torch.randn(2, 4, 6, 6)
    h = block.norm2(block.conv1(F.silu(block.norm1(x))))
    h = h * (1 + scale[None, :, None, None]) + shift[None, :, None, None]
    expected = x + block.conv2(F.silu(h))
    assert torch.allclose(block(x, torch.randn(2, 16), None), expected, atol=1e-6)

