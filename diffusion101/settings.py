"""Reading and checking settings: `--set section.field=value`, the one range check that serves
the config, the flags and the Python API (each field declares its range in config.py, once),
and the rules that tie fields together."""
from __future__ import annotations

import dataclasses

from .classes import is_mnist_model, validate_classes
from .config import Config, ModelConfig, SampleConfig, UserError, field_default, set_field
from .guidance import is_guided, needs_uncond


def parse_value(text: str, default):
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
    sub = cfg.section(section)
    set_field(sub, section, name, parse_value(text, field_default(sub, section, name)))


def range_text(lo, hi, above_lo, below_hi) -> str:
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
        raise UserError(f"{name} must be {what} in {range_text(lo, hi, above_lo, below_hi)}, "
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
    check_backbone(m)
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
    flow = d.objective != "ddpm"  # flow matching's path, walked on t in [0, 1]
    check_meanflow(cfg)
    if d.prediction == "x0" and not flow:
        raise UserError("diffusion.prediction=x0 is flow matching's (diffusion.objective=flow); "
                        "a DDPM model predicts eps or v")
    if flow and t.snr_gamma:
        raise UserError("train.snr_gamma weights DDPM's timesteps; flow matching has none (set 0)")
    if s.steps > d.timesteps and not flow:
        raise UserError(f"sample.steps must be in 1..{d.timesteps} (diffusion.timesteps)")
    if is_guided(s) and needs_uncond(s) and not m.null_class:  # before training, not at its grid
        raise UserError(f"sample.guidance={s.guidance:g} ({s.guidance_rule}) needs a model "
                        f"trained with a null class (model.null_class=true, train.p_uncond > 0); "
                        f"set sample.guidance=1")
    if s.guidance_rule == "auto" and not s.guide:
        raise UserError("sample.guidance_rule=auto needs sample.guide, the guide checkpoint "
                        "(--guide CKPT)")
    if len(s.guidance_interval) != 2 or not s.guidance_interval[0] <= s.guidance_interval[1]:
        raise UserError("sample.guidance_interval must be two fractions lo,hi with lo <= hi")
    check_settings_apply(s, flow)


def check_meanflow(cfg: Config) -> None:
    """What MeanFlow's training needs (meanflow.py), and its settings refused on the other
    objectives, where they would do nothing."""
    m, d, t = cfg.model, cfg.diffusion, cfg.train
    if d.objective != "meanflow":
        if (d.interval_share, d.trained_guidance, d.adaptive_p) != (0.25, 1.0, 1.0):
            raise UserError("diffusion.interval_share, trained_guidance and adaptive_p shape "
                            "MeanFlow's training (diffusion.objective=meanflow); leave them be")
        return
    if not m.interval_input:
        raise UserError("diffusion.objective=meanflow needs model.interval_input=true: the "
                        "network must be told the interval t - r it averages over")
    if m.backbone == "unet" and m.norm == "batch":
        raise UserError("diffusion.objective=meanflow needs model.norm=group: BatchNorm mixes "
                        "the images of a batch, so its forward-mode derivative is not each "
                        "image's own")
    if d.prediction == "x0":
        raise UserError("a MeanFlow network predicts the average velocity, not x_0 "
                        "(leave diffusion.prediction as it is)")
    if t.loss != "mse":
        raise UserError("diffusion.objective=meanflow weighs each image's squared error "
                        "(train.loss=mse)")
    if d.trained_guidance != 1 and not (m.null_class and t.p_uncond > 0):
        raise UserError("diffusion.trained_guidance needs the unconditional model: "
                        "model.null_class=true and train.p_uncond > 0")


def check_backbone(m: ModelConfig) -> None:
    """What the network a config names needs of the image: a UNet halves it at each level
    and carries the label by attention at some level; a transformer cuts it into whole
    patches and splits its width among its heads."""
    if m.backbone == "dit":
        if m.img_size % m.patch_size:
            raise UserError(f"model.patch_size={m.patch_size} must divide model.img_size="
                            f"{m.img_size} (the image is cut into whole patches)")
        if m.width % m.heads:
            raise UserError(f"model.width={m.width} must be divisible by model.heads={m.heads}")
        return
    levels = len(m.channels)
    if m.img_size % (2 ** (levels - 1)):
        raise UserError(f"model.img_size={m.img_size} must be divisible by 2**{levels - 1} "
                        f"for {levels} levels")
    if m.attn_from_level >= levels:
        raise UserError(f"model.attn_from_level={m.attn_from_level} leaves no cross-attention: "
                        f"the model has levels 0..{levels - 1}, and attention carries the label")


def check_settings_apply(s: SampleConfig, flow: bool) -> None:
    """A sampler setting the walk would ignore is refused, not silently dropped: DDIM's noise
    and DDPM's timestep spacing on a flow model, flow's time shift on a DDPM model, eta on a
    sampler other than DDIM, a guidance rule with nothing to guide."""
    if flow and (s.eta or s.timestep_spacing != "uniform"):
        raise UserError("sample.eta and sample.timestep_spacing shape a DDPM model's walk; a "
                        "flow model's time grid takes sample.shift (leave eta 0, spacing uniform)")
    if not flow and s.shift != 1.0:
        raise UserError("sample.shift bends flow matching's time grid; a DDPM model's walk takes "
                        "sample.timestep_spacing (leave shift 1)")
    if s.eta and s.sampler != "ddim":
        raise UserError(f"sample.eta is DDIM's noise; sample.sampler={s.sampler} has none "
                        f"(leave eta 0)")
    if s.guidance_rule != "cfg" and not is_guided(s):
        raise UserError(f"sample.guidance_rule={s.guidance_rule} mixes guided predictions, and "
                        f"sample.guidance={s.guidance:g} guides nothing: set a scale other than "
                        f"1, or leave the rule cfg")
