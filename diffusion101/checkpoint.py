"""Checkpoints as dicts of tensors and plain values, written atomically, read with weights_only.

model.pt: {"format", "model", "config", "preset", "epoch", "step", "step_in_epoch", and for a
run that can resume "optimizer", "lr_schedule", "ema", "rng", "train_seconds"}
(model_file); lora.pt: {"format", "lora", "lora_config", "base_fingerprint", "config",
"steps"} (lora_file). Files for sampling (an export, an adapter) may also be .safetensors: the
tensors part as tensors, every other part as JSON text in the file's metadata; they load into
the same dicts. Every part is checked for its type (MODEL_PARTS, LORA_PARTS) before use.
The architecture is always rebuilt from the file's own "config", never from the caller
(model_files.py does that). This module knows the format: what a file holds, and how it is read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pickle
import zipfile
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from .config import Config, LoRAConfig, UserError
from .files import atomic_write
from .settings import check_field, validate

MODEL_FORMAT = "diffusion101/model/1"
LORA_FORMAT = "diffusion101/lora/1"
CONVERT_HINT = ("if you trust the file, convert it once with "
                "'python scripts/convert_checkpoint.py --trust OLD.pt NEW.pt'")


def model_file(cfg: Config, preset, state: dict) -> dict:
    """A model.pt's contents, built here only. `state` holds "model" (the weights) and what
    else there is to keep: counters, and for a run that can resume, "optimizer", "lr_schedule",
    "ema", "rng" (train_state.TrainState.state_dict())."""
    counters = {"epoch": 0, "step": 0, "step_in_epoch": 0}
    return {"format": MODEL_FORMAT, "preset": preset, "config": cfg.to_dict(), **counters, **state}


def lora_file(cfg: Config, lora: dict, r: int, alpha: float, targets, base_fp: str,
              steps: int) -> dict:
    """A lora.pt's contents, built here only: the adapter tensors, their shape, and the
    fingerprint of the base weights they were trained on."""
    return {"format": LORA_FORMAT, "lora": lora,
            "lora_config": {"r": r, "alpha": alpha, "targets": list(targets)},
            "base_fingerprint": base_fp, "config": cfg.to_dict(), "steps": steps}


SAFETENSORS = ".safetensors"
# The part of each kind of file that holds its tensors (safetensors stores those as tensors,
# and every other part as JSON text in the file's metadata)
TENSOR_PART = {MODEL_FORMAT: "model", LORA_FORMAT: "lora"}
TRAINING_PARTS = ("optimizer", "lr_schedule", "ema", "rng")


def save(obj: dict, path, derived: bool = False) -> None:
    """A model or adapter file: safetensors when the name ends in .safetensors, else a torch
    pickle of tensors and plain values. (`derived`: a name the command made up, as
    files.atomic_write takes it.)"""
    if Path(path).suffix.lower() != SAFETENSORS:  # .SAFETENSORS too
        atomic_write(path, lambda f: torch.save(obj, f), derived)
        return
    if any(part in obj for part in TRAINING_PARTS):
        raise UserError(f"{path}: a training checkpoint (optimizer, EMA, RNG states) stays .pt; "
                        f"export its sampling weights as .safetensors")
    part = TENSOR_PART[obj["format"]]
    tensors = {k: v.detach().cpu().contiguous() for k, v in obj[part].items()}
    metadata = {k: (v if k == "format" else json.dumps(v)) for k, v in obj.items() if k != part}
    data = safetensors.torch.save(tensors, metadata)
    atomic_write(path, lambda f: f.write(data), derived)


def is_safetensors(path: Path) -> bool:
    """Named .safetensors, or laid out as one whatever the name: an 8-byte header length, then
    the JSON header's opening brace, the header inside the file. (A torch file is a zip: 'PK'.)"""
    if path.suffix.lower() == SAFETENSORS:
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and \
        8 + int.from_bytes(head[:8], "little") <= path.stat().st_size


