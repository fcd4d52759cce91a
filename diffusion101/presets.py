"""The presets: named configurations, each a recipe measured for its purpose (docs/EXPERIMENTS.md
has the measurements behind each choice)."""
from __future__ import annotations

from .config import (Config, DiffusionConfig, LoRAConfig, ModelConfig, SampleConfig, TrainConfig,
                     UserError)


def _reference() -> Config:
    # docs/REFERENCE.md in numbers: the dataclass defaults are the reference design, kept in fp32
    # on every device (bf16 is an option: --set train.precision=bf16).
    cfg = Config()
    cfg.train.precision = "fp32"
    # Its TensorBoard grid samples with the 1000-step DDPM: 1,000 network calls, which on a GPU
    # cost about what an epoch of training does; every tenth epoch is enough to watch.
    cfg.train.grid_every = 10
    return cfg


def _tiny() -> Config:
    # A few thousand parameters at 16 px, 100 timesteps: for tests, seconds on a CPU.
    return Config(
        model=ModelConfig(img_size=16, channels=(8, 16), time_emb_dim=16, cls_emb_dim=8,
                          q_dim=8, v_dim=8, ffn_dim=16),
        diffusion=DiffusionConfig(timesteps=100, beta_start=1e-4, beta_end=0.2),
        train=TrainConfig(epochs=1, batch_size=16, lr=1e-3),
        lora=LoRAConfig(r=4, alpha=1.0, epochs=1, batch_size=16),
        sample=SampleConfig(sampler="ddpm", steps=100),
    )


def _small() -> Config:
    # The reference architecture scaled to a CPU laptop: 28 px (MNIST's own size, no resize),
    # three levels (28 -> 14 -> 7), the reference schedule, loss and optimizer.
    return Config(
        model=ModelConfig(img_size=28, channels=(32, 64, 128), time_emb_dim=128,
                          cls_emb_dim=32, q_dim=16, v_dim=16, ffn_dim=64),
        diffusion=DiffusionConfig(),
        train=TrainConfig(epochs=2, batch_size=128, lr=1e-3),
        lora=LoRAConfig(epochs=1, batch_size=128),
    )


def _cpu_ddpm() -> Config:
    # Quality per CPU-minute by DDPM (the `cpu` preset until flow matching beat it at matched
    # accuracy); docs/EXPERIMENTS.md has the measurement behind each choice:
    # 28 px (no resize), three levels, BatchNorm (GroupNorm normalises each image on its own and
    # so erases the brightness level that this skip-less block needs), four label tokens so
    # that the attention's softmax varies, a null class for guidance, MSE on v (it learns
    # faster than eps at equal steps), the cosine noise schedule (better class accuracy at equal
    # FID than the linear one), AdamW with warmup and cosine decay, EMA (in these 1,200 steps
    # its warm-up min(decay, (1 + i) / (10 + i)) stays below 0.995 and so sets the length), and
    # a few-step DPM-Solver++ sampler with guidance 1.75 (about where accuracy reaches the
    # project's bar; more guidance costs FID).
    return Config(
        model=ModelConfig(img_size=28, channels=(32, 64, 128), time_emb_dim=128, cls_emb_dim=32,
                          q_dim=16, v_dim=16, ffn_dim=64, cond_tokens=4, null_class=True,
                          norm="batch"),
        diffusion=DiffusionConfig(clip="x0", prediction="v", schedule="cosine"),
        train=TrainConfig(epochs=3, max_steps=1200, batch_size=128, lr=2e-3, loss="mse",
                          optimizer="adamw", lr_schedule="cosine", warmup_steps=100,
                          p_uncond=0.1, ema_decay=0.995, grad_clip=1.0),
        lora=LoRAConfig(epochs=1, batch_size=128),
        sample=SampleConfig(sampler="dpm", steps=20, guidance=1.75),
    )


def _cpu() -> Config:
    # The DDPM recipe's network and training, by flow matching (flow.py): the velocity
    # eps - x_0 on the straight path, training times logit-normal (SD3's default), no
    # clipping (as SD3), and 8 Heun steps with the same guidance. At matched accuracy it beats
    # `cpu-ddpm` in fewer network calls (docs/EXPERIMENTS.md, "Flow matching beside DDPM").
    cfg = _cpu_ddpm()
    cfg.diffusion = DiffusionConfig(objective="flow", clip="none", t_sampling="logit_normal")
    cfg.sample = SampleConfig(sampler="heun", steps=8, guidance=1.75)
    return cfg


def _cpu_dit() -> Config:
    # The `cpu` recipe (flow matching, logit-normal times, guidance, EMA, 1,200 steps) on the
    # transformer of dit.py instead of the UNet, at about the UNet's time per step on a CPU:
    # 4-pixel patches (a 7 x 7 grid of tokens at 28 px; 2-pixel patches make four times the
    # tokens and cost several times the time a step), width 128, 8 blocks of 4 heads, the
    # label as four tokens in the joint attention. AdamW at 1e-3 with the same warm-up: half
    # the UNet's rate, as attention without normalised queries and keys is the less stable.
    # The network predicts x_0, not the velocity (Li and He 2025), and samples with guidance
    # 3: for this network, at equal steps, each did better than the velocity and the UNet's
    # guidance 1.75 (docs/EXPERIMENTS.md, "A transformer beside the UNet").
    cfg = _cpu()
    cfg.model = ModelConfig(backbone="dit", img_size=28, patch_size=4, width=128, depth=8,
                            heads=4, time_emb_dim=128, cond_tokens=4, null_class=True)
    cfg.diffusion.prediction = "x0"
    cfg.train.lr = 1e-3
    cfg.sample.guidance = 3.0
    return cfg


def _cpu_onestep() -> Config:
    # One step from scratch by MeanFlow (meanflow.py), on the `cpu` recipe's UNet with the
    # changes the objective needs: GroupNorm (BatchNorm has no per-image forward-mode
    # derivative) and so the residual block (GroupNorm erases the brightness level that the
    # skip-less block needs), no attention at full resolution (the block costs more; this
    # buys the steps back), and the interval as a second time input. The paper's ImageNet
    # recipe for the rest: times logit-normal(-0.4, 1), a quarter of the images with an
    # interval, adaptive weighting p = 1, guidance trained in (w = 2), a step one network call.
    # AdamW at half the `cpu` preset's rate (the target moves with the network), 1,100 steps:
    # a step costs about twice flow matching's, and the budget is 30 minutes.
    cfg = _cpu()
    cfg.model.block, cfg.model.norm, cfg.model.attn_from_level = "residual", "group", 1
    cfg.model.interval_input = True
    # The network reads t scaled to 0..10 (diffusion.timesteps 11), not flow's 0..999: the
    # target holds the network's own derivative in t, which the scale multiplies, and at 999
    # the time embedding's fast features made it 30 times the velocity itself (docs/
    # EXPERIMENTS.md, "One step from scratch").
    cfg.diffusion = DiffusionConfig(objective="meanflow", timesteps=11, clip="none",
                                    t_sampling="logit_normal", logit_mean=-0.4, logit_std=1.0,
                                    interval_share=0.25, trained_guidance=2.0)
    cfg.train.lr, cfg.train.max_steps = 1e-3, 1100
    cfg.sample = SampleConfig(sampler="jump", steps=1, guidance=1.0)
    return cfg


PRESETS = {"reference": _reference, "cpu": _cpu, "cpu-ddpm": _cpu_ddpm, "cpu-dit": _cpu_dit,
           "cpu-onestep": _cpu_onestep, "small": _small, "tiny": _tiny}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}' (known: {', '.join(PRESETS)})")
    return PRESETS[name]()
