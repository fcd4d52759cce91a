"""Configuration: one dataclass per concern, presets as named instances.

Every field can be overridden from the command line with ``--set section.field=value``
(for example ``--set model.channels=32,64,128``). The resolved configuration is printed
at start and stored, as a plain dict, in every checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import operator
from dataclasses import dataclass, field


# A guidance interval (sample.guidance_interval, in t / timesteps) that holds every step.
EVERY_STEP = (0.0, 1.0)


def interval_text(interval) -> str:
    """' in t/T 0.1..0.7' for a limited guidance interval; '' when it holds every step."""
    lo, hi = interval
    return "" if (lo, hi) == EVERY_STEP else f" in t/T {lo:g}..{hi:g}"


class UserError(Exception):
    """A problem with what the user asked for: shown as one line, never a traceback."""


# Every field declares what it may hold, once: a range (for numbers, and for each item of a
# tuple) or a list of choices. validate() is derived from these; a comparison written as
# `lo <= x <= hi` is False for NaN, so NaN can never pass.
BIG = 10 ** 9
SEED_MAX = 2 ** 32 - 1  # numpy's seeds are 32-bit


def num(default, lo, hi, *, above_lo: bool = False, below_hi: bool = False):
    """A number (or a tuple of numbers) in [lo, hi]; above_lo / below_hi make an end open."""
    return field(default=default, metadata={"range": (lo, hi, above_lo, below_hi)})


def choice(default, *allowed):
    return field(default=default, metadata={"choices": (default,) + allowed})


@dataclass
class ModelConfig:
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


@dataclass
class DiffusionConfig:
    timesteps: int = num(1000, 2, 100_000)
    beta_start: float = num(1e-4, 0.0, 1.0, above_lo=True, below_hi=True)
    beta_end: float = num(0.02, 0.0, 1.0, above_lo=True, below_hi=True)
    schedule: str = choice("linear", "cosine")  # cosine: Nichol & Dhariwal 2021
    prediction: str = choice("eps", "v")  # what the network predicts
    # "x_t": clamp x_t to [-1, 1] after every reverse step (the reference); "x0": clamp the
    # predicted x_0 instead (the usual practice); "none"
    clip: str = choice("x_t", "x0", "none")


@dataclass
class TrainConfig:
    epochs: int = num(200, 0, BIG)
    batch_size: int = num(400, 1, 1_000_000)
    lr: float = num(1e-3, 0.0, 10.0, above_lo=True)
    loss: str = choice("l1", "mse")
    max_steps: int = num(0, 0, BIG)  # 0: no limit; else stop (and save) after this many steps
    max_minutes: float = num(0.0, 0.0, 1e7)  # 0: no limit; else stop (and save) after this long
    save_every: int = num(0, 0, BIG)  # 0: save after each epoch only; else also every N steps
    seed: int = num(0, 0, SEED_MAX)
    # "mnist", or a folder of one's own: one sub-folder of images per class (ImageFolder)
    data: str = field(default="mnist", metadata={"text": True})
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
    eval_every_steps: int = num(0, 0, BIG)  # steps between quality evaluations in TensorBoard (0: off)
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


@dataclass
class SampleConfig:
    """The sampler a checkpoint uses by default: the best measured for its preset."""
    sampler: str = choice("ddpm", "ddim", "dpm")
    steps: int = num(1000, 1, 100_000)  # at most diffusion.timesteps
    guidance: float = num(1.0, 0.0, 100.0)  # classifier-free guidance scale w; 1: conditional
    # Guide only while t / timesteps lies in [lo, hi] (Kynkaeaenniemi et al. 2024, "limited
    # interval"); elsewhere the conditional prediction alone, one forward instead of two.
    guidance_interval: tuple = num(EVERY_STEP, 0.0, 1.0)
    # How the predictions combine (guidance.RULES): "cfg" classifier-free guidance, "apg"
    # adaptive projected guidance, "auto" autoguidance by a weaker guide network
    guidance_rule: str = choice("cfg", "apg", "auto")
    # apg: the weight of the guidance term's part parallel to the conditional x_0 (1: cfg),
    # the momentum over the walk's guided steps (Sadat et al. use negative values), and the
    # largest norm of the term per image (0: none)
    apg_eta: float = num(0.0, 0.0, 1.0)
    apg_momentum: float = num(0.0, -1.0, 1.0, above_lo=True, below_hi=True)
    apg_norm_threshold: float = num(0.0, 0.0, 1e6)
    # auto: the guide checkpoint (same image size, classes and noise schedule), and the scale
    # of a classifier-free term beside it (1: none)
    guide: str = field(default="", metadata={"text": "may be empty"})
    guide_cfg: float = num(1.0, 0.0, 100.0)
    eta: float = num(0.0, 0.0, 1.0)  # DDIM noise: 0 deterministic, 1 DDPM-like
    # Which timesteps a few-step sampler visits: "uniform" in t down to t = 0, "logsnr" uniform
    # in log(alpha/sigma) (many small steps near the data), "trailing" uniform in t ending one
    # spacing above 0 (diffusers' "trailing"). DDPM visits all of them. (Called sample.grid
    # before; files that say so are read.)
    timestep_spacing: str = choice("uniform", "logsnr", "trailing")
    use_ema: bool = True  # sample with the EMA weights when the checkpoint has them


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
        for section, values in upgrade(d).items():
            sub = getattr(cfg, section, None)
            if sub is None or not dataclasses.is_dataclass(sub):
                raise UserError(f"unknown config section '{section}'")
            for name, value in values.items():
                _set_field(sub, section, name, value)
        return cfg

    def __str__(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


MNIST_TRAIN_IMAGES = 60_000


def upgrade(d: dict) -> dict:
    """A config dict as older versions wrote it, in today's fields: sample.grid is now
    sample.timestep_spacing; train.eval_every counted epochs beside train.eval_every_steps, and
    the one knob left counts steps (an epoch of one process is ceil(60,000 / batch_size) of
    them)."""
    sample = d.get("sample")
    if isinstance(sample, dict) and "grid" in sample:
        sample = dict(sample)
        spacing = sample.pop("grid")
        d = {**d, "sample": {"timestep_spacing": spacing, **sample}}
    train = d.get("train")
    if not isinstance(train, dict) or "eval_every" not in train:
        return d
    train = dict(train)
    epochs = train.pop("eval_every")
    if not train.get("eval_every_steps") and isinstance(epochs, int) and epochs > 0:
        batch = train.get("batch_size", TrainConfig.batch_size)
        if isinstance(batch, int) and batch > 0:
            train["eval_every_steps"] = epochs * -(-MNIST_TRAIN_IMAGES // batch)
    return {**d, "train": train}


def _set_field(sub, section: str, name: str, value):
    fields = {f.name: f for f in dataclasses.fields(sub)}
    if name not in fields:
        raise UserError(f"unknown config field '{section}.{name}' (known: {', '.join(fields)})")
    default = getattr(type(sub)(), name)
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):  # tuple("abc") would be three names
            raise UserError(f"{section}.{name} must be a list, not {value!r}")
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


def _cpu() -> Config:
    # Quality per CPU-minute; docs/EXPERIMENTS.md has the measurement behind each choice:
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


PRESETS = {"reference": _reference, "cpu": _cpu, "small": _small, "tiny": _tiny}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}' (known: {', '.join(PRESETS)})")
    return PRESETS[name]()


def _range_text(lo, hi, above_lo, below_hi) -> str:
    def text(x):  # 4294967295, not 4.29497e+09
        return str(x) if isinstance(x, int) else f"{x:g}"
    return f"{'(' if above_lo else '['}{text(lo)}, {text(hi)}{')' if below_hi else ']'}"


def check_range(name: str, value, lo, hi, *, integer: bool = False, above_lo: bool = False,
                below_hi: bool = False):
    """The one range check, for config fields, command-line flags and API arguments alike: a
    number (an integer when asked; True is not 1) in [lo, hi], an end open when asked, or one
    UserError that names `name`. The comparisons are False for NaN, so NaN never passes.
    Returns the value."""
    if integer:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:  # a float field may be written as an int
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (lo < value if above_lo else lo <= value) and (value < hi if below_hi else value <= hi)
    if not ok:
        what = "an integer" if integer else "a finite number"
        raise UserError(f"{name} must be {what} in {_range_text(lo, hi, above_lo, below_hi)}, "
                        f"not {value!r}")
    return value


def check_field(section: str, f, value) -> None:
    """One field against what it declares: true/false, one of its choices, a list of names,
    or numbers in its range (each item of a tuple)."""
    name = f"{section}.{f.name}"
    default = f.default
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UserError(f"{name} must be true or false, not {value!r}")
    elif "choices" in f.metadata:
        if value not in f.metadata["choices"]:
            raise UserError(f"{name} must be one of {', '.join(f.metadata['choices'])}, "
                            f"not {value!r}")
    elif "text" in f.metadata:  # a path or a name (train.data, sample.guide)
        if not (isinstance(value, str) and (value or f.default == "")):
            raise UserError(f"{name} must be a non-empty text, not {value!r}")
    elif "range" not in f.metadata:  # a tuple of names (lora.targets, model.class_names)
        empty_ok = "names" in f.metadata
        if not (isinstance(value, tuple) and (value or empty_ok)
                and all(isinstance(v, str) and v for v in value)):
            raise UserError(f"{name} must be a{'' if empty_ok else ' non-empty'} list of names, "
                            f"not {value!r}")
    elif isinstance(default, tuple):
        if not (isinstance(value, tuple) and value):
            raise UserError(f"{name} must be a non-empty list of numbers, not {value!r}")
        lo, hi, above_lo, below_hi = f.metadata["range"]
        for v in value:
            check_range(f"{name} (each item)", v, lo, hi, integer=isinstance(default[0], int),
                        above_lo=above_lo, below_hi=below_hi)
    else:
        lo, hi, above_lo, below_hi = f.metadata["range"]
        check_range(name, value, lo, hi, integer=isinstance(default, int),
                    above_lo=above_lo, below_hi=below_hi)


# The most classes a folder may hold: more is a mistake (a folder of files, not of classes)
# sooner than a dataset this package is made for.
MAX_CLASSES = 1000
MAX_NAME_LENGTH = 40  # a class name is a caption under a 28-pixel column


def class_names(m: ModelConfig) -> tuple:
    """The name of every label: model.class_names, or the digits '0', '1', ... when empty."""
    return m.class_names or tuple(str(i) for i in range(m.num_classes))


def is_mnist_model(m: ModelConfig) -> bool:
    """Whether the labels are MNIST's ten digits in grey, which the evaluation classifier reads."""
    return m.in_channels == 1 and class_names(m)[:10] == tuple(str(i) for i in range(10))


