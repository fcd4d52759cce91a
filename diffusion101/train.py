"""Training, to be read top to bottom: diffusion_loss (noise, predict, score), TrainState
(everything a run changes), train_step (one optimizer step), loop (epochs of batches, shared
with LoRA fine-tuning), then train(): set up, run the loop with saving, TensorBoard and
evaluation.

A run is fully described by its config; the checkpoint stores that config, the optimizer,
the counters and every RNG state, so --resume continues exactly where the run stopped.
"""
from __future__ import annotations

import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint
from .files import fault
from .config import Config, UserError
from .dataset import MNISTData, epoch_batches, load_mnist
from .denoise import sample_digits
from .diffusion import NoiseSchedule, make_scheduler, sampler_for
from .ema import EMA
from .unet import UNet, count_parameters


def diffusion_loss(model, scheduler: NoiseSchedule, x0, y, generator, loss: str,
                   p_uncond: float = 0.0, snr_gamma: float = 0.0) -> torch.Tensor:
    """Noise x0 to a random timestep per image and score the model's prediction of the target
    (the noise, or v). With p_uncond > 0 some labels become the null class, so the same network
    also learns the unconditional model that classifier-free guidance needs. With snr_gamma > 0
    each image's loss is weighted by Min-SNR-gamma."""
    b = x0.shape[0]
    t = torch.randint(0, scheduler.num_train_timesteps, (b,), generator=generator,
                      device=generator.device).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
    if p_uncond > 0:
        drop = (torch.rand(b, generator=generator, device=generator.device) < p_uncond).to(y.device)
        y = torch.where(drop, torch.full_like(y, model.null_label), y)
    pred = model(scheduler.add_noise(x0, noise, t), t, y)  # (B, 1, S, S)
    target = scheduler.target(x0, noise, t)
    if snr_gamma <= 0:
        return F.l1_loss(pred, target) if loss == "l1" else F.mse_loss(pred, target)
    error = (pred - target).abs() if loss == "l1" else (pred - target).square()
    per_image = error.flatten(1).mean(dim=1)  # (B,)
    return (scheduler.min_snr_weight(t, snr_gamma) * per_image).mean()


def speed_options(tc, device: torch.device) -> dict:
    """Resolve the speed settings for this device: 'auto' means on for CUDA, off for CPU
    (on a CPU, bf16 matmuls are hundreds of times slower than fp32 here)."""
    cuda = device.type == "cuda"

    def pick(value: str) -> bool:
        return cuda if value == "auto" else value == "on"

    bf16 = tc.precision == "bf16" or (tc.precision == "auto" and cuda)
    return {"bf16": bf16, "tf32": cuda and tc.precision != "fp32",
            "channels_last": pick(tc.channels_last), "compile": pick(tc.compile),
            "fused_optimizer": pick(tc.fused_optimizer), "data_on_device": cuda and pick(tc.data_on_device)}


def make_optimizer(params, tc, fused: bool = False):
    # fused: one kernel for the whole update on CUDA instead of one per tensor
    extra = {"fused": True} if fused else {}
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, **extra)
    return torch.optim.Adam(params, lr=tc.lr, weight_decay=tc.weight_decay, **extra)