def load_safetensors(path: Path, what: str) -> dict:
    """A .safetensors file as the dict a .pt of the same kind holds: the tensors under the
    format's tensor part, every other part read back from the metadata's JSON."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{what} {path} is truncated or corrupt and cannot be read as "
                        f"safetensors ({str(e).splitlines()[0][:120]})") from None
    fmt = metadata.get("format")
    if fmt not in TENSOR_PART:
        raise UserError(f"{what} {path} is not a Diffusion-101 file of this version (its metadata "
                        f"names format {fmt!r}; this version reads {', '.join(TENSOR_PART)})")
    obj = {"format": fmt, TENSOR_PART[fmt]: tensors}
    for key, text in metadata.items():
        if key != "format":
            try:
                obj[key] = json.loads(text)
            except ValueError:
                raise UserError(f"{what} {path}: metadata '{key}' is not JSON") from None
    return obj


def load(path, what: str = "checkpoint") -> dict:
    """torch.load with weights_only=True, every failure turned into one clear UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} not found: {path}")
    if not path.is_file():
        raise UserError(f"{what} is not a file: {path}")
    try:
        if is_safetensors(path):
            return load_safetensors(path, what)
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e) and "global" not in str(e):
            raise UserError(f"{what} {path} is truncated or corrupt and cannot be read") from None
        # weights_only refused a global: the file pickles Python objects, and nothing of it ran.
        raise UserError(f"{what} {path} holds pickled Python objects (such as a whole nn.Module), "
                        f"which could run code on load, so it is refused; {CONVERT_HINT}") from None
    except PermissionError:
        raise UserError(f"{what} {path} cannot be read (permission denied)") from None
    except UserError:  # (a ValueError: said already, in words of its own)
        raise
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, IndexError,
            safetensors.SafetensorError):  # (torch.load reads some files through safetensors)
        raise UserError(f"{what} {path} is truncated or corrupt and cannot be read") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what} {path} is not a Diffusion-101 file (no dict inside)")
    check_storage(obj, f"{what} {path}")
    return obj


def tensors_in(obj):
    """(where, tensor) for every tensor in a loaded file, in dicts and lists of any depth."""
    stack = [("", obj)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, torch.Tensor):
            yield where, item
        elif isinstance(item, dict):
            stack.extend((f"{where}.{k}" if where else str(k), v) for k, v in item.items())
        elif isinstance(item, (list, tuple)):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(item))


def check_storage(obj, where: str) -> None:
    """Refuse a tensor whose shape claims more numbers than the file stores for it: a view of
    one stored number with stride 0 (or any overlapping view) can name 10^12 elements in a
    few KB, and the first operation that reads it (a finite check, a copy, an export)
    allocates them all. Checked on the loaded views' metadata only: nothing is allocated."""
    for name, t in tensors_in(obj):
        if t.numel() == 0:
            continue
        held = t.untyped_storage().nbytes() // t.element_size()
        last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
        if t.numel() > held or last >= held:
            raise UserError(f"{where}: tensor '{name}' claims {t.numel():,} numbers (shape "
                            f"{tuple(t.shape)}) but the file stores {held:,} for it; it is "
                            f"damaged or made to exhaust memory, and nothing of it was used")


def is_tensor_dict(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                           for k, v in value.items())


def is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_plain_dict(value) -> bool:
    return isinstance(value, dict)


def is_config(value) -> bool:
    return isinstance(value, dict) and all(isinstance(v, dict) for v in value.values())


# What each part of a file must be, read before any part is used: (what to call it, its test).
MODEL_PARTS = {
    "model": ("a dict of named tensors", is_tensor_dict),
    "ema": ("a dict of named tensors", is_tensor_dict),
    "config": ("a dict of config sections", is_config),
    "optimizer": ("a dict", is_plain_dict),
    "lr_schedule": ("a dict", is_plain_dict),
    "rng": ("a dict", is_plain_dict),
    "preset": ("a name or null", lambda v: v is None or isinstance(v, str)),
    "epoch": ("a count", is_count),
    "step": ("a count", is_count),
    "step_in_epoch": ("a count", is_count),
    "train_seconds": ("a number of seconds", lambda v: isinstance(v, (int, float)) and not
                      isinstance(v, bool) and math.isfinite(v) and v >= 0),
    "exported_from_ema": ("true or false", lambda v: isinstance(v, bool)),
}
LORA_PARTS = {
    "lora": ("a dict of named tensors", is_tensor_dict),
    "lora_config": ("a dict of r, alpha and a list of target names", lambda v: isinstance(v, dict)
                    and isinstance(v.get("targets"), list)
                    and all(isinstance(t, str) for t in v["targets"])),
    "base_fingerprint": ("a sha256 in hex", lambda v: isinstance(v, str) and len(v) == 64),
    "config": ("a dict of config sections", is_config),
    "steps": ("a count", is_count),
}
MODEL_REQUIRED = ("model", "config", "epoch", "step", "step_in_epoch")


