"""Checkpoints as dicts of tensors and plain values, written atomically, read with weights_only.

model.pt: {"format", "model", "config", "preset", "optimizer", "epoch", "step", "step_in_epoch",
           "rng"}. lora.pt: {"format", "lora", "lora_config", "base_fingerprint", "config"}.
The architecture is always rebuilt from the file's own "config", never from the caller.
"""
from __future__ import annotations

import errno
import hashlib
import os
import pickle
import signal
import zipfile
from pathlib import Path

import torch

from .config import Config, UserError

MODEL_FORMAT = "diffusion101/model/1"
LORA_FORMAT = "diffusion101/lora/1"
CONVERT_HINT = ("if you trust the file, convert it once with "
                "'python scripts/convert_checkpoint.py --trust OLD.pt NEW.pt'")


def fault(name: str) -> str | None:
    """Fault injection for the crash tests: DIFFUSION101_FAULT=name[:arg] simulates a fault.
    Returns the argument ('' if none) when `name` is the fault asked for, else None."""
    spec = os.environ.get("DIFFUSION101_FAULT", "")
    key, _, arg = spec.partition(":")
    return arg if key == name else None


def atomic_write(path, write_fn) -> None:
    """Write through write_fn(file) to a temporary file in the same folder, fsync, then
    os.replace: a crash at any point leaves either the old file or the new one, never half."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"cannot save {path}: folder {folder} does not exist")
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            if fault("disk_full") is not None:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            f.flush()
            os.fsync(f.fileno())
        if fault("kill_before_replace") is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not save {path}: {e.strerror or e}; "
                        f"the previous file, if any, is untouched") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # Persist the rename itself (the folder entry), where the platform allows it.
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save(obj: dict, path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def load(path, what: str = "checkpoint") -> dict:
    """torch.load with weights_only=True, every failure turned into one clear UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} not found: {path}")
    if not path.is_file():
        raise UserError(f"{what} is not a file: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e) and "global" not in str(e):
            raise UserError(f"{what} {path} is truncated or corrupt and cannot be read") from None
        # weights_only refused a global: the file pickles Python objects, and nothing of it ran.
        raise UserError(f"{what} {path} holds pickled Python objects (such as a whole nn.Module), "
                        f"which could run code on load, so it is refused; {CONVERT_HINT}") from None
    except PermissionError:
        raise UserError(f"{what} {path} cannot be read (permission denied)") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, IndexError):
        raise UserError(f"{what} {path} is truncated or corrupt and cannot be read") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what} {path} is not a Diffusion-101 file (no dict inside)")
    return obj


def load_model_checkpoint(path) -> dict:
    ckpt = load(path, "checkpoint")
    if ckpt.get("format") != MODEL_FORMAT or "model" not in ckpt or "config" not in ckpt:
        if ckpt.get("format") == LORA_FORMAT:
            raise UserError(f"{path} is a LoRA adapter, not a model checkpoint")
        raise UserError(f"{path} is not a Diffusion-101 model checkpoint (format "
                        f"{ckpt.get('format')!r}); {CONVERT_HINT}")
    return ckpt


def config_of(ckpt: dict) -> Config:
    """The run's config, checked like one from the command line (a file can be hand-edited)."""
    from .config import validate
    try:
        cfg = Config.from_dict(ckpt["config"])
        validate(cfg)
        return cfg
    except (UserError, TypeError, AttributeError, ValueError) as e:
        raise UserError(f"checkpoint config cannot be used: {e}") from None


def load_state(model: torch.nn.Module, state: dict, where: str) -> None:
    """load_state_dict(strict) with a mismatch reported as one line."""
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
    import dataclasses

    from .config import LoRAConfig, check_field
    obj = load(path, "LoRA adapter")
    if obj.get("format") != LORA_FORMAT or "lora" not in obj or "base_fingerprint" not in obj \
            or not isinstance(obj.get("lora_config"), dict) or not isinstance(obj["lora"], dict):
        raise UserError(f"{path} is not a Diffusion-101 LoRA adapter")
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


