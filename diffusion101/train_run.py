"""The training job: set a run up (its processes, device and speed; the data; a fresh or
resumed state), call train.fit(), and report. diffusion101-train runs train(); distillation
(distill.py) runs run_training() on its pairs from the teacher's weights."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint, distributed
from .config import Config, UserError
from .dataset import ImageData, epoch_batches, load_mnist
from .denoise import make_objective
from .networks import count_parameters
from .rng import seed_everything
from .speed import Speed
from .train import NonFiniteLoss, Run, fit, out_of_budget, snapshot
from .train_state import build_state, open_resume


def prepare(run: Run, data: ImageData | None, resume: dict | None) -> tuple:
    """(state, data) of this run: the data where the speed settings want it, the state built
    (and restored from `resume`), its network wrapped for DDP and the speed settings."""
    cfg, recipe, device, speed = run.cfg, run.cfg.train, run.device, run.speed
    if data is None:
        data = load_mnist(train=True, img_size=cfg.model.img_size)
    speed.setup()
    if speed.data_on_device:  # the whole set fits on a GPU: no host copies per batch
        data = data.to(device)
    steps_per_epoch = len(epoch_batches(len(data), recipe.batch_size, recipe.seed, 0, run.rank,
                                        run.world))
    total_steps = recipe.epochs * steps_per_epoch
    if recipe.max_steps:
        total_steps = min(total_steps, recipe.max_steps)
    state = build_state(cfg, device, speed, total_steps, run.rank, held=data.bytes_on(device))
    if resume is None and run.init is not None:  # a student starts as its teacher
        checkpoint.load_state(state.model, run.init, "the starting weights")
        if state.ema is not None:
            state.ema.model.load_state_dict(state.model.state_dict())
    if resume is not None:
        if resume["step_in_epoch"] > steps_per_epoch:
            raise UserError(f"{run.out} stopped at batch {resume['step_in_epoch']} of an epoch "
                            f"that now has {steps_per_epoch}: the training data changed since; "
                            f"resume on the same data, or train anew with another --out")
        state.load_state_dict(resume, str(run.out), restore_rng=not run.distributed)
        if run.distributed:  # the checkpoint holds rank 0's stream; give each rank its own anew
            state.generator.manual_seed(recipe.seed + 1_000_003 * run.rank + state.step)
        state.last_saved = resume["step"]
        run.log(f"resumed {run.out} at epoch {state.epoch}, step {state.step}")
    if run.distributed:
        state.net = DistributedDataParallel(
            state.model, device_ids=[device.index] if device.type == "cuda" else None)
    state.net = speed.network(state.net)  # checkpoints save `model`: no _orig_mod.
    return state, data


def train(cfg: Config, preset: str, out, logdir, device, resume: bool = False,
          data: ImageData | None = None, log=print) -> dict:
    """Train (or resume) and return the final checkpoint dict."""
    return run_training(new_run(cfg, preset, out, device, log), logdir, resume, data)


def new_run(cfg: Config, preset: str | None, out, device, log=print, init=None) -> Run:
    """The run's facts: its processes (under torchrun, one per GPU), its device and speed;
    `init`, the weights it starts from (a student starts as its teacher)."""
    rank, world, device, is_distributed = distributed.setup(torch.device(device))
    return Run(cfg, preset, Path(out), device, Speed.for_device(cfg.train, device), rank, world,
               is_distributed, log if rank == 0 else lambda *a, **k: None,  # rank 0 speaks
               init=init)


def run_training(run: Run, logdir, resume: bool = False, data=None) -> dict:
    """Set the run up (fresh, from run.init, or resumed from run.out), fit(), save."""
    from torch.utils.tensorboard import SummaryWriter  # slow to import: only when training

    cfg, out, device, preset = run.cfg, run.out, run.device, run.preset
    loaded = open_resume(run.out, run.cfg) if resume else None
    if loaded is None and run.out.exists():
        run.log(f"note: {out} exists and will be replaced at the first save (use --resume to "
                f"continue it)")
    if run.main:
        run.out.parent.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)
    state, data = prepare(run, data, loaded)
    recipe = cfg.train
    run.log(f"config (preset '{preset}'):\n{cfg}")
    on = run.speed.enabled()
    run.log(f"{count_parameters(state.model):,} trainable parameters; {len(data):,} "
            f"training images; device {device}" + (f"; {run.world} processes" if run.distributed else "")
            + (f"; speed options: {', '.join(on)}" if on else ""))
    if state.epoch >= recipe.epochs or out_of_budget(run, state):
        # A run that would train nothing writes nothing: an existing file is never replaced
        # by an untrained model, nor re-saved unchanged.
        raise UserError(f"nothing to train: the run is at epoch {state.epoch}, step "
                        f"{state.step} with train.epochs={recipe.epochs}, max_steps="
                        f"{recipe.max_steps}, max_minutes={recipe.max_minutes:g}; {out} was not written")
    run = dataclasses.replace(run, writer=SummaryWriter(str(logdir)) if run.main else None)
    if run.writer is not None:  # what differs between two runs, beside their curves
        run.writer.add_text("config", f"preset `{preset}`\n\n```\n{cfg}\n```", state.step)
    state.model.train()
    if recipe.snapshot_every and state.step == 0:
        snapshot(run, state)  # the first weights, where every EMA starts
    try:
        fit(run, state, data, make_objective(cfg.diffusion, device))
    except NonFiniteLoss as e:
        last_good = state.last_saved if state.last_saved is not None else "none saved yet"
        raise UserError(f"loss is {e} at step {state.step + 1} (epoch {state.epoch + 1}); "
                        f"training stopped, {run.out} keeps the last good checkpoint "
                        f"(step {last_good})") from None
    finally:
        if run.writer is not None:
            run.writer.close()
    if run.distributed:
        run.log(f"replicas agree: max |w_rank - w_0| = {distributed.replica_divergence(state.model):.3g} "
                f"over {run.world} processes")
    run.log(f"saved {out} (epoch {state.epoch}, step {state.step}, "
            f"{state.train_seconds / 60:.1f} train minutes); TensorBoard logs in {logdir}")
    return state.saved