def check_class_name(name: str, where: str) -> None:
    """A class name must caption a PNG and be named on a command line: printable text (no
    control characters, no line breaks, no undecodable bytes from a file name) of at most
    MAX_NAME_LENGTH characters, without a comma (--digits separates names by commas)."""
    if not (name and name.isprintable() and len(name) <= MAX_NAME_LENGTH
            and name == name.strip() and "," not in name):
        raise UserError(f"{where}: class name {name!r} cannot be a caption; use printable text "
                        f"of 1-{MAX_NAME_LENGTH} characters, no comma, no leading or trailing "
                        f"space")


def _as_label(c) -> int:
    """An integer of any kind as an int; -1 for anything else (True is no label)."""
    if isinstance(c, (str, bool)):
        return -1
    try:
        return operator.index(c)
    except TypeError:
        return -1


def class_labels(classes, names: tuple, where: str = "digits") -> list:
    """The labels of `classes`, each a label (an int) or a class name; a name wins over a
    number, so a folder whose classes are '1', '2', '3' is sampled by those names."""
    labels = []
    for c in classes:
        if isinstance(c, str) and c in names:
            labels.append(names.index(c))
        elif isinstance(c, str) and c.isascii() and c.isdecimal() and int(c) < len(names):
            labels.append(int(c))
        elif 0 <= _as_label(c) < len(names):  # an int, a numpy or torch integer
            labels.append(_as_label(c))
        else:
            shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
            raise UserError(f"{where}: {c!r} is no class of this model (labels 0-"
                            f"{len(names) - 1}, or the names {shown})")
    if not labels:
        raise UserError(f"{where}: name at least one class")
    return labels