def make_lr_schedule(optimizer, tc, total_steps: int):
    """Constant (the reference), or linear warmup then cosine decay to zero at total_steps."""
    def factor(step: int) -> float:
        if tc.lr_schedule == "constant":
            return 1.0
        if step < tc.warmup_steps:
            return (step + 1) / tc.warmup_steps
        progress = (step - tc.warmup_steps) / max(1, total_steps - tc.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def rng_state(generator: torch.Generator) -> dict:
    """Every RNG the run touches, as tensors and plain values (loadable with weights_only)."""
    np_state = np.random.get_state()
    state = {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(generator: torch.Generator, state: dict) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def log_sample_grid(writer, model, cfg: Config, device, seed: int, tag: str, step: int):
    """Generate digits 0-9 with the preset's sampler and put the grid in TensorBoard."""
    from torchvision.utils import make_grid
    was_training = model.training
    model.eval()  # BatchNorm uses its running statistics, as at sampling time
    sc = cfg.sample
    scheduler = sampler_for(sc, cfg.diffusion, device)
    images, _ = sample_digits(model, scheduler, list(range(cfg.model.num_classes)), 1,
                              seed=seed, device=device, guidance=sc.guidance,
                              guidance_interval=sc.guidance_interval)
    model.train(was_training)
    writer.add_image(tag, make_grid((images + 1) / 2, nrow=cfg.model.num_classes), step)


def log_quality(writer, model, cfg: Config, device, step: int, train_minutes: float, log) -> dict:
    """Conditional accuracy and FID on a small sample, with the preset's sampler: the quality
    curve of a run. The classifier ships with the package."""
    from .evaluate import evaluate_model
    was_training = model.training
    model.eval()
    metrics = evaluate_model(model, cfg, n=cfg.train.eval_n, device=device, seed=1234)
    model.train(was_training)
    writer.add_scalar("eval/accuracy", metrics["accuracy"], step)
    writer.add_scalar("eval/fid", metrics["fid"], step)
    writer.add_scalar("eval/train_minutes", train_minutes, step)
    log(f"eval at step {step} ({train_minutes:.1f} train min): accuracy "
        f"{100 * metrics['accuracy']:.2f}%, FID {metrics['fid']:.2f} (n={cfg.train.eval_n})")
    return metrics


def distributed_setup(device: torch.device):
    """(rank, world, device, distributed) for this process. A process started by torchrun
    (which sets RANK) joins a process group, even alone: NCCL on CUDA (one GPU per local
    rank), gloo on CPU."""
    import torch.distributed as dist
    if "RANK" not in os.environ:
        return 0, 1, device, False
    rank, world = int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", "1"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device, True


def replica_divergence(model) -> float:
    """Largest |w_rank - w_rank0| over all weights and ranks: 0.0 when DDP kept them in step."""
    import torch.distributed as dist
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


class NonFiniteLoss(Exception):
    """The loss came out NaN or inf; the step was not taken."""


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
        if "optimizer" in ckpt:  # a converted legacy file has weights only
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if "lr_schedule" in ckpt:
            self.lr_schedule.load_state_dict(ckpt["lr_schedule"])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["ema"] if "ema" in ckpt else self.model.state_dict())
        self.epoch, self.step, self.step_in_epoch = ckpt["epoch"], ckpt["step"], ckpt["step_in_epoch"]
        self.train_seconds = ckpt.get("train_seconds", 0.0)
        if restore_rng and "rng" in ckpt:
            set_rng_state(self.generator, ckpt["rng"])


def build_state(cfg: Config, device, speed: dict, total_steps: int, rank: int = 0) -> TrainState:
    """A fresh model, optimizer, schedule, EMA and generator, laid out as `speed` says."""
    tc = cfg.train
    memory_format = torch.channels_last if speed["channels_last"] else torch.contiguous_format
    model = UNet(cfg.model).to(device, memory_format=memory_format)
    optimizer = make_optimizer(model.parameters(), tc, fused=speed["fused_optimizer"])
    # Offset by rank, so the processes of a distributed run draw different noise.
    generator = torch.Generator(device="cpu").manual_seed(tc.seed + 1_000_003 * rank)
    return TrainState(model, optimizer, make_lr_schedule(optimizer, tc, total_steps),
                      EMA(model, tc.ema_decay) if tc.ema_decay > 0 else None, generator)


def train_step(state: TrainState, scheduler: NoiseSchedule, x0, y, tc, speed: dict,
               distributed: bool = False) -> float:
    """One optimizer step on the batch (x0, y); returns the loss (the mean over processes).
    A loss that is not finite raises NonFiniteLoss before the weights change."""
    if speed["channels_last"]:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=speed["bf16"]):
        loss = diffusion_loss(state.net, scheduler, x0, y, state.generator, tc.loss, tc.p_uncond,
                              tc.snr_gamma)
    # Read at once: the step waits for the GPU here. Reading it one step later, so the host
    # queues the next step meanwhile, was measured on an H200 and gained nothing: the
    # `reference` step is bound by the host launching kernels (docs/BENCHMARKS.md).
    mean_loss = loss.detach()
    if distributed:  # every process sees the same mean loss, so all stop together on NaN
        import torch.distributed as dist
        mean_loss = mean_loss.clone()
        dist.all_reduce(mean_loss)  # a sum: gloo has no average
        mean_loss /= dist.get_world_size()
    value = mean_loss.item()
    if not math.isfinite(value):
        raise NonFiniteLoss(value)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if tc.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), tc.grad_clip)
    state.optimizer.step()
    state.lr_schedule.step()
    if state.ema is not None:
        state.ema.update(state.model, state.step)
    state.step += 1
    state.step_in_epoch += 1
    return value


