"""Configuration: one dataclass per concern, each field with its range and its reason (the
presets, named instances of them, are in presets.py). Any field can be set with ``--set section.field=value`` (settings.py
reads and checks it); the resolved configuration is printed at start and stored, as a plain
dict, in every checkpoint."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


# A guidance interval (sample.guidance_interval, in t / timesteps) that holds every step.
EVERY_STEP = (0.0, 1.0)


class UserError(ValueError):
    """A problem with what the user asked for: shown as one line, never a traceback (a
    ValueError, as the Python API promises for a bad argument)."""


# Ctrl-C presses this process has seen since its command started (cli.run_cli's handler notes
# each before raising KeyboardInterrupt). Library code sometimes catches and drops the
# exception (an import, a callback run from C); the note survives that.
PRESSED: list = []


def check_interrupt() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed: loops call this between steps, so that a
    press whose exception was swallowed on the way still stops the work at the next step."""
    if PRESSED:
        raise KeyboardInterrupt


# Every field declares what it may hold, once: a range (for numbers, and for each item of a
# tuple) or a list of choices. settings.validate() is derived from these; a comparison written as
# `lo <= x <= hi` is False for NaN, so NaN can never pass.
BIG = 10 ** 9
SEED_MAX = 2 ** 32 - 1  # numpy's seeds are 32-bit


def num(default, lo, hi, *, above_lo: bool = False, below_hi: bool = False, help: str = ""):
    """A number (or a tuple of numbers) in [lo, hi]; above_lo / below_hi make an end open;
    `help`, the help of its command-line flag where it has one."""
    return field(default=default, metadata={"range": (lo, hi, above_lo, below_hi), "help": help})


def choice(default, *allowed, help: str = ""):
    return field(default=default, metadata={"choices": (default,) + allowed, "help": help})


@dataclass
class ModelConfig:
    # The network (networks.py builds it): "unet" (unet.py, the reference), or "dit", a
    # transformer over patches (dit.py), which reads the four fields after the UNet's
    backbone: str = choice("unet", "dit")
    img_size: int = num(48, 4, 1024)
    in_channels: int = num(1, 1, 3)  # 1 (grey, as MNIST) or 3 (RGB, a folder of one's own)
    channels: tuple = num((64, 128, 256, 512, 1024), 1, 8192)  # one ConvBlock per level
    time_emb_dim: int = num(256, 4, 8192)  # even: half sines, half cosines
    num_classes: int = num(10, 2, 10000)  # MNIST: at least its ten digits; a folder: its classes
    cls_emb_dim: int = num(32, 1, 8192)
    q_dim: int = num(16, 1, 8192)  # cross-attention query/key size
    v_dim: int = num(16, 1, 8192)  # cross-attention value size
    ffn_dim: int = num(32, 1, 8192)  # cross-attention feed-forward hidden size
    # The name of each label, from the folder it was trained on (train.data); empty: the
    # labels are the digits 0, 1, 2, ... (MNIST). Sampling takes these names, and the grid
    # and the progression figure are captioned with them.
    class_names: tuple = field(default=(), metadata={"names": "may be empty"})
    # Past the reference (all off there):
    cond_tokens: int = num(1, 1, 256)  # label tokens per class; 1 makes the softmax constant
    null_class: bool = False  # a learned "no label" token, for classifier-free guidance
    norm: str = choice("batch", "group")  # "group": no train/eval gap, EMA-friendly
    # "reference": conv-norm-ReLU twice, the time embedding added between; "residual": norm,
    # SiLU, conv twice around a skip connection, the time embedding as a scale and shift
    block: str = choice("reference", "residual")
    # Cross-attention only in the blocks at this level and below it (0: every level, the
    # reference; 1: none at full resolution, where its per-pixel projections cost the most)
    attn_from_level: int = num(0, 0, 64)
    patch_size: int = num(2, 1, 64)  # dit: the side of a patch; each patch is a token
    width: int = num(128, 4, 8192)  # dit: the tokens' width (divisible by the heads)
    depth: int = num(6, 1, 256)  # dit: transformer blocks
    heads: int = num(4, 1, 256)  # dit: attention heads
    # A second time input, the interval t - r, embedded as the time is and added to it: the
    # network of an objective that learns over an interval (meanflow.py)
    interval_input: bool = False


