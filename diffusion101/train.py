"""Training, top to bottom: diffusion_loss (noise, predict, score), train_step (one optimizer
step), fit() (the loop, written as loops: for each epoch, for each batch), the loop's chores
(log, save, evaluate, draw) and the run's fixed facts. The loss asks the objective (objective.py)
for the prediction and its target and names none; the loop sees images and nothing of the
network. The job that sets a run up and calls fit() is train_run.py; LoRA fine-tuning
(lora_finetune.py) runs the same fit() with a recipe of its own, distillation (distill.py) the
same run from the teacher's weights. The speed settings (bf16, torch.compile, ...) live in
speed.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import checkpoint, distributed
from .config import Config, SampleConfig, TrainConfig, UserError, check_interrupt
from .dataset import Batch, ImageData, epoch_batches
from .denoise import make_objective, make_sampler, sample_classes
from .evaluate import evaluate_model
from .images import grid_image
from .objective import Objective
from .posthoc_ema import save_snapshot, snapshot_folder
from .speed import Speed
from .train_state import TrainState


def diffusion_loss(model, objective: Objective, batch: Batch, generator,
                   recipe: TrainConfig) -> torch.Tensor:
    """Noise each image of the batch to a random time and score the model's prediction of the
    objective's target (the noise, v, or flow matching's velocity). Distillation pairs bring
    each image's own noise (batch.noise: the one its teacher drew it from, distill.py). With
    recipe.p_uncond > 0 some labels become the null class, so the same network also learns the
    unconditional model that classifier-free guidance needs. With recipe.snr_gamma > 0 each
    image's loss is weighted by Min-SNR-gamma."""
    x0, y, noise = Batch(*batch)
    b, gen_device = x0.shape[0], generator.device
    t = objective.sample_timesteps(b, generator).to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=gen_device).to(x0.device)
    if recipe.p_uncond > 0:
        drop = (torch.rand(b, generator=generator, device=gen_device) < recipe.p_uncond).to(y.device)
        y = torch.where(drop, torch.full_like(y, model.null_label), y)
    pred, target = objective.prediction_and_target(model, x0, noise, t, y)  # (B, C, S, S)
    if recipe.snr_gamma <= 0:
        return F.l1_loss(pred, target) if recipe.loss == "l1" else F.mse_loss(pred, target)
    error = (pred - target).abs() if recipe.loss == "l1" else (pred - target).square()
    per_image = error.flatten(1).mean(dim=1)  # (B,)
    return (objective.min_snr_weight(t, recipe.snr_gamma) * per_image).mean()


class NonFiniteLoss(Exception):
    """The loss came out NaN or inf; the step was not taken."""


def train_step(state: TrainState, objective: Objective, batch: Batch, recipe: TrainConfig,
               speed: Speed, is_distributed: bool = False) -> float:
    """One optimizer step on the batch; returns the loss (the mean over processes). A loss
    that is not finite raises NonFiniteLoss before the weights change."""
    batch = Batch(*(v if v is None or v.dim() != 4 else speed.layout(v) for v in batch))
    with speed.autocast(batch.images.device.type):
        loss = diffusion_loss(state.net, objective, batch, state.generator, recipe)
    # Read at once, so that every process sees the same value and all stop together on NaN
    # (docs/BENCHMARKS.md: what this wait costs on a GPU).
    mean_loss = loss.detach()
    if is_distributed:
        mean_loss = distributed.mean_over_processes(mean_loss)
    value = mean_loss.item()
    if not math.isfinite(value):
        raise NonFiniteLoss(value)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if recipe.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), recipe.grad_clip)
    state.optimizer.step()
    state.lr_schedule.step()
    if state.ema is not None:
        state.ema.update(state.model, state.step)
    state.step += 1
    state.step_in_epoch += 1
    return value


def fit(run: Run, state: TrainState, data: ImageData, objective: Objective,
        desc: str = "epoch") -> None:
    """Train from where the state stands until the epochs or a budget (run.cfg.train) run out.
    An epoch's batches are a function of the seed and the epoch alone, so a resumed run sees
    the batches the interrupted one would have seen."""
    recipe = run.cfg.train
    for epoch in range(state.epoch, recipe.epochs):
        batches = epoch_batches(len(data), recipe.batch_size, recipe.seed, epoch, run.rank, run.world)
        stopped = False
        with tqdm(total=len(batches), initial=state.step_in_epoch, desc=f"{desc} {epoch + 1}/"
                  f"{recipe.epochs}", dynamic_ncols=True, disable=not run.main) as bar:
            state.start_clock()
            for idx in batches[state.step_in_epoch:]:
                batch = data.batch(idx, run.device)
                loss = train_step(state, objective, batch, recipe, run.speed, run.distributed)
                check_interrupt()  # a Ctrl-C whose exception something swallowed stops here
                log_loss(run, state, bar, loss)
                if every(recipe.save_every, state.step):
                    save(run, state)
                if every(recipe.snapshot_every, state.step):
                    snapshot(run, state)
                if every(recipe.eval_every_steps, state.step):
                    evaluate(run, state)
                stopped = out_of_budget(run, state)
                if stopped:
                    break
        state.lap()
        if state.step_in_epoch == len(batches):
            state.epoch, state.step_in_epoch = epoch + 1, 0
        if recipe.grid_every and (stopped or state.epoch == recipe.epochs
                                  or every(recipe.grid_every, state.epoch)):
            log_grid(run, state)
        save(run, state)
        if stopped:
            return


