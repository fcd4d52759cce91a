"""Post-hoc EMA (Karras et al. 2024, EDM2): choose the averaging length after training.

With train.snapshot_every = k the run keeps its raw weights at step 0 and every k steps, each
a small sampling-only model file in <out>.snapshots/ (so any snapshot also samples, and serves
as an earlier, weaker guide for autoguidance). rebuild() replays the EMA of any decay over
them: between two snapshots the weights are taken to be the later one, so the k updates of
that stretch fold into one with their combined decay. With k = 1 this is the very EMA that
training keeps (ema.py, warm-up included); with k > 1 it is that EMA with the weights of each
stretch replaced by its last. The decay can then be swept against guidance at no training cost.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from . import checkpoint
from .config import UserError, check_range, validate
from .ema import decay_at
from .unet import UNet

SNAPSHOT_PREFIX = "step_"


def snapshot_folder(out) -> Path:
    """Where a run writing `out` (model.pt) keeps its snapshots: model.snapshots/."""
    out = Path(out)
    return out.with_name(out.stem + ".snapshots")


def save_snapshot(model: torch.nn.Module, cfg, preset, step: int, folder: Path) -> Path:
    """The raw weights after `step` optimizer steps, as a sampling-only model file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{SNAPSHOT_PREFIX}{step:07d}.pt"
    checkpoint.save(checkpoint.model_file(cfg, preset, {"model": model.state_dict(), "step": step}),
                    path)
    return path


def list_snapshots(folder) -> list:
    """[(step, path)] of a snapshot folder, by step; refused if there are none or the first is
    not the run's start (the EMA begins from the first weights)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"snapshot folder not found: {folder}")
    snaps = sorted((int(p.stem[len(SNAPSHOT_PREFIX):]), p) for p in folder.glob(f"{SNAPSHOT_PREFIX}*.pt")
                   if p.stem[len(SNAPSHOT_PREFIX):].isascii() and p.stem[len(SNAPSHOT_PREFIX):].isdecimal())
    if len(snaps) < 2 or snaps[0][0] != 0:
        raise UserError(f"{folder} holds {len(snaps)} snapshot(s) starting at step "
                        f"{snaps[0][0] if snaps else '-'}; a rebuild needs step 0 and at least one more "
                        f"(train with --set train.snapshot_every=K)")
    return snaps


def combined_decay(decay: float, start: int, stop: int) -> float:
    """The product of the per-update decays of updates start .. stop - 1 (ema.decay_at)."""
    return math.prod(decay_at(decay, i) for i in range(start, stop))


@torch.no_grad()
def rebuild(folder, decay: float) -> tuple:
    """(weights, last snapshot's file): the EMA of `decay` over the snapshots of `folder`.
    Floating tensors are averaged; buffers such as BatchNorm's step counter are the last
    snapshot's, as ema.py copies them."""
    check_range("the EMA decay", decay, 0.0, 1.0, below_hi=True)
    snaps = list_snapshots(folder)
    first = checkpoint.load_model_checkpoint(snaps[0][1])
    config = first["config"]
    buffers = {name for name, _ in UNet(checkpoint.config_of(first).model).named_buffers()}
    ema = {k: v.clone() for k, v in first["model"].items()}
    last, previous = first, 0
    for step, path in snaps[1:]:
        last = checkpoint.load_model_checkpoint(path)
        if last["config"]["model"] != config["model"] or set(last["model"]) != set(ema):
            raise UserError(f"{path} holds another model than {snaps[0][1]}: one run per folder")
        weight = 1.0 - combined_decay(decay, previous, step)
        for name, value in last["model"].items():
            if name not in buffers:
                ema[name].lerp_(value, weight)
            else:
                ema[name] = value.clone()
        previous = step
    return ema, last


def export_rebuilt(folder, decay: float, out, log=print) -> dict:
    """The rebuilt EMA as a sampling-only model file (.pt or .safetensors) with the run's config,
    its train.ema_decay set to `decay`."""
    weights, last = rebuild(folder, decay)
    cfg = checkpoint.config_of(last)
    cfg.train.ema_decay = decay
    validate(cfg)
    saved = checkpoint.model_file(cfg, last.get("preset"), {"model": weights, "step": last["step"],
                                                            "exported_from_ema": True})
    checkpoint.save(saved, out)
    log(f"wrote {out}: the EMA of decay {decay:g} over {folder} up to step {last['step']}")
    return saved
