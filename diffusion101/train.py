"""Training, top to bottom: diffusion_loss (noise, predict, score), train_step (one optimizer
step), fit() (the loop, written as loops: for each epoch, for each batch), the loop's chores
(log, save, evaluate, draw), the run's fixed facts, and train(), which sets a run up and calls
fit(). LoRA fine-tuning (lora_finetune.py) runs the same fit() with a recipe of its own, and
distillation (distill.py) the same run_training() from the teacher's weights.

A run is fully described by its config; the checkpoint stores that config, the optimizer,
the counters and every RNG state, so --resume continues exactly where the run stopped. The
speed settings (bf16, torch.compile, ...) live in speed.py.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import checkpoint, distributed
from .config import Config, DiffusionConfig, TrainConfig, UserError
from .dataset import ImageData, epoch_batches, load_mnist
from .denoise import make_sampler, sample_classes
from .diffusion import NoiseSchedule
from .evaluate import evaluate_model
from .flow import FlowMatching
from .images import grid_image
from .posthoc_ema import save_snapshot, snapshot_folder
from .rng import seed_everything
from .speed import Speed
from .train_state import TrainState, build_state, open_resume
from .unet import count_parameters


def make_objective(cfg: DiffusionConfig, device="cpu"):
    """What training noises with and learns to predict: DDPM's NoiseSchedule, or FlowMatching."""
    return FlowMatching(cfg, device) if cfg.objective == "flow" else NoiseSchedule(cfg, device)


def diffusion_loss(model, schedule: NoiseSchedule, batch: tuple, generator,
                   recipe: TrainConfig) -> torch.Tensor:
    """Noise each image of the batch (x0, y) to a random time and score the model's prediction
    of the objective's target (the noise, v, or flow matching's velocity). A batch of
    distillation pairs (x0, y, noise) brings each image's own noise: the one its teacher drew
    it from (distill.py). With recipe.p_uncond > 0 some labels become the null class, so the
    same network also learns the unconditional model that classifier-free guidance needs. With
    recipe.snr_gamma > 0 each image's loss is weighted by Min-SNR-gamma."""
    x0, y = batch[0], batch[1]
    b, gen_device = x0.shape[0], generator.device
    t = schedule.sample_timesteps(b, generator).to(x0.device)
    if len(batch) > 2:
        noise = batch[2]
    else:
        noise = torch.randn(x0.shape, generator=generator, device=gen_device).to(x0.device)
    if recipe.p_uncond > 0:
        drop = (torch.rand(b, generator=generator, device=gen_device) < recipe.p_uncond).to(y.device)
        y = torch.where(drop, torch.full_like(y, model.null_label), y)
    pred = model(schedule.add_noise(x0, noise, t), schedule.net_time(t), y)  # (B, C, S, S)
    target = schedule.target(x0, noise, t)
    if recipe.snr_gamma <= 0:
        return F.l1_loss(pred, target) if recipe.loss == "l1" else F.mse_loss(pred, target)
    error = (pred - target).abs() if recipe.loss == "l1" else (pred - target).square()
    per_image = error.flatten(1).mean(dim=1)  # (B,)
    return (schedule.min_snr_weight(t, recipe.snr_gamma) * per_image).mean()


class NonFiniteLoss(Exception):
    """The loss came out NaN or inf; the step was not taken."""


def train_step(state: TrainState, schedule: NoiseSchedule, batch: tuple, recipe: TrainConfig,
               speed: Speed, is_distributed: bool = False) -> float:
    """One optimizer step on the batch (x0, y) (or distillation pairs (x0, y, noise)); returns
    the loss (the mean over processes). A loss that is not finite raises NonFiniteLoss before
    the weights change."""
    batch = tuple(speed.layout(v) if v.dim() == 4 else v for v in batch)  # images, noise
    with speed.autocast(batch[0].device.type):
        loss = diffusion_loss(state.net, schedule, batch, state.generator, recipe)
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


def fit(run: Run, state: TrainState, data: ImageData, schedule: NoiseSchedule,
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
                loss = train_step(state, schedule, batch, recipe, run.speed, run.distributed)
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
    run.saved = checkpoint.model_file(run.cfg, run.preset, state.state_dict())
    if run.main:
        checkpoint.save(run.saved, run.out)
    run.last_saved = state.step


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
    with eval_mode(state.sampling_model()) as model:
        sampler = make_sampler(cfg.sample, cfg.diffusion, run.device)
        images, _ = sample_classes(model, sampler, cfg.sample, range(classes), 1, cfg.train.seed,
                                   run.device)
    if not torch.isfinite(images).all():  # drawn black, it would look like a dead model
        return run.log(f"grid at step {state.step} not drawn: its samples came out NaN or inf")
    run.writer.add_image("samples", grid_image(images, nrow=classes), state.step)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """`with eval_mode(model) as m:` the model in eval mode (BatchNorm's running statistics,
    as at sampling time), back in the mode it was in afterwards."""
    was_training = model.training
    try:
        yield model.eval()
    finally:
        model.train(was_training)


@dataclass
class Run:
    """The fixed facts of one run: its config (cfg.train is the recipe fit() follows), where
    it writes, the device and speed settings, and how it is spread over processes."""
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
    saved: dict | None = None  # the checkpoint written last
    last_saved: int | None = None  # its step
    init: dict | None = None  # weights a new run starts from (a student starts as its teacher)

    @property
    def main(self) -> bool:
        return self.rank == 0


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
        run.last_saved = resume["step"]
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


def new_run(cfg: Config, preset: str | None, out, device, log=print) -> Run:
    """The run's facts: its processes (under torchrun, one per GPU), its device and speed."""
    rank, world, device, is_distributed = distributed.setup(torch.device(device))
    return Run(cfg, preset, Path(out), device, Speed.for_device(cfg.train, device), rank, world,
               is_distributed, log if rank == 0 else lambda *a, **k: None)  # rank 0 speaks


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
    run.writer = SummaryWriter(str(logdir)) if run.main else None
    if run.writer is not None:  # what differs between two runs, beside their curves
        run.writer.add_text("config", f"preset `{preset}`\n\n```\n{cfg}\n```", state.step)
    state.model.train()
    if recipe.snapshot_every and state.step == 0:
        snapshot(run, state)  # the first weights, where every EMA starts
    try:
        fit(run, state, data, make_objective(cfg.diffusion, device))
    except NonFiniteLoss as e:
        last_good = run.last_saved if run.last_saved is not None else "none saved yet"
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
    return run.saved