def check_parts(obj: dict, parts: dict, required, path) -> None:
    """Every part the file must have, and every part it has of the type it must be."""
    for name in required:
        if name not in obj:
            raise UserError(f"{path} has no '{name}'; it is damaged or not a Diffusion-101 file")
    for name, (what, ok) in parts.items():
        if name in obj and not ok(obj[name]):
            raise UserError(f"{path}: its '{name}' must be {what}, not {type(obj[name]).__name__}"
                            f"; the file is damaged or hand-edited")


def load_model_checkpoint(path) -> dict:
    ckpt = load(path, "checkpoint")
    if ckpt.get("format") != MODEL_FORMAT:
        if ckpt.get("format") == LORA_FORMAT:
            raise UserError(f"{path} is a LoRA adapter, not a model checkpoint")
        raise UserError(f"{path} is not a Diffusion-101 model checkpoint (format "
                        f"{ckpt.get('format')!r}); {CONVERT_HINT}")
    check_parts(ckpt, MODEL_PARTS, MODEL_REQUIRED, path)
    return ckpt


def config_of(ckpt: dict) -> Config:
    """The run's config, checked like one from the command line (a file can be hand-edited)."""
    try:
        cfg = Config.from_dict(ckpt["config"])
        validate(cfg)
        return cfg
    except (UserError, TypeError, AttributeError, ValueError) as e:
        raise UserError(f"checkpoint config cannot be used: {e}") from None


def check_finite(tensors: dict, where) -> None:
    """Every floating tensor of a file free of NaN and inf: such weights cannot sample or train."""
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UserError(f"{where}: tensor '{name}' holds NaN or inf; these weights cannot "
                            f"sample or train")


def load_state(model: torch.nn.Module, state: dict, where: str) -> None:
    """load_state_dict(strict) with a mismatch reported as one line; a tensor of another dtype
    than the architecture's (load_state_dict would quietly convert it) or a weight that is NaN
    or inf is refused too, and so is an entry that is no named tensor (a converted pickle's)."""
    expected = model.state_dict()
    for name, t in state.items():
        if not (isinstance(name, str) and isinstance(t, torch.Tensor)):
            what = f"is a {type(t).__name__}" if isinstance(name, str) else "has no string name"
            raise UserError(f"{where}: entry {name!r} {what}, not a named tensor; "
                            f"this is no state dict of weights")
        if name in expected and t.dtype != expected[name].dtype:
            raise UserError(f"{where}: tensor '{name}' is {t.dtype}; this architecture keeps it "
                            f"as {expected[name].dtype}")
        if name in expected and t.shape != expected[name].shape:  # before any pass over it
            raise UserError(f"{where}: tensor '{name}' has shape {tuple(t.shape)}; this "
                            f"architecture's is {tuple(expected[name].shape)}")
    check_storage(state, where)  # a state built in memory (convert) has not been through load()
    check_finite(state, where)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise UserError(f"{where} does not fit this architecture: {detail[:200]}") from None


def fingerprint(state_dict: dict) -> str:
    """sha256 over the names, shapes and bytes of a state dict: identifies a base model."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_lora_file(path) -> dict:
    """An adapter file, its rank and alpha checked against the lora section's declared ranges
    (a hand-edited file is refused like a bad flag)."""
    obj = load(path, "LoRA adapter")
    if obj.get("format") != LORA_FORMAT:
        raise UserError(f"{path} is not a Diffusion-101 LoRA adapter")
    check_parts(obj, LORA_PARTS, ("lora", "lora_config", "base_fingerprint"), path)
    for name, t in obj["lora"].items():
        if not t.is_floating_point():
            raise UserError(f"{path}: tensor '{name}' is {t.dtype}, not floating point")
    check_finite(obj["lora"], path)
    fields = {f.name: f for f in dataclasses.fields(LoRAConfig)}
    for name in ("r", "alpha"):
        try:
            check_field("lora", fields[name], obj["lora_config"].get(name))
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
    return obj


def sampling_weights(ckpt: dict) -> dict:
    """The weights sampling uses: the EMA copy when the run kept one (and its config says to
    sample with it), else the raw weights. An exported checkpoint holds them under "model"."""
    cfg = config_of(ckpt)
    return ckpt["ema"] if "ema" in ckpt and cfg.sample.use_ema else ckpt["model"]


def base_fingerprint(ckpt: dict) -> str:
    """What a LoRA adapter records of its base: the fingerprint of the weights it adapted,
    so an adapter trained on a full checkpoint also fits that checkpoint's export."""
    return fingerprint(sampling_weights(ckpt))


def saved_run_config(out) -> tuple:
    """(config, preset) of the run saved in `out`: what --resume continues by default."""
    saved = load_model_checkpoint(out)
    return config_of(saved), saved.get("preset", "reference")