def every(n: int, count: int) -> bool:
    """Whether a task that runs every n steps (or epochs) is due at `count`; 0 is never."""
    return n > 0 and count % n == 0


def log_loss(run: Run, state: TrainState, bar, loss: float) -> None:
    """The loss on the progress bar; the loss and the learning rate in TensorBoard."""
    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
    bar.update(1)
    if run.writer is not None:
        run.writer.add_scalar("train/loss", loss, state.step)
        run.writer.add_scalar("train/lr", state.lr_schedule.get_last_lr()[0], state.step)


def out_of_budget(run: Run, state: TrainState) -> bool:
    """The step or time budget is spent (train.max_steps, train.max_minutes; 0 is none)."""
    recipe = run.cfg.train
    out_of_steps = bool(recipe.max_steps) and state.step >= recipe.max_steps
    return out_of_steps or (bool(recipe.max_minutes) and distributed.any_process(
        state.seconds_so_far() >= 60 * recipe.max_minutes, run.distributed))


def save(run: Run, state: TrainState) -> None:
    """Checkpoint the run (rank 0 writes); with no run.out (LoRA), nothing is written."""
    if run.out is None:
        return
    state.lap()
    state.saved = checkpoint.model_file(run.cfg, run.preset, state.state_dict())
    if run.main:
        checkpoint.save(state.saved, run.out)
    state.last_saved = state.step


def snapshot(run: Run, state: TrainState) -> None:
    """The raw weights as they stand, into <out>.snapshots/ (the main process writes), for
    post-hoc EMA and autoguidance."""
    if run.main and run.out is not None:
        save_snapshot(state.model, run.cfg, run.preset, state.step, snapshot_folder(run.out))


def evaluate(run: Run, state: TrainState) -> None:
    """Accuracy and FID of a small sample into TensorBoard (the main process only), with the
    preset's sampler; the time it takes is not training time."""
    if run.writer is None:
        return
    state.lap()
    n = run.cfg.train.eval_n
    with eval_mode(state.sampling_model()) as model:
        try:
            metrics = evaluate_model(model, run.cfg, n=n, device=run.device, seed=1234)
        except UserError as e:  # samples of NaN: training goes on (its loss is finite)
            run.log(f"eval at step {state.step} skipped: {e}")
            return state.start_clock()
    minutes = state.train_seconds / 60
    for name, value in (("accuracy", metrics["accuracy"]), ("fid", metrics["fid"]),
                        ("train_minutes", minutes)):
        run.writer.add_scalar(f"eval/{name}", value, state.step)
    run.log(f"eval at step {state.step} ({minutes:.1f} train min): accuracy "
            f"{100 * metrics['accuracy']:.2f}%, FID {metrics['fid']:.2f} (n={n})")
    state.start_clock()


def log_grid(run: Run, state: TrainState) -> None:
    """One image of each class from the preset's sampler, as a grid in TensorBoard (the main
    process only), at the step it was drawn."""
    if run.writer is None:
        return
    cfg, classes = run.cfg, run.cfg.model.num_classes
    sampling = grid_sampling(cfg, run.device)
    started = time.perf_counter()
    with eval_mode(state.sampling_model()) as model:
        sampler = make_sampler(sampling, cfg.diffusion, run.device)
        run.log(f"grid at step {state.step}: {classes} images, {sampling.steps} "
                f"{sampling.sampler} steps ({len(sampler.timesteps)} network calls) ...")
        images, _ = sample_classes(model, sampler, sampling, range(classes), 1, cfg.train.seed,
                                   run.device)
    if not torch.isfinite(images).all():  # drawn black, it would look like a dead model
        return run.log(f"grid at step {state.step} not drawn: its samples came out NaN or inf")
    run.writer.add_image("samples", grid_image(images, nrow=classes), state.step)
    run.log(f"grid at step {state.step} drawn in {time.perf_counter() - started:.1f} s")


# On a CPU, a grid walk of more network calls than this takes its objective's preview walk
# instead: the reference's 1,000 DDPM steps of a 32 M network take half an hour there.
CPU_GRID_CALLS = 50


def grid_sampling(cfg: Config, device) -> SampleConfig:
    """The sampler of the grids drawn during training: the preset's own, or on a CPU where its
    walk is long, the objective's few-step preview walk (objective.preview) of the same model."""
    calls = len(make_sampler(cfg.sample, cfg.diffusion).timesteps)
    if torch.device(device).type != "cpu" or calls <= CPU_GRID_CALLS:
        return cfg.sample
    return dataclasses.replace(cfg.sample, **make_objective(cfg.diffusion).preview)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """`with eval_mode(model) as m:` the model in eval mode (BatchNorm's running statistics,
    as at sampling time), back in the mode it was in afterwards."""
    was_training = model.training
    try:
        yield model.eval()
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class Run:
    """The fixed facts of one run: its config (cfg.train is the recipe fit() follows), where
    it writes, the device and speed settings, and how it is spread over processes. What
    changes as it trains is the TrainState."""
    cfg: Config
    preset: str | None
    out: Path | None  # the checkpoint; None: fit() writes none (LoRA saves its adapter)
    device: torch.device
    speed: Speed = field(default_factory=Speed)
    rank: int = 0
    world: int = 1
    distributed: bool = False
    log: Callable = print
    writer: object = None  # TensorBoard's SummaryWriter, on the main process only
    init: dict | None = None  # weights a new run starts from (a student starts as its teacher)

    @property
    def main(self) -> bool:
        return self.rank == 0
