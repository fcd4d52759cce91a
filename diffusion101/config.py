"""Configuration: one dataclass per concern, presets as named instances.

Every field can be overridden from the command line with ``--set section.field=value``
(for example ``--set model.channels=32,64,128``). The resolved configuration is printed
at start and stored, as a plain dict, in every checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


# A guidance interval (sample.guidance_interval, in t / timesteps) that holds every step.
EVERY_STEP = (0.0, 1.0)


class UserError(Exception):
    """A problem with what the user asked for: shown as one line, never a traceback."""


@dataclass
class ModelConfig:
    img_size: int = 48
    in_channels: int = 1
    channels: tuple = (64, 128, 256, 512, 1024)  # one ConvBlock per level; maxpool between
    time_emb_dim: int = 256
    num_classes: int = 10
    cls_emb_dim: int = 32
    q_dim: int = 16  # cross-attention query/key size
    v_dim: int = 16  # cross-attention value size
    ffn_dim: int = 32  # cross-attention feed-forward hidden size
    # Past the reference (all off there):
    cond_tokens: int = 1  # label tokens per class; 1 makes the softmax constant (one key)
    null_class: bool = False  # a learned "no label" token, for classifier-free guidance
    norm: str = "batch"  # "batch" (reference) or "group" (no train/eval gap, EMA-friendly)


@dataclass
class DiffusionConfig:
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    schedule: str = "linear"  # or "cosine" (Nichol & Dhariwal 2021)
    prediction: str = "eps"  # what the network predicts: "eps" (reference) or "v"
    # "x_t": clamp x_t to [-1, 1] after every reverse step (the reference); "x0": clamp the
    # predicted x_0 instead (the usual practice); "none"
    clip: str = "x_t"


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 400
    lr: float = 1e-3
    loss: str = "l1"  # "l1" (reference) or "mse"
    max_steps: int = 0  # 0: no limit; otherwise stop (and save) after this many optimizer steps
    max_minutes: float = 0.0  # 0: no limit; otherwise stop (and save) after this much training time
    save_every: int = 0  # 0: save after each epoch only; otherwise also every N steps
    seed: int = 0
    # Past the reference (all off there):
    p_uncond: float = 0.0  # probability of replacing the label by the null class (CFG)
    ema_decay: float = 0.0  # 0: no EMA; else the decay of the weights' moving average
    lr_schedule: str = "constant"  # or "cosine": linear warmup, then cosine decay to 0
    warmup_steps: int = 0
    optimizer: str = "adam"  # "adam" (reference) or "adamw"
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # 0: off; else the max global gradient norm
    eval_every: int = 0  # epochs between quality evaluations logged to TensorBoard (0: off)
    eval_every_steps: int = 0  # the same, in optimizer steps
    eval_n: int = 500  # digits generated for each of those evaluations
    grid_every: int = 1  # epochs between the TensorBoard grids of digits 0-9 (0: never)
    # Speed (docs/BENCHMARKS.md); "auto" is on for CUDA and off for CPU:
    precision: str = "auto"  # "fp32", "bf16" (autocast; TF32 matmuls on CUDA too), "auto"
    channels_last: str = "auto"  # "on", "off", "auto"
    compile: str = "auto"  # torch.compile the network: "on", "off", "auto"
    fused_optimizer: str = "auto"  # one fused kernel for the Adam/AdamW update (CUDA only)
    data_on_device: str = "auto"  # keep the uint8 training set on the GPU: no copy per batch


@dataclass
class SampleConfig:
    """The sampler a checkpoint uses by default: the best measured for its preset."""
    sampler: str = "ddpm"  # "ddpm" (reference), "ddim" or "dpm"
    steps: int = 1000
    guidance: float = 1.0  # classifier-free guidance scale w; 1 is plain conditional
    # Guide only while t / timesteps lies in [lo, hi] (Kynkaeaenniemi et al. 2024, "limited
    # interval"); elsewhere the conditional prediction alone, one forward instead of two.
    guidance_interval: tuple = EVERY_STEP
    eta: float = 0.0  # DDIM noise: 0 deterministic, 1 DDPM-like
    use_ema: bool = True  # sample with the EMA weights when the checkpoint has them


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 1.0
    targets: tuple = ("w_q", "w_k", "w_v")  # Linear names inside the cross-attention modules
    epochs: int = 1
    batch_size: int = 400
    lr: float = 1e-3
    max_steps: int = 0


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
            sub = getattr(cfg, section, None)
            if sub is None or not dataclasses.is_dataclass(sub):
                raise UserError(f"unknown config section '{section}'")
            for name, value in values.items():
                _set_field(sub, section, name, value)
        return cfg

    def __str__(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _set_field(sub, section: str, name: str, value):
    fields = {f.name: f for f in dataclasses.fields(sub)}
    if name not in fields:
        raise UserError(f"unknown config field '{section}.{name}' (known: {', '.join(fields)})")
    default = getattr(type(sub)(), name)
    if isinstance(default, tuple):
        value = tuple(value)
    setattr(sub, name, value)


def _parse_value(text: str, default):
    """Parse a command-line string to the type of the field's default value."""
    try:
        if isinstance(default, bool):
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if isinstance(default, tuple):
            items = [s for s in text.split(",") if s]
            kind = type(default[0]) if default else str
            return tuple(kind(s) for s in items)
        return type(default)(text)
    except ValueError:
        raise UserError(f"cannot read '{text}' as {type(default).__name__}") from None


