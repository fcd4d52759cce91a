import math

import torch

from diffusion101.time_position_emb import TimePositionEmbedding


def test_shape_and_closed_form():
    emb = TimePositionEmbedding(256)
    t = torch.tensor([0, 1, 500, 999])
    out = emb(t)
    assert out.shape == (4, 256)
    # t = 0: every sine 0, every cosine 1
    assert torch.equal(out[0, :128], torch.zeros(128)) and torch.equal(out[0, 128:], torch.ones(128))
    for row, tv in ((1, 1), (2, 500), (3, 999)):
        for i in (0, 1, 37, 127):
            freq = math.exp(-i * math.log(10000) / 127)
            assert abs(out[row, i].item() - math.sin(tv * freq)) < 1e-4
            assert abs(out[row, 128 + i].item() - math.cos(tv * freq)) < 1e-4


def test_frequencies_span_one_to_ten_thousandth():
    f = TimePositionEmbedding(256).freqs
    assert f.shape == (128,)
    assert abs(f[0].item() - 1.0) < 1e-7 and abs(f[-1].item() - 1e-4) < 1e-9
