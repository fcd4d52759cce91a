"""Training, to be read top to bottom: diffusion_loss (noise, predict, score), train_step (one
optimizer step), TrainState (everything a run changes), then Trainer.fit(), the loop that
training and LoRA fine-tuning share, and train(), which sets a run up and calls it.

A run is fully described by its config; the checkpoint stores that config, the optimizer,
the counters and every RNG state, so --resume continues exactly where the run stopped.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import checkpoint, distributed
from .config import Config, TrainConfig, UserError, class_names, validate
from .dataset import MNISTData, epoch_batches, load_image_folder, load_mnist
from .denoise import sample_digits
from .diffusion import NoiseSchedule, sampler_for
from .ema import EMA
from .evaluate import evaluate_model
from .posthoc_ema import save_snapshot, snapshot_folder
from .images import grid_image
from .rng import rng_state, seed_everything, set_rng_state
from .unet import UNet, count_parameters


def diffusion_loss(model, schedule: NoiseSchedule, x0, y, generator, loss: str,
                   p_uncond: float = 0.0, snr_gamma: float = 0.0) -> torch.Tensor:
    """Noise x0 to a random timestep per image and score the model's prediction of the target
    (the noise, or v). With p_uncond > 0 some labels become the null class, so the same network
    also learns the unconditional model that classifier-free guidance needs. With snr_gamma > 0
    each image's loss is weighted by Min-SNR-gamma."""
    b = x0.shape[0]
    t = torch.randint(0, schedule.num_train_timesteps, (b,), generator=generator,
                      device=generator.device).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
    if p_uncond > 0:
        drop = (torch.rand(b, generator=generator, device=generator.device) < p_uncond).to(y.device)
        y = torch.where(drop, torch.full_like(y, model.null_label), y)
    pred = model(schedule.add_noise(x0, noise, t), t, y)  # (B, C, S, S)
    target = schedule.target(x0, noise, t)
    if snr_gamma <= 0:
        return F.l1_loss(pred, target) if loss == "l1" else F.mse_loss(pred, target)
    error = (pred - target).abs() if loss == "l1" else (pred - target).square()
    per_image = error.flatten(1).mean(dim=1)  # (B,)
    return (schedule.min_snr_weight(t, snr_gamma) * per_image).mean()


@dataclass
class Speed:
    """The speed settings of train.* resolved for one device (docs/BENCHMARKS.md). All off is
    plain fp32 eager PyTorch, the reference's way."""
    bf16: bool = False  # autocast the forward pass to bfloat16
    tf32: bool = False  # TF32 matmuls and convolutions (CUDA)
    channels_last: bool = False  # NHWC memory layout
    compile: bool = False  # torch.compile the network
    cuda_graphs: bool = False  # ... and replay it as CUDA graphs (compile mode reduce-overhead)
    fused_optimizer: bool = False  # one kernel for the whole Adam update (CUDA)
    data_on_device: bool = False  # the uint8 training set kept on the GPU

    @classmethod
    def for_device(cls, recipe: TrainConfig, device: torch.device) -> "Speed":
        """'auto' means on for CUDA and off for a CPU, where bf16 matmuls are far slower than
        fp32. CUDA graphs only when asked (train.compile=graphs), and only on CUDA."""
        cuda = device.type == "cuda"
        if recipe.compile == "graphs" and not cuda:
            raise UserError(f"train.compile=graphs replays CUDA graphs and needs a CUDA device, "
                            f"not {device.type}; use train.compile=on or off here")

        def pick(value: str) -> bool:
            return cuda if value == "auto" else value == "on"

        return cls(bf16=recipe.precision == "bf16" or (recipe.precision == "auto" and cuda),
                   tf32=cuda and recipe.precision != "fp32",
                   channels_last=pick(recipe.channels_last),
                   compile=pick(recipe.compile) or recipe.compile == "graphs",
                   cuda_graphs=recipe.compile == "graphs",
                   fused_optimizer=pick(recipe.fused_optimizer),
                   data_on_device=cuda and pick(recipe.data_on_device))

    def enabled(self) -> list:
        return [name for name, on in vars(self).items() if on]


def compile_network(net: nn.Module, speed: Speed) -> nn.Module:
    """torch.compile'd as the speed settings ask (with CUDA graphs: mode "reduce-overhead"),
    or the network itself when they do not."""
    if not speed.compile:
        return net
    return torch.compile(net, mode="reduce-overhead" if speed.cuda_graphs else None)