def apply_override(cfg: Config, assignment: str) -> None:
    """Apply one 'section.field=value' assignment in place."""
    if "=" not in assignment or "." not in assignment.split("=", 1)[0]:
        raise UserError(f"override '{assignment}' is not of the form section.field=value")
    key, text = assignment.split("=", 1)
    section, name = key.split(".", 1)
    sub = getattr(cfg, section, None)
    if sub is None or not dataclasses.is_dataclass(sub):
        raise UserError(f"unknown config section '{section}' (known: model, diffusion, train, lora, sample)")
    if name not in {f.name for f in dataclasses.fields(sub)}:
        known = ", ".join(f.name for f in dataclasses.fields(sub))
        raise UserError(f"unknown config field '{key}' (known in {section}: {known})")
    _set_field(sub, section, name, _parse_value(text, getattr(sub, name)))


def _reference() -> Config:
    # SPEC.md in exact numbers: the dataclass defaults are the reference design, kept in fp32
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


def _cpu() -> Config:
    # Quality per CPU-minute (docs/EXPERIMENTS.md has the measurements behind each choice):
    # 28 px (no resize), three levels, BatchNorm (GroupNorm, per image, erases the brightness
    # level this skip-less block design needs: grey backgrounds, 22% accuracy), four label
    # tokens so the attention attends, a null class for guidance, MSE on v (at 600 steps: 97.8%
    # accuracy against 73.8% for eps), AdamW with warmup and cosine decay, EMA, and a few-step
    # DPM-Solver++ sampler with guidance.
    return Config(
        model=ModelConfig(img_size=28, channels=(32, 64, 128), time_emb_dim=128, cls_emb_dim=32,
                          q_dim=16, v_dim=16, ffn_dim=64, cond_tokens=4, null_class=True,
                          norm="batch"),
        diffusion=DiffusionConfig(clip="x0", prediction="v"),
        train=TrainConfig(epochs=3, max_steps=1200, batch_size=128, lr=2e-3, loss="mse",
                          optimizer="adamw", lr_schedule="cosine", warmup_steps=100,
                          p_uncond=0.1, ema_decay=0.995, grad_clip=1.0),
        lora=LoRAConfig(epochs=1, batch_size=128),
        # guidance 2: at 1,200 steps (v) 99.55% accuracy with FID 1.83; w = 3 100% but FID 4.27
        sample=SampleConfig(sampler="dpm", steps=20, guidance=2.0),
    )