# A LoRA adapter's strength, wherever it is given (--lora FILE:S, d.load(loras=...)).
STRENGTH_RANGE = (-100, 100)


def check_strength(where: str, value) -> float:
    return check_range(f"{where}: the LoRA strength", value, *STRENGTH_RANGE)


def validate(cfg: Config) -> None:
    """Every field against its declaration, then the rules that tie fields together: before
    any work starts, and on every config read back from a file."""
    for section in ("model", "diffusion", "train", "lora", "sample"):
        sub = getattr(cfg, section)
        for f in dataclasses.fields(sub):
            check_field(section, f, getattr(sub, f.name))
    m, d, t, s = cfg.model, cfg.diffusion, cfg.train, cfg.sample
    levels = len(m.channels)
    if m.img_size % (2 ** (levels - 1)):
        raise UserError(f"model.img_size={m.img_size} must be divisible by 2**{levels - 1} "
                        f"for {levels} levels")
    if m.attn_from_level >= levels:
        raise UserError(f"model.attn_from_level={m.attn_from_level} leaves no cross-attention: "
                        f"the model has levels 0..{levels - 1}, and attention carries the label")
    if m.in_channels not in (1, 3):
        raise UserError(f"model.in_channels must be 1 (grey) or 3 (RGB), not {m.in_channels}")
    validate_classes(m, t.data)
    if m.time_emb_dim % 2:
        raise UserError("model.time_emb_dim must be even (half sines, half cosines)")
    if not d.beta_start < d.beta_end:
        raise UserError("diffusion.beta_start must be below diffusion.beta_end")
    if t.eval_every_steps and not is_mnist_model(m):
        raise UserError("train.eval_every_steps scores with the MNIST classifier; a model of "
                        "other classes cannot be scored that way (set it to 0)")
    if t.p_uncond > 0 and not m.null_class:
        raise UserError("train.p_uncond > 0 needs model.null_class=true (the label to drop to)")
    if s.steps > d.timesteps:
        raise UserError(f"sample.steps must be in 1..{d.timesteps} (diffusion.timesteps)")
    if s.guidance_rule == "auto" and not s.guide:
        raise UserError("sample.guidance_rule=auto needs sample.guide, the guide checkpoint "
                        "(--guide CKPT)")
    if len(s.guidance_interval) != 2 or not s.guidance_interval[0] <= s.guidance_interval[1]:
        raise UserError("sample.guidance_interval must be two fractions lo,hi with lo <= hi")


def validate_classes(m: ModelConfig, data: str) -> None:
    """MNIST is ten grey digits; a folder's model names each of its classes once."""
    if data == "mnist":
        if m.class_names or m.num_classes < 10 or m.in_channels != 1:
            raise UserError("train.data=mnist holds the ten grey digits: model.num_classes >= 10, "
                            "model.in_channels=1 and no model.class_names")
        return
    if m.class_names and len(m.class_names) != m.num_classes:
        raise UserError(f"model.class_names names {len(m.class_names)} classes, "
                        f"model.num_classes is {m.num_classes}")
    if len(set(m.class_names)) != len(m.class_names):
        raise UserError("model.class_names must name each class once")
    if m.num_classes > MAX_CLASSES:
        raise UserError(f"model.num_classes={m.num_classes}: at most {MAX_CLASSES} classes")
    for name in m.class_names:
        check_class_name(name, "model.class_names")
