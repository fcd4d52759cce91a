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
from .config import UserError
from .ema import decay_at
from .settings import check_range, validate
from .networks import build_network

SNAPSHOT_PREFIX = "step_"


def snapshot_folder(out) -> Path:
    """Where a run writing `out` (model.pt) keeps its snapshots: model.snapshots/."""
    out = Path(out)
    return out.with_name(out.stem + ".snapshots")


def snapshot_path(folder, step: int) -> Path:
    """The file of the snapshot after `step` optimizer steps: model.snapshots/step_0000600.pt."""
    return Path(folder) / f"{SNAPSHOT_PREFIX}{step:07d}.pt"


def save_snapshot(model: torch.nn.Module, cfg, preset, step: int, folder: Path) -> Path:
    """The raw weights after `step` optimizer steps, as a sampling-only model file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = snapshot_path(folder, step)
    checkpoint.save(checkpoint.model_file(cfg, preset, {"model": model.state_dict(), "step": step}),
                    path, derived=True)  # named after --out and the step
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


def power_decay(gamma: float, step: int) -> float:
    """The decay of update number `step` (0-based) of a power-function EMA (EDM2): after t
    steps the average weighs the weights of step s by (s^(gamma+1) - (s-1)^(gamma+1)) /
    t^(gamma+1), about (gamma + 1) s^gamma / t^(gamma+1), a profile of relative width
    sigma_rel = sqrt(gamma + 1) / ((gamma + 2) sqrt(gamma + 3)), whatever the run's length.
    (ema.decay_at's warm-up (1 + i) / (10 + i) is close to gamma = 8: until a run has taken
    thousands of steps, it, not the decay, sets the length of training's own EMA.)"""
    t = step + 1
    return (1 - 1 / t) ** (gamma + 1)


def sigma_rel(gamma: float) -> float:
    return math.sqrt(gamma + 1) / ((gamma + 2) * math.sqrt(gamma + 3))


def combined_decay(decay: float, start: int, stop: int, gamma: float | None = None) -> float:
    """The product of the per-update decays of updates start .. stop - 1: ema.decay_at's, or
    with `gamma` the power function's. Over a long stretch (a snapshot named with a huge step)
    the closed forms of the telescoping products, so no name can make it loop for hours."""
    if gamma is not None:
        if stop - start <= LOOP_LIMIT:
            return math.prod(power_decay(gamma, i) for i in range(start, stop))
        return (start / stop) ** (gamma + 1)  # prod over t of ((t - 1) / t)^(gamma + 1)
    if stop - start <= LOOP_LIMIT:
        return math.prod(decay_at(decay, i) for i in range(start, stop))
    # warm-up (1 + i) / (10 + i) while it is below `decay`, then `decay` itself
    warm_end = max(start, min(stop, math.ceil((10 * decay - 1) / (1 - decay))))
    warm = math.prod((start + 1 + j) / (warm_end + 1 + j) for j in range(9))
    return warm * decay ** (stop - warm_end)


LOOP_LIMIT = 100_000  # stretches up to this long: the very product training's EMA takes


@torch.no_grad()
def rebuild(folder, decay: float = 0.0, gamma: float | None = None, until: int | None = None) -> tuple:
    """(weights, last snapshot's file): the EMA of `decay` (with training's warm-up), or the
    power-function EMA of exponent `gamma`, over the snapshots of `folder` (only those up to
    step `until` when given: the EMA the run had then, e.g. an autoguidance guide). Parameters
    are averaged; buffers (BatchNorm's statistics and step counter) are the last snapshot's, as
    ema.py copies them."""
    check_range("the EMA decay", decay, 0.0, 1.0, below_hi=True)
    if gamma is not None:
        check_range("the power EMA's gamma", gamma, 0.0, 1e6)
    snaps = list_snapshots(folder)
    if until is not None:
        snaps = [(step, path) for step, path in snaps if step <= until]
        if len(snaps) < 2:
            raise UserError(f"{folder} holds no snapshot after step 0 up to step {until}")
    first = checkpoint.load_model_checkpoint(snaps[0][1])
    net = build_network(checkpoint.config_of(first).model)
    checkpoint.load_state(net, first["model"], str(snaps[0][1]))  # names, shapes, dtypes, finite
    buffers = {name for name, _ in net.named_buffers()}
    ema = {k: v.clone() for k, v in first["model"].items()}
    last, previous = first, 0
    for step, path in snaps[1:]:
        last = checkpoint.load_model_checkpoint(path)
        if run_of(last) != run_of(first):
            raise UserError(f"{path} comes from another run than {snaps[0][1]} (another model, "
                            f"schedule, seed, rate or batch size): one run per folder")
        checkpoint.load_state(net, last["model"], str(path))
        weight = 1.0 - combined_decay(decay, previous, step, gamma)
        for name, value in last["model"].items():
            if name not in buffers:
                ema[name].lerp_(value, weight)
            else:
                ema[name] = value.clone()
        previous = step
    return ema, last


def run_of(snapshot: dict) -> tuple:
    """What tells one run's snapshots from another's: a second run into the same folder
    with the same settings would have drawn the same weights."""
    cfg = snapshot["config"]
    return (cfg["model"], cfg["diffusion"], cfg["train"]["seed"], cfg["train"]["lr"],
            cfg["train"]["batch_size"])


def export_rebuilt(folder, decay: float, out, log=print, gamma: float | None = None,
                   until: int | None = None) -> dict:
    """The rebuilt EMA as a sampling-only model file (.pt or .safetensors) with the run's config
    (its train.ema_decay set to `decay` when that is the profile)."""
    weights, last = rebuild(folder, decay, gamma, until)
    cfg = checkpoint.config_of(last)
    if gamma is None:
        cfg.train.ema_decay = decay
    validate(cfg)
    saved = checkpoint.model_file(cfg, last.get("preset"), {"model": weights, "step": last["step"],
                                                            "exported_from_ema": True})
    checkpoint.save(saved, out)
    profile = f"decay {decay:g}" if gamma is None else \
        f"power gamma {gamma:g} (sigma_rel {sigma_rel(gamma):.3f})"
    log(f"wrote {out}: the EMA of {profile} over {folder} up to step {last['step']}")
    return saved
