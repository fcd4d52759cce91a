"""Reading and checking settings: `--set section.field=value`, the one range check that serves
the config, the flags and the Python API (each field declares its range in config.py, once),
the rules that tie fields together, and class names and labels."""
from __future__ import annotations

import dataclasses
import functools
import operator
import os
from pathlib import Path

import torch

from .config import EVERY_STEP, Config, ModelConfig, SampleConfig, UserError, field_default, set_field
from .unet import UNet


def interval_text(interval) -> str:
    """' in t/T 0.1..0.7' for a limited guidance interval; '' when it holds every step."""
    lo, hi = interval
    return "" if (lo, hi) == EVERY_STEP else f" in t/T {lo:g}..{hi:g}"


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
    sub = cfg.section(section)
    set_field(sub, section, name, _parse_value(text, field_default(sub, section, name)))


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
    """An integer of any kind as an int; -1 for anything else (True is no label, nor is a
    one-element array, which operator.index would take)."""
    if isinstance(c, (str, bool)) or getattr(c, "ndim", 0) != 0:
        return -1
    try:
        return operator.index(c)
    except TypeError:
        return -1


def class_labels(classes, names: tuple, where: str = "digits") -> list:
    """The labels of `classes`, each a label (an int) or a class name; a name wins over a
    number, so a folder whose classes are '1', '2', '3' is sampled by those names. At most
    MAX_CLASSES of them: each is a column of the grid and of its progression figure."""
    classes = list(classes)
    if len(classes) > MAX_CLASSES:
        raise UserError(f"{where}: {len(classes):,} classes asked for; at most {MAX_CLASSES} "
                        f"(repeat them with --n-per-class, or n in the API)")
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
    check_sampler_fits(s.sampler, d.objective)
    flow = d.objective == "flow"
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


def is_guided(sample_cfg: SampleConfig) -> bool:
    """Whether guidance changes anything: a scale other than 1 (or auto's classifier-free term)."""
    return sample_cfg.guidance != 1.0 or (sample_cfg.guidance_rule == "auto"
                                          and sample_cfg.guide_cfg != 1.0)


def needs_uncond(sample_cfg: SampleConfig) -> bool:
    """Whether a guided step asks the network without the label too: always, but for
    autoguidance without its classifier-free term."""
    return sample_cfg.guidance_rule != "auto" or sample_cfg.guide_cfg != 1.0


FLOW_SAMPLERS = ("euler", "heun")  # the samplers of flow matching; the others walk DDPM's schedule


def check_sampler_fits(sampler: str, objective: str) -> None:
    """A sampler walks one objective's path: a flow model given ddpm, ddim or dpm, or a DDPM
    model given euler or heun, is refused in one line (the config check and make_sampler)."""
    flow = objective == "flow"
    if (sampler in FLOW_SAMPLERS) != flow:
        raise UserError(f"sample.sampler={sampler} does not walk diffusion.objective={objective}: "
                        f"use {'euler or heun' if flow else 'ddpm, ddim or dpm'}")


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


def parameter_count(m: ModelConfig) -> int:
    """The network's parameters, counted on the meta device, where nothing is allocated (once
    per architecture: every sampling request asks)."""
    return _parameter_count(dataclasses.astuple(m))


@functools.lru_cache(maxsize=32)
def _parameter_count(fields: tuple) -> int:
    with torch.device("meta"):  # (the network's own code counts, not a formula that could drift)
        return sum(p.numel() for p in UNet(ModelConfig(*fields)).parameters())