@dataclass
class DiffusionConfig:
    # "ddpm": noise x_0 by the schedule below and predict eps or v (diffusion.py); "flow":
    # flow matching, x_t = (1 - t) x_0 + t eps on t in [0, 1], predict the velocity (flow.py);
    # "meanflow": the same path, predict the average velocity from t down to r (meanflow.py)
    objective: str = choice("ddpm", "flow", "meanflow")
    timesteps: int = num(1000, 2, 100_000)  # (flow: the network reads t scaled to 0..T-1)
    beta_start: float = num(1e-4, 0.0, 1.0, above_lo=True, below_hi=True)
    beta_end: float = num(0.02, 0.0, 1.0, above_lo=True, below_hi=True)
    schedule: str = choice("linear", "cosine")  # cosine: Nichol & Dhariwal 2021
    # What the network predicts: ddpm eps or v; flow the velocity, or with "x0" the clean
    # image (Li and He 2025: an image lies near a low-dimensional manifold, noise does not)
    prediction: str = choice("eps", "v", "x0")
    # "x_t": clamp x_t to [-1, 1] after every reverse step (the reference); "x0": clamp the
    # predicted x_0 instead (the usual practice); "none"
    clip: str = choice("x_t", "x0", "none")
    # flow: training times uniform, or logit-normal (SD3's default: sigmoid(mean + std * N(0, 1))
    # puts the middle of the path, where the velocity is hardest to tell, most often), or
    # "walk": only the times a uniform walk of walk_steps Euler steps visits (a distilled
    # student's, distill.py)
    t_sampling: str = choice("uniform", "logit_normal", "walk")
    walk_steps: int = num(4, 1, 10_000)  # "walk": the steps of that walk
    logit_mean: float = num(0.0, -10.0, 10.0)
    logit_std: float = num(1.0, 0.0, 10.0, above_lo=True)
    # meanflow: the share of training images given an interval (r < t); the rest have r = t,
    # where the average velocity is the instantaneous one and the target is flow matching's
    interval_share: float = num(0.25, 0.0, 1.0)
    # meanflow: the guidance scale trained into the target (1: none), so that a guided step
    # is one network call (Geng et al. 2025, section 4.2)
    trained_guidance: float = num(1.0, 0.0, 100.0)
    # meanflow: each image's loss weighted by 1 / (its mean squared error + 1e-3) ** p (the
    # paper's adaptive weighting; 0 is the plain mean squared error)
    adaptive_p: float = num(1.0, 0.0, 2.0)


@dataclass
class TrainConfig:
    epochs: int = num(200, 0, BIG, help="passes over the training set")
    batch_size: int = num(400, 1, 1_000_000, help="images per optimizer step")
    lr: float = num(1e-3, 0.0, 10.0, above_lo=True, help="the learning rate")
    loss: str = choice("l1", "mse")
    max_steps: int = num(0, 0, BIG, help="stop (and save) after this many steps (0: no limit)")
    max_minutes: float = num(0.0, 0.0, 1e7, help="stop (and save) after this many training "
                             "minutes (0: no limit)")
    save_every: int = num(0, 0, BIG, help="also save every N steps (0: after each epoch only)")
    seed: int = num(0, 0, SEED_MAX, help="the run's random seed")
    data: str = field(default="mnist", metadata={"text": True, "help": (
        "'mnist', or a folder with one sub-folder of images per class (their sorted names "
        "become the labels)")})
    # Past the reference (all off there):
    p_uncond: float = num(0.0, 0.0, 1.0, below_hi=True)  # label -> null class (CFG)
    ema_decay: float = num(0.0, 0.0, 1.0, below_hi=True)  # 0: no EMA
    # Keep the raw weights at step 0 and every N steps in <out>.snapshots/, to rebuild the EMA
    # of any decay afterwards (posthoc_ema.py) and to guide by an earlier point (0: none)
    snapshot_every: int = num(0, 0, BIG)
    # Min-SNR-gamma loss weighting (Hang et al. 2023): each timestep's loss weighted so that
    # it counts as min(SNR, gamma) times the error in x_0; 0: unweighted
    snr_gamma: float = num(0.0, 0.0, 1e6)
    lr_schedule: str = choice("constant", "cosine")  # cosine: linear warmup, decay to 0
    warmup_steps: int = num(0, 0, BIG)
    optimizer: str = choice("adam", "adamw")
    weight_decay: float = num(0.0, 0.0, 10.0)
    grad_clip: float = num(0.0, 0.0, 1e9)  # 0: off; else the max global gradient norm
    eval_every_steps: int = num(0, 0, BIG, help="log conditional accuracy and FID to "
                                "TensorBoard every N steps (0: off)")
    eval_n: int = num(500, 10, 1_000_000)  # digits generated for each of those evaluations
    grid_every: int = num(1, 0, BIG)  # epochs between TensorBoard grids of digits 0-9 (0: never)
    # Speed (docs/BENCHMARKS.md); "auto" is on for CUDA and off for CPU:
    precision: str = choice("auto", "fp32", "bf16")  # bf16: autocast, and TF32 on CUDA
    channels_last: str = choice("auto", "on", "off")
    # torch.compile the network; "graphs" also replays it as CUDA graphs (mode
    # "reduce-overhead": one launch a step instead of hundreds), on CUDA only
    compile: str = choice("auto", "on", "off", "graphs")
    fused_optimizer: str = choice("auto", "on", "off")  # one fused kernel for the Adam update
    data_on_device: str = choice("auto", "on", "off")  # the uint8 set kept on the GPU (CUDA)
    # With one label token, skip the attention's softmax over that one key (it is exactly 1;
    # speed.OneTokenAttention): the same bits, less work per pixel
    one_token_shortcut: str = choice("auto", "on", "off")