PRESETS = {"reference": _reference, "cpu": _cpu, "small": _small, "tiny": _tiny}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}' (known: {', '.join(PRESETS)})")
    return PRESETS[name]()


def validate(cfg: Config) -> None:
    """Catch configurations the model cannot be built from, before any work starts."""
    m = cfg.model
    levels = len(m.channels)
    if levels < 1 or any(c <= 0 for c in m.channels):
        raise UserError("model.channels must be a non-empty list of positive ints")
    if m.img_size <= 0 or m.img_size % (2 ** (levels - 1)):
        raise UserError(f"model.img_size={m.img_size} must be divisible by 2**{levels - 1} "
                        f"for {levels} levels")
    if m.time_emb_dim < 4 or m.time_emb_dim % 2:
        raise UserError("model.time_emb_dim must be an even number >= 4")
    d = cfg.diffusion
    if d.timesteps < 2 or not (0 < d.beta_start < d.beta_end < 1):
        raise UserError("diffusion needs timesteps >= 2 and 0 < beta_start < beta_end < 1")
    for name, value, allowed in (("clip", d.clip, ("x_t", "x0", "none")),
                                 ("schedule", d.schedule, ("linear", "cosine")),
                                 ("prediction", d.prediction, ("eps", "v"))):
        if value not in allowed:
            raise UserError(f"diffusion.{name} must be one of {', '.join(allowed)}, not '{value}'")
    if m.cond_tokens < 1 or m.norm not in ("batch", "group"):
        raise UserError("model.cond_tokens must be >= 1 and model.norm 'batch' or 'group'")
    t = cfg.train
    for name, value, allowed in (("lr_schedule", t.lr_schedule, ("constant", "cosine")),
                                 ("optimizer", t.optimizer, ("adam", "adamw"))):
        if value not in allowed:
            raise UserError(f"train.{name} must be one of {', '.join(allowed)}, not '{value}'")
    for name, value, allowed in (("precision", t.precision, ("auto", "fp32", "bf16")),
                                 ("channels_last", t.channels_last, ("auto", "on", "off")),
                                 ("compile", t.compile, ("auto", "on", "off")),
                                 ("fused_optimizer", t.fused_optimizer, ("auto", "on", "off")),
                                 ("data_on_device", t.data_on_device, ("auto", "on", "off"))):
        if value not in allowed:
            raise UserError(f"train.{name} must be one of {', '.join(allowed)}, not '{value}'")
    if not 0 <= t.p_uncond < 1 or not 0 <= t.ema_decay < 1:
        raise UserError("train.p_uncond and train.ema_decay must be in [0, 1)")
    if t.p_uncond > 0 and not m.null_class:
        raise UserError("train.p_uncond > 0 needs model.null_class=true (the label to drop to)")
    s = cfg.sample
    if s.sampler not in ("ddpm", "ddim", "dpm") or not 1 <= s.steps <= d.timesteps:
        raise UserError(f"sample.sampler must be ddpm, ddim or dpm and sample.steps in "
                        f"1..{d.timesteps}")
    gi = s.guidance_interval
    if len(gi) != 2 or not 0 <= gi[0] <= gi[1] <= 1:
        raise UserError("sample.guidance_interval must be two fractions lo,hi with 0 <= lo <= hi <= 1")
    if t.loss not in ("l1", "mse"):
        raise UserError(f"train.loss must be 'l1' or 'mse', not '{t.loss}'")
    if t.batch_size <= 0 or t.epochs < 0 or t.lr <= 0 or t.max_steps < 0 or t.save_every < 0:
        raise UserError("train.batch_size and train.lr must be positive; epochs, max_steps, "
                        "save_every non-negative")
    if not (0 <= t.max_minutes < float("inf")) or t.grid_every < 0:
        raise UserError("train.max_minutes must be a finite number >= 0 and train.grid_every >= 0")
    if cfg.lora.r <= 0 or cfg.lora.batch_size <= 0:
        raise UserError("lora.r and lora.batch_size must be positive")