def load_model(path, device="cpu"):
    """Rebuild the UNet from a checkpoint's own config and weights. Returns (model, ckpt, cfg)."""
    from .unet import UNet
    ckpt = load_model_checkpoint(path)
    cfg = config_of(ckpt)
    model = UNet(cfg.model)
    load_state(model, ckpt["model"], str(path))
    return model.to(device), ckpt, cfg


# Names the reference code gave to what this package names otherwise (the last part of a key).
REFERENCE_NAMES = {"half_emb": "freqs"}  # the timestep embedding's frequencies


def from_reference_names(state: dict) -> dict:
    def rename(key: str) -> str:
        head, _, last = key.rpartition(".")
        last = REFERENCE_NAMES.get(last, last)
        return f"{head}.{last}" if head else last
    return {rename(k): v for k, v in state.items()}


def convert_pickled(old, new, preset: str, trusted: bool, log=print) -> None:
    """The one place that unpickles arbitrary objects, and only when the user vouches for them."""
    from .config import get_preset
    from .unet import UNet
    if not trusted:
        raise UserError("converting unpickles the old file, which can run code: pass --trust "
                        "only for a file you trust")
    if Path(new).exists():
        raise UserError(f"{new} exists; choose another output path")
    cfg = get_preset(preset)
    try:
        obj = torch.load(old, map_location="cpu", weights_only=False)  # trusted by the user
    except Exception as e:  # any failure of a foreign pickle is the user's file, not our bug
        raise UserError(f"cannot read {old}: {type(e).__name__}: {e}") from None
    state = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise UserError(f"{old} holds a {type(obj).__name__}, not a model or a state dict")
    state = from_reference_names(state)
    model = UNet(cfg.model)
    load_state(model, state, str(old))
    save({"format": MODEL_FORMAT, "preset": preset, "config": cfg.to_dict(),
          "model": model.state_dict(), "epoch": 0, "step": 0, "step_in_epoch": 0}, new)
    log(f"wrote {new}: weights only, loadable with weights_only=True")


SHIPPED_PATH = Path(__file__).parent / "weights" / "cpu.pt"


def export_for_sampling(src, dst, overrides=(), log=print) -> dict:
    """A small checkpoint for sampling only: the weights that sampling uses (EMA when there)
    under "model", the config and counters; no optimizer, no RNG states. `overrides`
    ('sample.guidance=3', ...) set the sampler defaults the file carries; nothing else may
    change, since the weights were trained for the rest."""
    from .config import apply_override, validate
    ckpt = load_model_checkpoint(src)
    weights = sampling_weights(ckpt)
    cfg = config_of(ckpt)
    for assignment in overrides:
        if not assignment.startswith("sample."):
            raise UserError(f"export can only change sampler defaults (sample.*), not '{assignment}'")
        apply_override(cfg, assignment)
    validate(cfg)  # a NaN guidance must not reach the file
    out = {"format": MODEL_FORMAT, "preset": ckpt.get("preset"), "config": cfg.to_dict(),
           "model": weights, "epoch": ckpt.get("epoch", 0), "step": ckpt.get("step", 0),
           "step_in_epoch": ckpt.get("step_in_epoch", 0),
           "train_seconds": ckpt.get("train_seconds", 0.0), "exported_from_ema": weights is not ckpt["model"]}
    save(out, dst)
    log(f"wrote {dst}: sampling weights only ({Path(dst).stat().st_size / 1e6:.1f} MB)")
    return out


def default_checkpoint(path, log=print):
    """The checkpoint a sampling command uses: the one asked for, else model.pt in the working
    folder, else the checkpoint shipped with the package (and say so)."""
    if path is not None:
        return path
    if Path("model.pt").exists():
        return "model.pt"
    log(f"no --ckpt and no model.pt here: using the shipped checkpoint {SHIPPED_PATH}")
    return SHIPPED_PATH