@dataclass
class SampleConfig:
    """The sampler a checkpoint uses by default: the best measured for its preset. Each field's
    help is the help of its flag (--steps, --guidance-rule, ...: cli.add_field_flags)."""
    sampler: str = choice("ddpm", "ddim", "dpm", "euler", "heun", "jump", help=(
        "the sampler (ddpm, ddim, dpm walk DDPM; euler, heun flow; jump MeanFlow)"))
    steps: int = num(1000, 1, 100_000, help="sampler steps (ddpm: all diffusion.timesteps)")
    guidance: float = num(1.0, 0.0, 100.0, help="classifier-free guidance scale w (1: none)")
    guidance_interval: tuple = num(EVERY_STEP, 0.0, 1.0, help=(
        "LO,HI: guide only while t/T is in [LO, HI] (Kynkaeaenniemi et al. 2024); elsewhere the "
        "conditional prediction alone, one forward instead of two"))
    guidance_rule: str = choice("cfg", "apg", "auto", help=(
        "how guidance combines the predictions: classifier-free, adaptive projected, or "
        "autoguidance by a weaker guide network"))
    apg_eta: float = num(0.0, 0.0, 1.0, help="apg: the weight of the guidance term's part "
                         "parallel to the conditional x_0 (1: cfg)")
    apg_momentum: float = num(0.0, -1.0, 1.0, above_lo=True, below_hi=True, help=(
        "apg: momentum over the walk's guided steps (Sadat et al. use negative values)"))
    apg_norm_threshold: float = num(0.0, 0.0, 1e6, help="apg: the largest norm of the "
                                    "guidance term per image (0: none)")
    guide: str = field(default="", metadata={"text": "may be empty", "help": (
        "auto: the guide checkpoint, a weaker model of the same data (same size, classes and "
        "noise schedule)")})
    guide_cfg: float = num(1.0, 0.0, 100.0, help="auto: the scale of a classifier-free term "
                           "beside it (1: none)")
    eta: float = num(0.0, 0.0, 1.0, help="ddim: noise, 0 deterministic, 1 DDPM-like")
    timestep_spacing: str = choice("uniform", "logsnr", "trailing", help=(
        "the timesteps a few-step DDPM walk visits: uniform in t down to 0, uniform in "
        "log(alpha/sigma), or uniform ending one spacing above 0"))
    use_ema: bool = True  # sample with the EMA weights when the checkpoint has them
    # (below 0.01 the grid's arithmetic underflows to NaN)
    shift: float = num(1.0, 0.01, 100.0, help="flow: SD3's time shift of the walk's grid, "
                       "t -> s t / (1 + (s - 1) t); s > 1 spends more steps near the noise")


@dataclass
class LoRAConfig:
    r: int = num(8, 1, 4096)
    alpha: float = num(1.0, 0.0, 1e6, above_lo=True)
    targets: tuple = ("w_q", "w_k", "w_v")  # Linear names inside the cross-attention modules
    epochs: int = num(1, 0, BIG)
    batch_size: int = num(400, 1, 1_000_000)
    lr: float = num(1e-3, 0.0, 10.0, above_lo=True)
    max_steps: int = num(0, 0, BIG)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        """Plain dict (lists, not tuples) so it pickles under weights_only and prints as JSON."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        cfg = cls()
        for section, values in d.items():
            for name, value in values.items():
                set_field(cfg.section(section), section, name, value)
        return cfg

    def section(self, name: str):
        """The section `name` (model, diffusion, ...): only these, never another attribute."""
        known = [f.name for f in dataclasses.fields(self)]
        if name not in known:
            raise UserError(f"unknown config section '{name}' (known: {', '.join(known)})")
        return getattr(self, name)

    def __str__(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def field_default(sub, section: str, name: str):
    """The default of field `name` of the section `sub`; a UserError for a name that is none."""
    fields = [f.name for f in dataclasses.fields(sub)]
    if name not in fields:
        raise UserError(f"unknown config field '{section}.{name}' (known: {', '.join(fields)})")
    return getattr(type(sub)(), name)


def set_field(sub, section: str, name: str, value):
    if isinstance(field_default(sub, section, name), tuple):
        if not isinstance(value, (list, tuple)):  # tuple("abc") would be three names
            raise UserError(f"{section}.{name} must be a list, not {value!r}")
        value = tuple(value)
    setattr(sub, name, value)
