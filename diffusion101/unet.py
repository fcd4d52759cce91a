"""The UNet f_theta(x_t, t, y): from a noisy image, its timestep and a label, it predicts what
diffusion.prediction names (the noise eps, or v), conditioned on the label by cross-attention."""
import torch
from torch import nn

from .config import ModelConfig
from .conv_block import BLOCKS
from .time_position_emb import TimePositionEmbedding, embed_time


class UNet(nn.Module):
    """Encoder: a block then MaxPool per level; decoder: ConvTranspose, concat skip, a block.

    With the reference's channels (64..1024) and 48x48 inputs: 48 -> 24 -> 12 -> 6 -> 3.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        chs = [cfg.in_channels] + list(cfg.channels)
        def time_layers():
            return nn.Sequential(TimePositionEmbedding(cfg.time_emb_dim),
                                 nn.Linear(cfg.time_emb_dim, cfg.time_emb_dim), nn.ReLU())
        self.time_emb = time_layers()
        self.interval_emb = time_layers() if cfg.interval_input else None  # MeanFlow's t - r
        # One row per class (plus the null class for guidance), holding cond_tokens tokens.
        self.null_label = cfg.num_classes if cfg.null_class else None
        self.cls_emb = nn.Embedding(cfg.num_classes + int(cfg.null_class),
                                    cfg.cls_emb_dim * cfg.cond_tokens)
        Block = BLOCKS[cfg.block]

        def make_block(in_ch, out_ch, level):  # level 0 is full resolution
            return Block(in_ch, out_ch, cfg, attention=level >= cfg.attn_from_level)
        self.enc_convs = nn.ModuleList(
            make_block(chs[i], chs[i + 1], level=i) for i in range(len(chs) - 1))
        self.maxpools = nn.ModuleList(nn.MaxPool2d(2) for _ in range(len(chs) - 2))
        self.deconvs = nn.ModuleList(
            nn.ConvTranspose2d(chs[i], chs[i - 1], kernel_size=2, stride=2)
            for i in range(len(chs) - 1, 1, -1))
        self.dec_convs = nn.ModuleList(
            make_block(2 * chs[i - 1], chs[i - 1], level=i - 2) for i in range(len(chs) - 1, 1, -1))
        self.output = nn.Conv2d(chs[1], cfg.in_channels, kernel_size=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # x: (B, 1, S, S) noisy images; t: (B,) timesteps (or (B, 2) with the interval t - r:
        # model.interval_input); y: (B,) int labels
        t_emb = embed_time(self.time_emb, self.interval_emb, t)  # (B, time_emb_dim)
        # (B, L, cls_emb_dim): L = cond_tokens label tokens (1 in the reference)
        context = self.cls_emb(y).view(y.shape[0], self.cfg.cond_tokens, self.cfg.cls_emb_dim)
        skips = []
        for i, conv in enumerate(self.enc_convs):
            x = conv(x, t_emb, context)
            if i < len(self.maxpools):
                skips.append(x)
                x = self.maxpools[i](x)
        for deconv, conv in zip(self.deconvs, self.dec_convs):
            x = deconv(x)
            x = conv(torch.cat([skips.pop(), x], dim=1), t_emb, context)
        return self.output(x)  # (B, C, S, S): the predicted eps or v