def activation_floats(m: ModelConfig, training: bool) -> int:
    """About how many floats one image keeps alive in the network: in training every block's
    maps, saved for the backward pass; in sampling the skip connections and the largest
    block's working maps. A block at a level of side r holds r^2 x (its channels in and out a
    few times over, the attention's queries and values, the feed-forward's width)."""
    sides = [m.img_size // 2 ** level for level in range(len(m.channels))]
    chs = [m.in_channels, *m.channels]
    blocks = [(sides[i], chs[i], chs[i + 1]) for i in range(len(m.channels))]  # encoder
    blocks += [(sides[i], 2 * chs[i + 1], chs[i + 1]) for i in range(len(m.channels) - 1)]
    work = [r * r * (c_in + 4 * c_out + m.q_dim + m.v_dim + m.ffn_dim) for r, c_in, c_out in blocks]
    if training:  # autograd keeps about twice the maps counted here (each norm's and
        return 2 * sum(work)  # activation's input too): checked against peak RSS, RELIABILITY.md
    return sum(r * r * c for r, _, c in blocks[:len(m.channels) - 1]) + max(work)


def device_memory(device) -> int:
    """Bytes of memory of the device: a GPU's own, or what this process may take on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return cpu_memory()


# Where cpu_memory reads the kernel's numbers (the tests point these at folders of their own)
PROC, CGROUP = Path("/proc"), Path("/sys/fs/cgroup")


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:  # not Linux, or no such controller here
        return ""


def _number(path: Path, key: str | None = None):
    """The integer in a kernel file (the one after `key`, in a file of 'key: value' lines), or
    None where the file, the key or a number is missing ('max': no limit)."""
    text = _text(path)
    if key is not None:
        text = next((line[len(key):] for line in text.splitlines() if line.startswith(key)), "")
    words = text.split()
    return int(words[0]) if words and words[0].isdigit() else None


def cpu_memory() -> int:
    """Bytes this process may still allocate on the CPU: the machine's available memory, or
    less where its cgroup (a container's limit, v1 or v2) or an address-space limit (ulimit
    -v) allows less. (A machine's total would admit what the kernel then kills unannounced.)"""
    import resource  # (Unix only)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    room = [total]
    available = _number(PROC / "meminfo", "MemAvailable:")
    if available is not None:
        room.append(available * 1024)
    groups = dict(line.split(":", 2)[1:] for line in _text(PROC / "self" / "cgroup").splitlines()
                  if line.count(":") >= 2)  # controller -> this process's group (v2: "")
    for folder, limit_file, usage_file in [
            (CGROUP / groups.get("", "/").lstrip("/"), "memory.max", "memory.current"),
            (CGROUP, "memory.max", "memory.current"),
            (CGROUP / "memory" / groups.get("memory", "/").lstrip("/"), "memory.limit_in_bytes",
             "memory.usage_in_bytes"),
            (CGROUP / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes")]:
        limit = _number(folder / limit_file)
        if limit is not None and limit < total:
            room.append(limit - (_number(folder / usage_file) or 0))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        room.append(soft - (_number(PROC / "self" / "status", "VmSize:") or 0) * 1024)
    return max(0, min(room))


def check_memory(m: ModelConfig, images: int, device, training: bool = False,
                 held: int = 0) -> None:
    """Refuse, with the number, a network and a batch of `images` that cannot fit the device's
    memory, before anything is allocated (a config with channels=8192,8192, a request for
    100,000 digits at once). Training keeps, per parameter, the weights, the gradient, Adam's
    two moments and the EMA; `held`: bytes already held on that device (the training set),
    added to a GPU's need (its total is compared), not to a CPU's (what is left is)."""
    params = parameter_count(m)
    floats = params * (5 if training else 1) + images * activation_floats(m, training)
    if torch.device(device).type == "cpu":  # taken already: cpu_memory() counts what is left
        held = 0
    what = f"training in batches of {images}" if training else f"sampling {images:,} images at once"
    check_fits(4 * floats + held, device, f"{what} with this network ({params:,} parameters, "
               f"{m.img_size} px{', beside the training set' if held else ''})",
               "ask for fewer images, or a smaller network")


def check_fits(need: int, device, what: str, advice: str) -> None:
    """Refuse what needs more bytes than the device has, in one line with both numbers."""
    have = device_memory(device)
    if need > have:
        where = "this process may take" if torch.device(device).type == "cpu" else "the device has"
        raise UserError(f"{what} needs about {need / 2 ** 30:,.1f} GiB; {where} "
                        f"{have / 2 ** 30:,.1f} GiB on the {device} device: {advice}")