def make_optimizer(params, recipe: TrainConfig, fused: bool = False):
    extra = {"fused": True} if fused else {}
    kind = torch.optim.AdamW if recipe.optimizer == "adamw" else torch.optim.Adam
    return kind(params, lr=recipe.lr, weight_decay=recipe.weight_decay, **extra)


def make_lr_schedule(optimizer, recipe: TrainConfig, total_steps: int):
    """Constant (the reference), or linear warmup then cosine decay to zero at total_steps."""
    def factor(step: int) -> float:
        if recipe.lr_schedule == "constant":
            return 1.0
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        progress = (step - recipe.warmup_steps) / max(1, total_steps - recipe.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class TrainState:
    """Everything a run changes as it trains. state_dict() is the training part of the
    checkpoint and load_state_dict() reads it back, so a resumed run continues exactly."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    ema: EMA | None
    generator: torch.Generator  # timesteps, noise and label drop
    net: nn.Module | None = None  # what the loop calls: model, wrapped in DDP / torch.compile
    epoch: int = 0
    step: int = 0
    step_in_epoch: int = 0
    train_seconds: float = 0.0
    _tick: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        self.net = self.net or self.model

    def sampling_model(self) -> nn.Module:
        return self.ema.model if self.ema is not None else self.model

    def start_clock(self) -> None:
        self._tick = time.perf_counter()

    def lap(self) -> None:
        """Add the time since the clock started to train_seconds (before a save or an
        evaluation, so that a checkpoint carries its true training time into a resume)."""
        now = time.perf_counter()
        self.train_seconds += now - self._tick
        self._tick = now

    def seconds_so_far(self) -> float:
        return self.train_seconds + time.perf_counter() - self._tick

    def state_dict(self) -> dict:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "lr_schedule": self.lr_schedule.state_dict(), "epoch": self.epoch,
                 "step": self.step, "step_in_epoch": self.step_in_epoch,
                 "train_seconds": self.train_seconds, "rng": rng_state(self.generator)}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, ckpt: dict, where: str, restore_rng: bool = True) -> None:
        checkpoint.load_state(self.model, ckpt["model"], where)
        if self.ema is not None:
            checkpoint.load_state(self.ema.model, ckpt.get("ema", ckpt["model"]), f"{where} (EMA)")
        self.epoch, self.step, self.step_in_epoch = ckpt["epoch"], ckpt["step"], ckpt["step_in_epoch"]
        self.train_seconds = ckpt.get("train_seconds", 0.0)
        part = "optimizer"
        try:  # torch checks little of these states: a damaged one fails anywhere inside
            self.optimizer.load_state_dict(ckpt["optimizer"])
            part = "learning-rate schedule"
            if "lr_schedule" in ckpt:
                self.lr_schedule.load_state_dict(ckpt["lr_schedule"])
            part = "random number generator states"
            if restore_rng and "rng" in ckpt:
                set_rng_state(self.generator, ckpt["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
            raise UserError(f"{where}: its {part} cannot be restored ({type(e).__name__}); the "
                            f"file is damaged or was written by another version") from None


def build_state(cfg: Config, device, speed: Speed, total_steps: int, rank: int = 0) -> TrainState:
    """A fresh model, optimizer, schedule, EMA and generator, laid out as `speed` says."""
    recipe = cfg.train
    memory_format = torch.channels_last if speed.channels_last else torch.contiguous_format
    model = UNet(cfg.model).to(device, memory_format=memory_format)
    optimizer = make_optimizer(model.parameters(), recipe, fused=speed.fused_optimizer)
    # Offset by rank, so the processes of a distributed run draw different noise.
    generator = torch.Generator(device="cpu").manual_seed(recipe.seed + 1_000_003 * rank)
    return TrainState(model, optimizer, make_lr_schedule(optimizer, recipe, total_steps),
                      EMA(model, recipe.ema_decay) if recipe.ema_decay > 0 else None, generator)


class NonFiniteLoss(Exception):
    """The loss came out NaN or inf; the step was not taken."""


def train_step(state: TrainState, schedule: NoiseSchedule, x0, y, recipe: TrainConfig,
               speed: Speed, is_distributed: bool = False) -> float:
    """One optimizer step on the batch (x0, y); returns the loss (the mean over processes).
    A loss that is not finite raises NonFiniteLoss before the weights change."""
    if speed.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=speed.bf16):
        loss = diffusion_loss(state.net, schedule, x0, y, state.generator, recipe.loss,
                              recipe.p_uncond, recipe.snr_gamma)
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


def quiet(*args, **kwargs) -> None:
    """The log of a process other than rank 0: only the main process speaks."""


@dataclass
class Run:
    """The fixed facts of one run: its config (cfg.train is the recipe the loop follows), where
    it writes, the device and speed settings, and how it is spread over processes."""
    cfg: Config
    preset: str | None
    out: Path | None  # the checkpoint; None: the loop writes none (LoRA saves its adapter)
    device: torch.device
    speed: Speed = field(default_factory=Speed)
    rank: int = 0
    world: int = 1
    distributed: bool = False
    log: Callable = print
    writer: object = None  # TensorBoard's SummaryWriter, on the main process only
    last_saved: int | None = None  # the step of the last checkpoint written

    @property
    def main(self) -> bool:
        return self.rank == 0


def every(n: int, count: int) -> bool:
    """Whether a task that runs every n steps (or epochs) is due at `count`; 0 is never."""
    return n > 0 and count % n == 0


class Trainer:
    """The training loop, shared by training and LoRA fine-tuning. fit() is the loop; the
    methods after it are its steps. The recipe is run.cfg.train: batch size, seed, epochs, the
    step and time budgets, and how often to save, evaluate and draw a grid."""

    def __init__(self, run: Run, state: TrainState, data: MNISTData, schedule: NoiseSchedule,
                 desc: str = "epoch"):
        self.run, self.state, self.data, self.schedule, self.desc = run, state, data, schedule, desc
        self.recipe = run.cfg.train
        self.batches = None  # the index batches of the epoch under way; None between epochs
        self.bar = None
        self.saved = None  # the checkpoint written last

    def fit(self) -> None:
        """Train from wherever the state stands until the epochs or a budget run out. A loss
        that is not finite raises NonFiniteLoss, the weights still those of the step before."""
        recipe, state, run = self.recipe, self.state, self.run
        stop = False
        try:
            while state.epoch < recipe.epochs and not stop:
                x0, y = self.next_batch()
                loss = train_step(state, self.schedule, x0, y, recipe, run.speed, run.distributed)
                self.log_loss(loss)
                if every(recipe.save_every, state.step):
                    self.save()
                if every(recipe.snapshot_every, state.step):
                    self.snapshot()
                if every(recipe.eval_every_steps, state.step):
                    self.evaluate()
                stop = self.out_of_budget()
                if stop or state.step_in_epoch == len(self.batches):
                    self.end_epoch(stop)
        finally:  # a loss of NaN ends it too: finish the progress bar's line before the error
            if self.bar is not None:
                self.bar.close()

    def next_batch(self):
        """The next (x0, y) of the epoch; between epochs, shuffle the next one (a function of
        the seed and the epoch alone, so a resumed run sees the same batches) and start its
        progress bar and its clock."""
        state, run = self.state, self.run
        if self.batches is None:
            self.batches = epoch_batches(len(self.data), self.recipe.batch_size, self.recipe.seed,
                                         state.epoch, run.rank, run.world)
            self.bar = tqdm(total=len(self.batches), initial=state.step_in_epoch,
                            desc=f"{self.desc} {state.epoch + 1}/{self.recipe.epochs}",
                            dynamic_ncols=True, disable=not run.main)
            state.start_clock()
        return self.data.batch(self.batches[state.step_in_epoch], run.device)

    def log_loss(self, loss: float) -> None:
        """The loss on the progress bar; the loss and the learning rate in TensorBoard."""
        self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self.bar.update(1)
        if self.run.writer is not None:
            self.run.writer.add_scalar("train/loss", loss, self.state.step)
            self.run.writer.add_scalar("train/lr", self.state.lr_schedule.get_last_lr()[0],
                                       self.state.step)

    def out_of_budget(self) -> bool:
        """The step or time budget is spent (train.max_steps, train.max_minutes; 0 is none)."""
        recipe, state = self.recipe, self.state
        out_of_steps = bool(recipe.max_steps) and state.step >= recipe.max_steps
        return out_of_steps or (bool(recipe.max_minutes) and distributed.any_process(
            state.seconds_so_far() >= 60 * recipe.max_minutes, self.run.distributed))

    def end_epoch(self, stopped: bool) -> None:
        """Close the epoch's bar and clock; count a whole epoch; draw the grid every
        train.grid_every epochs and when training ends (a stop inside an epoch too); save."""
        state, recipe = self.state, self.recipe
        self.bar.close()
        state.lap()
        if state.step_in_epoch == len(self.batches):
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        last = stopped or state.epoch >= recipe.epochs
        if recipe.grid_every and (last or every(recipe.grid_every, state.epoch)):
            self.log_grid()
        self.batches = None
        self.save()

    def save(self) -> None:
        """Checkpoint the run (rank 0 writes); with no run.out, nothing is written."""
        run, state = self.run, self.state
        if run.out is None:
            return
        state.lap()
        self.saved = checkpoint.model_file(run.cfg, run.preset, state.state_dict())
        if run.main:
            checkpoint.save(self.saved, run.out)
        run.last_saved = state.step

    def snapshot(self) -> None:
        """The raw weights as they stand, into <out>.snapshots/ (the main process writes), for
        post-hoc EMA and autoguidance."""
        run = self.run
        if run.main and run.out is not None:
            save_snapshot(self.state.model, run.cfg, run.preset, self.state.step,
                          snapshot_folder(run.out))

    def evaluate(self) -> None:
        """Accuracy and FID of a small sample into TensorBoard (the main process only), with
        the preset's sampler; the time it takes is not training time."""
        run, state = self.run, self.state
        if run.writer is None:
            return
        state.lap()
        model = state.sampling_model()
        was_training = model.training
        model.eval()  # BatchNorm uses its running statistics, as at sampling time
        metrics = evaluate_model(model, run.cfg, n=self.recipe.eval_n, device=run.device, seed=1234)
        model.train(was_training)
        minutes = state.train_seconds / 60
        for name, value in (("accuracy", metrics["accuracy"]), ("fid", metrics["fid"]),
                            ("train_minutes", minutes)):
            run.writer.add_scalar(f"eval/{name}", value, state.step)
        run.log(f"eval at step {state.step} ({minutes:.1f} train min): accuracy "
                f"{100 * metrics['accuracy']:.2f}%, FID {metrics['fid']:.2f} (n={self.recipe.eval_n})")
        state.start_clock()

    def log_grid(self) -> None:
        """Digits 0-9 from the preset's sampler, as an image grid in TensorBoard (the main
        process only), at the step it was drawn."""
        run, model = self.run, self.state.sampling_model()
        if run.writer is None:
            return
        was_training = model.training
        model.eval()
        sample_cfg = run.cfg.sample
        classes = run.cfg.model.num_classes
        images, _ = sample_digits(model, sampler_for(sample_cfg, run.cfg.diffusion, run.device),
                                  sample_cfg, range(classes), 1, self.recipe.seed, run.device)
        model.train(was_training)
        run.writer.add_image("samples", grid_image(images, nrow=classes), self.state.step)


def open_resume(run: Run) -> dict:
    """The checkpoint to continue, checked against the run's config, which takes the saved
    run's seed and learning rate: a resumed run continues the interrupted one exactly, whatever
    the command line says about those."""
    loaded = checkpoint.load_model_checkpoint(run.out)
    saved = checkpoint.config_of(loaded)
    if "optimizer" not in loaded:
        raise UserError(f"{run.out} holds sampling weights only (an export or a converted file: "
                        f"no optimizer, no RNG states), so it cannot be resumed; train anew "
                        f"with another --out, or fine-tune it with LoRA")
    if class_names(saved.model) != class_names(run.cfg.model):
        raise UserError(f"{run.cfg.train.data} holds the classes "
                        f"{', '.join(class_names(run.cfg.model))}; {run.out} was trained on "
                        f"{', '.join(class_names(saved.model))}; resume on the same classes")
    if saved.model != run.cfg.model or saved.diffusion != run.cfg.diffusion:
        raise UserError(f"{run.out} holds a model of another architecture or schedule (preset "
                        f"'{loaded.get('preset')}'); resume with the same preset and model "
                        f"settings, or write to another --out")
    run.cfg.train.seed, run.cfg.train.lr = saved.train.seed, saved.train.lr
    return loaded


def training_data(cfg: Config, log=print) -> MNISTData | None:
    """The images train.data names. MNIST: None here, loaded by prepare(). A folder: loaded
    now, its class names (sorted) the labels 0, 1, ..., their number and names written into
    cfg.model, so that the checkpoint carries them."""
    if cfg.train.data == "mnist":
        return None
    data, names = load_image_folder(cfg.train.data, cfg.model.img_size, cfg.model.in_channels,
                                    min_classes=2, log=log)
    cfg.model.num_classes, cfg.model.class_names = len(names), tuple(names)
    validate(cfg)
    return data


def saved_run_config(out) -> tuple:
    """(config, preset) of the run saved in `out`: what --resume continues by default."""
    saved = checkpoint.load_model_checkpoint(out)
    return checkpoint.config_of(saved), saved.get("preset", "reference")


def prepare(run: Run, data: MNISTData | None, resume: dict | None) -> Trainer:
    """The trainer of this run: the data where the speed settings want it, the state built
    (and restored from `resume`), its network wrapped for DDP and torch.compile."""
    cfg, recipe, device, speed = run.cfg, run.cfg.train, run.device, run.speed
    if data is None:
        data = load_mnist(train=True, img_size=cfg.model.img_size)
    if speed.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if speed.data_on_device:  # the whole uint8 set fits on a GPU: no host copies per batch
        data = MNISTData(data.images.to(device), data.labels.to(device))
    steps_per_epoch = len(epoch_batches(len(data), recipe.batch_size, recipe.seed, 0, run.rank,
                                        run.world))
    total_steps = recipe.epochs * steps_per_epoch
    if recipe.max_steps:
        total_steps = min(total_steps, recipe.max_steps)
    state = build_state(cfg, device, speed, total_steps, run.rank)
    if resume is not None:
        state.load_state_dict(resume, str(run.out), restore_rng=not run.distributed)
        if run.distributed:  # the checkpoint holds rank 0's stream; give each rank its own anew
            state.generator.manual_seed(recipe.seed + 1_000_003 * run.rank + state.step)
        run.last_saved = resume["step"]
        run.log(f"resumed {run.out} at epoch {state.epoch}, step {state.step}")
    if run.distributed:
        state.net = DistributedDataParallel(
            state.model, device_ids=[device.index] if device.type == "cuda" else None)
    state.net = compile_network(state.net, speed)  # checkpoints save `model`: no _orig_mod.
    return Trainer(run, state, data, NoiseSchedule(cfg.diffusion, device))


def train(cfg: Config, preset: str, out, logdir, device, resume: bool = False,
          data: MNISTData | None = None, log=print) -> dict:
    """Train (or resume) and return the final checkpoint dict."""
    from torch.utils.tensorboard import SummaryWriter  # slow to import: only when training

    rank, world, device, is_distributed = distributed.setup(torch.device(device))
    run = Run(cfg, preset, Path(out), device, Speed.for_device(cfg.train, device), rank, world,
              is_distributed, log if rank == 0 else quiet)
    loaded = open_resume(run) if resume else None
    if loaded is None and run.out.exists():
        run.log(f"note: {out} exists and will be replaced at the first save (use --resume to "
                f"continue it)")
    if run.main:
        run.out.parent.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)
    trainer = prepare(run, data, loaded)
    state, recipe = trainer.state, cfg.train
    run.log(f"config (preset '{preset}'):\n{cfg}")
    on = run.speed.enabled()
    run.log(f"{count_parameters(state.model):,} trainable parameters; {len(trainer.data):,} "
            f"training images; device {device}" + (f"; {world} processes" if is_distributed else "")
            + (f"; speed options: {', '.join(on)}" if on else ""))
    if state.epoch >= recipe.epochs or trainer.out_of_budget():
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
        trainer.snapshot()  # the first weights, where every EMA starts
    try:
        trainer.fit()
    except NonFiniteLoss as e:
        last_good = run.last_saved if run.last_saved is not None else "none saved yet"
        raise UserError(f"loss is {e} at step {state.step + 1} (epoch {state.epoch + 1}); "
                        f"training stopped, {run.out} keeps the last good checkpoint "
                        f"(step {last_good})") from None
    finally:
        if run.writer is not None:
            run.writer.close()
    if is_distributed:
        run.log(f"replicas agree: max |w_rank - w_0| = {distributed.replica_divergence(state.model):.3g} "
                f"over {world} processes")
    run.log(f"saved {out} (epoch {state.epoch}, step {state.step}, "
            f"{state.train_seconds / 60:.1f} train minutes); TensorBoard logs in {logdir}")
    return trainer.saved
