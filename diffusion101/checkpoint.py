"""Checkpoints as dicts of tensors and plain values, written atomically, read with weights_only.

model.pt: {"format", "model", "config", "preset", "epoch", "step", "step_in_epoch", and for a
run that can resume "optimizer", "lr_schedule", "ema", "rng", "train_seconds"}
(model_file); lora.pt: {"format", "lora", "lora_config", "base_fingerprint", "config",
"steps"} (lora_file).
The architecture is always rebuilt from the file's own "config", never from the caller
(models.py does that). This module knows the format: what a file holds, and how it is read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import pickle
import zipfile
from pathlib import Path

import torch

from .config import Config, LoRAConfig, UserError, check_field, validate
from .files import atomic_write

MODEL_FORMAT = "diffusion101/model/1"
LORA_FORMAT = "diffusion101/lora/1"
CONVERT_HINT = ("if you trust the file, convert it once with "
                "'python scripts/convert_checkpoint.py --trust OLD.pt NEW.pt'")


def model_file(cfg: Config, preset, state: dict) -> dict:
    """A model.pt's contents, built here only. `state` holds "model" (the weights) and what
    else there is to keep: counters, and for a run that can resume, "optimizer", "lr_schedule",
    "ema", "rng" (train.TrainState.state_dict())."""
    counters = {"epoch": 0, "step": 0, "step_in_epoch": 0}
    return {"format": MODEL_FORMAT, "preset": preset, "config": cfg.to_dict(), **counters, **state}


def lora_file(cfg: Config, lora: dict, r: int, alpha: float, targets, base_fp: str,
              steps: int) -> dict:
    """A lora.pt's contents, built here only: the adapter tensors, their shape, and the
    fingerprint of the base weights they were trained on."""
    return {"format": LORA_FORMAT, "lora": lora,
            "lora_config": {"r": r, "alpha": alpha, "targets": list(targets)},
            "base_fingerprint": base_fp, "config": cfg.to_dict(), "steps": steps}


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