def any_process(flag: bool, distributed: bool) -> bool:
    """True if `flag` holds on any process: a stop decided by one process (its clock) stops all."""
    if not distributed:
        return flag
    import torch.distributed as dist
    t = torch.tensor([float(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def quiet(*args, **kwargs) -> None:
    """The log of a process other than rank 0: only the main process speaks."""


@dataclass
class Run:
    """Where a training run writes, and how it is spread over processes."""
    cfg: Config
    preset: str
    out: Path
    device: torch.device
    rank: int = 0
    world: int = 1
    distributed: bool = False
    log: Callable = print
    writer: object = None  # TensorBoard's SummaryWriter, on the main process only
    last_saved: int | None = None  # the step of the last checkpoint written

    @property
    def main(self) -> bool:
        return self.rank == 0


def loop(state: TrainState, data: MNISTData, scheduler: NoiseSchedule, tc, speed: dict, *,
         batch_size: int, seed: int, epochs: int, device, rank: int = 0, world: int = 1,
         distributed: bool = False, desc: str = "epoch", on_step=None, on_epoch_end=None,
         stop=None) -> None:
    """The training loop, shared by training and LoRA fine-tuning: epochs of shuffled batches
    from wherever `state` stands, one train_step each. on_step(loss) runs after every step,
    on_epoch_end(complete) after every epoch and after a stop (complete: the epoch ran to its
    end); stop() is asked after every step. NonFiniteLoss propagates."""
    from tqdm import tqdm
    while state.epoch < epochs:
        batches = epoch_batches(len(data), batch_size, seed, state.epoch, rank, world)
        bar = tqdm(batches[state.step_in_epoch:], desc=f"{desc} {state.epoch + 1}/{epochs}",
                   initial=state.step_in_epoch, total=len(batches), dynamic_ncols=True,
                   disable=rank != 0)
        state.start_clock()
        stopped = False
        for idx in bar:
            x0, y = data.batch(idx, device)
            if fault("nan_at_step") == str(state.step + 1):
                x0 = x0 * float("nan")  # a crash test: a batch whose loss is NaN
            value = train_step(state, scheduler, x0, y, tc, speed, distributed)
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
            if on_step is not None:
                on_step(value)
            stopped = stop is not None and stop()
            if stopped:
                break
        bar.close()
        state.lap()
        complete = state.step_in_epoch == len(batches)
        if complete:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        if on_epoch_end is not None:
            on_epoch_end(complete)
        if stopped:
            return


def open_resume(run: Run) -> dict:
    """The checkpoint to continue, checked against the run's config, which takes the saved
    run's seed and learning rate: a resumed run continues the interrupted one exactly, whatever
    the command line says about those."""
    loaded = checkpoint.load_model_checkpoint(run.out)
    saved = checkpoint.config_of(loaded)
    if saved.model != run.cfg.model or saved.diffusion != run.cfg.diffusion:
        raise UserError(f"{run.out} holds a model of another architecture or schedule (preset "
                        f"'{loaded.get('preset')}'); resume with the same preset and model "
                        f"settings, or write to another --out")
    run.cfg.train.seed, run.cfg.train.lr = saved.train.seed, saved.train.lr
    return loaded


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def prepare(run: Run, data: MNISTData | None, resume: dict | None, speed: dict) -> tuple:
    """(state, data) ready for the loop: the data where the speed options want it, the state
    built (and restored from `resume`), its network wrapped for DDP and torch.compile."""
    cfg, tc, device = run.cfg, run.cfg.train, run.device
    if data is None:
        data = load_mnist(train=True, img_size=cfg.model.img_size)
    if speed["tf32"]:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if speed["data_on_device"]:  # the whole uint8 set fits on a GPU: no host copies per batch
        data = MNISTData(data.images.to(device), data.labels.to(device))
    steps_per_epoch = len(epoch_batches(len(data), tc.batch_size, tc.seed, 0, run.rank, run.world))
    total_steps = tc.epochs * steps_per_epoch
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)
    state = build_state(cfg, device, speed, total_steps, run.rank)
    if resume is not None:
        state.load_state_dict(resume, str(run.out), restore_rng=not run.distributed)
        if run.distributed:  # the checkpoint holds rank 0's stream; give each rank its own anew
            state.generator.manual_seed(tc.seed + 1_000_003 * run.rank + state.step)
        run.last_saved = resume["step"]
        run.log(f"resumed {run.out} at epoch {state.epoch}, step {state.step}")
    if run.distributed:
        from torch.nn.parallel import DistributedDataParallel
        state.net = DistributedDataParallel(
            state.model, device_ids=[device.index] if device.type == "cuda" else None)
    if speed["compile"]:
        state.net = torch.compile(state.net)  # checkpoints save `model`: no _orig_mod. prefixes
    return state, data


def save(run: Run, state: TrainState) -> dict:
    """Checkpoint the run (rank 0 writes) and return what was saved."""
    state.lap()
    ckpt = checkpoint.model_file(run.cfg, run.preset, state.state_dict())
    if run.main:
        checkpoint.save(ckpt, run.out)
    run.last_saved = state.step
    return ckpt


def stop_now(run: Run, state: TrainState) -> bool:
    """The step or time budget is spent (train.max_steps, train.max_minutes; 0 is none)."""
    tc = run.cfg.train
    out_of_steps = bool(tc.max_steps) and state.step >= tc.max_steps
    return out_of_steps or (bool(tc.max_minutes) and any_process(
        state.seconds_so_far() >= 60 * tc.max_minutes, run.distributed))


def evaluate_now(run: Run, state: TrainState) -> None:
    """Accuracy and FID into TensorBoard; the time it takes is not training time."""
    state.lap()
    log_quality(run.writer, state.sampling_model(), run.cfg, run.device, state.step,
                state.train_seconds / 60, run.log)
    state.start_clock()


def train_loop(run: Run, state: TrainState, data: MNISTData, speed: dict) -> dict:
    """Run the loop with saving, TensorBoard, evaluation and the crash-test hooks; return the
    last checkpoint."""
    tc = run.cfg.train
    scheduler = make_scheduler("ddpm", run.cfg.diffusion, run.device)  # add_noise/target only
    last = {}  # the checkpoint saved last

    def on_step(loss: float) -> None:
        if run.main:
            run.writer.add_scalar("train/loss", loss, state.step)
        if tc.save_every and state.step % tc.save_every == 0:
            last["ckpt"] = save(run, state)
        if fault("kill_after_step") == str(state.step):
            os.kill(os.getpid(), signal.SIGKILL)  # a crash test: die like a killed job
        if run.main and tc.eval_every_steps and state.step % tc.eval_every_steps == 0:
            evaluate_now(run, state)

    def on_epoch_end(complete: bool) -> None:
        if complete and run.main and tc.grid_every and state.epoch % tc.grid_every == 0:
            log_sample_grid(run.writer, state.sampling_model(), run.cfg, run.device, tc.seed,
                            "samples", state.epoch)
        last["ckpt"] = save(run, state)

    try:
        loop(state, data, scheduler, tc, speed, batch_size=tc.batch_size, seed=tc.seed,
             epochs=tc.epochs, device=run.device, rank=run.rank, world=run.world,
             distributed=run.distributed, on_step=on_step, on_epoch_end=on_epoch_end,
             stop=lambda: stop_now(run, state))
    except NonFiniteLoss as e:
        last_good = run.last_saved if run.last_saved is not None else "none saved yet"
        raise UserError(f"loss is {e} at step {state.step + 1} (epoch {state.epoch + 1}); "
                        f"training stopped, {run.out} keeps the last good checkpoint "
                        f"(step {last_good})") from None
    return last["ckpt"]


def train(cfg: Config, preset: str, out, logdir, device, resume: bool = False,
          data: MNISTData | None = None, log=print) -> dict:
    """Train (or resume) and return the final checkpoint dict."""
    from torch.utils.tensorboard import SummaryWriter

    rank, world, device, distributed = distributed_setup(torch.device(device))
    run = Run(cfg, preset, Path(out), device, rank, world, distributed, log if rank == 0 else quiet)
    loaded = open_resume(run) if resume else None
    if loaded is None and run.out.exists():
        run.log(f"note: {out} exists and will be replaced at the first save (use --resume to "
                f"continue it)")
    if run.main:
        run.out.parent.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)
    speed = speed_options(cfg.train, device)
    state, data = prepare(run, data, loaded, speed)
    run.log(f"config (preset '{preset}'):\n{cfg}")
    on = [name for name, enabled in speed.items() if enabled]
    run.log(f"{count_parameters(state.model):,} trainable parameters; {len(data):,} training "
            f"images; device {device}" + (f"; {world} processes" if distributed else "")
            + (f"; speed options: {', '.join(on)}" if on else ""))
    tc = cfg.train
    if state.epoch >= tc.epochs or stop_now(run, state):
        # A run that would train nothing writes nothing: an existing file is never replaced
        # by an untrained model, nor re-saved unchanged.
        raise UserError(f"nothing to train: the run is at epoch {state.epoch}, step "
                        f"{state.step} with train.epochs={tc.epochs}, max_steps={tc.max_steps}, "
                        f"max_minutes={tc.max_minutes:g}; {out} was not written")
    run.writer = SummaryWriter(str(logdir)) if run.main else None
    state.model.train()
    try:
        ckpt = train_loop(run, state, data, speed)
        if distributed:
            run.log(f"replicas agree: max |w_rank - w_0| = {replica_divergence(state.model):.3g} "
                    f"over {world} processes")
    finally:
        if run.writer is not None:
            run.writer.close()
    run.log(f"saved {out} (epoch {state.epoch}, step {state.step}, "
            f"{state.train_seconds / 60:.1f} train minutes); TensorBoard logs in {logdir}")
    return ckpt
