"""Training: one flat loop (noise, predict, loss, step), checkpoints and TensorBoard.

A run is fully described by its config; the checkpoint stores that config, the optimizer,
the counters and every RNG state, so --resume continues exactly where the run stopped.
"""
from __future__ import annotations

import math
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint
from .config import Config, UserError
from .dataset import MNISTData, epoch_batches, load_mnist
from .denoise import sample_digits
from .diffusion import NoiseSchedule, make_scheduler
from .ema import EMA
from .unet import UNet, count_parameters


def diffusion_loss(model, scheduler: NoiseSchedule, x0, y, generator, loss: str,
                   p_uncond: float = 0.0) -> torch.Tensor:
    """Noise x0 to a random timestep per image and score the model's prediction of the target
    (the noise, or v). With p_uncond > 0 some labels become the null class, so the same network
    also learns the unconditional model that classifier-free guidance needs."""
    b = x0.shape[0]
    t = torch.randint(0, scheduler.num_train_timesteps, (b,), generator=generator,
                      device=generator.device).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
    if p_uncond > 0:
        drop = (torch.rand(b, generator=generator, device=generator.device) < p_uncond).to(y.device)
        y = torch.where(drop, torch.full_like(y, model.null_label), y)
    pred = model(scheduler.add_noise(x0, noise, t), t, y)  # (B, 1, S, S)
    target = scheduler.target(x0, noise, t)
    return F.l1_loss(pred, target) if loss == "l1" else F.mse_loss(pred, target)


def speed_options(tc, device: torch.device) -> dict:
    """Resolve the speed settings for this device: 'auto' means on for CUDA, off for CPU
    (on a CPU, bf16 matmuls are hundreds of times slower than fp32 here)."""
    cuda = device.type == "cuda"

    def pick(value: str) -> bool:
        return cuda if value == "auto" else value == "on"

    bf16 = tc.precision == "bf16" or (tc.precision == "auto" and cuda)
    return {"bf16": bf16, "tf32": cuda and tc.precision != "fp32",
            "channels_last": pick(tc.channels_last), "compile": pick(tc.compile),
            "fused_optimizer": cuda, "data_on_device": cuda}


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
    scheduler = make_scheduler(sc.sampler, cfg.diffusion, device, sc.steps, sc.eta)
    images, _ = sample_digits(model, scheduler, list(range(cfg.model.num_classes)), 1,
                              seed=seed, device=device, guidance=sc.guidance,
                              guidance_interval=sc.guidance_interval)
    model.train(was_training)
    writer.add_image(tag, make_grid((images + 1) / 2, nrow=cfg.model.num_classes), step)


def log_quality(writer, model, cfg: Config, device, step: int, train_minutes: float, log) -> dict:
    """Conditional accuracy and FID on a small sample, with the preset's sampler (issue: the
    quality curve of a run). The classifier ships with the package."""
    from .evaluate import evaluate_model
    was_training = model.training
    model.eval()
    sc = cfg.sample
    metrics = evaluate_model(model, cfg, n=cfg.train.eval_n, device=device, seed=1234,
                             sampler=sc.sampler, steps=sc.steps, guidance=sc.guidance, eta=sc.eta,
                             guidance_interval=sc.guidance_interval)
    model.train(was_training)
    writer.add_scalar("eval/accuracy", metrics["accuracy"], step)
    writer.add_scalar("eval/fid", metrics["fid"], step)
    writer.add_scalar("eval/train_minutes", train_minutes, step)
    log(f"eval at step {step} ({train_minutes:.1f} train min): accuracy "
        f"{100 * metrics['accuracy']:.2f}%, FID {metrics['fid']:.2f} (n={cfg.train.eval_n})")
    return metrics


def distributed_setup(device: torch.device):
    """(rank, world, device) for this process. A run is distributed when torchrun sets
    WORLD_SIZE > 1: NCCL on CUDA (one GPU per local rank), gloo on CPU."""
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def replica_divergence(model) -> float:
    """Largest |w_rank - w_rank0| over all weights and ranks: 0.0 when DDP kept them in step."""
    import torch.distributed as dist
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


def train(cfg: Config, preset: str, out, logdir, device, resume: bool = False,
          data: MNISTData | None = None, log=print) -> dict:
    """Train (or resume) and return the final checkpoint dict."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    rank, world, device = distributed_setup(torch.device(device))
    main = rank == 0  # only the main process logs, samples and writes checkpoints
    if not main:
        log = lambda *a, **k: None  # noqa: E731
    out = Path(out)
    ckpt = None
    if resume:
        ckpt = checkpoint.load_model_checkpoint(out)
        saved = checkpoint.config_of(ckpt)
        if saved.model != cfg.model or saved.diffusion != cfg.diffusion:
            raise UserError(f"{out} holds a model of another architecture or schedule (preset "
                            f"'{ckpt.get('preset')}'); resume with the same preset and model "
                            f"settings, or write to another --out")
        # The data order, noise and learning rate follow the run's own, whatever the command
        # line says: a resumed run continues the interrupted one exactly.
        cfg.train.seed, cfg.train.lr = saved.train.seed, saved.train.lr
    elif out.exists():
        log(f"note: {out} exists and will be replaced at the first save (use --resume to continue it)")
    if main:
        out.parent.mkdir(parents=True, exist_ok=True)

    tc = cfg.train
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    random.seed(tc.seed)
    if data is None:
        data = load_mnist(train=True, img_size=cfg.model.img_size)
    steps_per_epoch = len(epoch_batches(len(data), tc.batch_size, tc.seed, 0, rank, world))
    total_steps = tc.epochs * steps_per_epoch
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)

    speed = speed_options(tc, device)
    if speed["tf32"]:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if speed["data_on_device"]:  # the whole uint8 set fits on a GPU: no host copies per batch
        data = MNISTData(data.images.to(device), data.labels.to(device))
    memory_format = torch.channels_last if speed["channels_last"] else torch.contiguous_format
    model = UNet(cfg.model).to(device, memory_format=memory_format)
    scheduler = make_scheduler("ddpm", cfg.diffusion, device)  # training uses add_noise/target only
    optimizer = make_optimizer(model.parameters(), tc, fused=speed["fused_optimizer"])
    lr_schedule = make_lr_schedule(optimizer, tc, total_steps)
    ema = EMA(model, tc.ema_decay) if tc.ema_decay > 0 else None
    # timesteps, noise and label drop; offset by rank so the processes draw different noise
    generator = torch.Generator(device="cpu").manual_seed(tc.seed + 1_000_003 * rank)
    epoch, step, step_in_epoch, train_seconds = 0, 0, 0, 0.0
    if ckpt is not None:
        checkpoint.load_state(model, ckpt["model"], str(out))
        if "optimizer" in ckpt:  # a converted legacy file has weights only
            optimizer.load_state_dict(ckpt["optimizer"])
        if "lr_schedule" in ckpt:
            lr_schedule.load_state_dict(ckpt["lr_schedule"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"] if "ema" in ckpt else model.state_dict())
        epoch, step, step_in_epoch = ckpt["epoch"], ckpt["step"], ckpt["step_in_epoch"]
        train_seconds = ckpt.get("train_seconds", 0.0)
        if "rng" in ckpt and world == 1:
            set_rng_state(generator, ckpt["rng"])
        elif world > 1:  # the checkpoint holds rank 0's stream; give each rank its own anew
            generator.manual_seed(tc.seed + 1_000_003 * rank + step)
        log(f"resumed {out} at epoch {epoch}, step {step}")
    net = model  # what the loop calls; the DDP wrapper when distributed
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if speed["compile"]:
        net = torch.compile(net)  # the checkpoint still saves `model`: no _orig_mod. prefixes

    log(f"config (preset '{preset}'):\n{cfg}")
    on = [name for name, enabled in speed.items() if enabled]
    log(f"{count_parameters(model):,} trainable parameters; {len(data):,} training images; "
        f"device {device}" + (f"; {world} processes" if world > 1 else "")
        + (f"; speed options: {', '.join(on)}" if on else ""))
    writer = SummaryWriter(str(logdir)) if main else None

    tick = time.perf_counter()

    def lap() -> None:
        """Add the time since `tick` to train_seconds: called before every save and evaluation,
        so a checkpoint written mid-epoch carries its true training time into a resume."""
        nonlocal train_seconds, tick
        now = time.perf_counter()
        train_seconds += now - tick
        tick = now

    def snapshot() -> dict:
        state = {"format": checkpoint.MODEL_FORMAT, "preset": preset, "config": cfg.to_dict(),
                 "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "lr_schedule": lr_schedule.state_dict(), "epoch": epoch, "step": step,
                 "step_in_epoch": step_in_epoch, "train_seconds": train_seconds,
                 "rng": rng_state(generator)}
        if ema is not None:
            state["ema"] = ema.state_dict()
        return state

    def sampling_model():
        return ema.model if ema is not None else model

    state = None
    model.train()
    try:
        while epoch < tc.epochs and not (tc.max_steps and step >= tc.max_steps):
            batches = epoch_batches(len(data), tc.batch_size, tc.seed, epoch, rank, world)
            bar = tqdm(batches[step_in_epoch:], desc=f"epoch {epoch + 1}/{tc.epochs}",
                       initial=step_in_epoch, total=len(batches), dynamic_ncols=True,
                       disable=not main)
            tick = time.perf_counter()
            for idx in bar:
                x0, y = data.batch(idx, device)
                x0 = x0.contiguous(memory_format=memory_format)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=speed["bf16"]):
                    loss = diffusion_loss(net, scheduler, x0, y, generator, tc.loss, tc.p_uncond)
                if world > 1:  # every rank sees the mean loss, so all stop together on NaN
                    import torch.distributed as dist
                    mean_loss = loss.detach().clone()
                    dist.all_reduce(mean_loss)
                    value = mean_loss.item() / world
                else:
                    value = loss.item()
                if not math.isfinite(value):
                    raise UserError(f"loss is {value} at step {step + 1} (epoch {epoch + 1}); "
                                    f"training stopped, {out} keeps the last good checkpoint "
                                    f"(step {ckpt['step'] if ckpt else 'none saved yet'})")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if tc.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                optimizer.step()
                lr_schedule.step()
                if ema is not None:
                    ema.update(model, step)
                step += 1
                step_in_epoch += 1
                if main:
                    writer.add_scalar("train/loss", value, step)
                    bar.set_postfix(loss=f"{value:.4f}")
                if tc.save_every and step % tc.save_every == 0:
                    lap()
                    ckpt = snapshot()
                    if main:
                        checkpoint.save(ckpt, out)
                if checkpoint.fault("kill_after_step") == str(step):
                    os.kill(os.getpid(), signal.SIGKILL)  # a crash test: die like a killed job
                if main and tc.eval_every_steps and step % tc.eval_every_steps == 0:
                    lap()
                    log_quality(writer, sampling_model(), cfg, device, step, train_seconds / 60, log)
                    tick = time.perf_counter()  # the evaluation is not training time
                if tc.max_steps and step >= tc.max_steps:
                    break
            bar.close()
            lap()
            if step_in_epoch == len(batches):  # the epoch ran to its end
                epoch, step_in_epoch = epoch + 1, 0
                if main:
                    log_sample_grid(writer, sampling_model(), cfg, device, tc.seed, "samples", epoch)
                    if tc.eval_every and epoch % tc.eval_every == 0:
                        log_quality(writer, sampling_model(), cfg, device, step,
                                    train_seconds / 60, log)
            ckpt = snapshot()
            if main:
                checkpoint.save(ckpt, out)
        state = ckpt
        if world > 1:
            log(f"replicas agree: max |w_rank - w_0| = {replica_divergence(model):.3g} "
                f"over {world} processes")
    finally:
        if writer is not None:
            writer.close()
    if state is None:
        state = snapshot()
    log(f"saved {out} (epoch {epoch}, step {step}, {train_seconds / 60:.1f} train minutes); "
        f"TensorBoard logs in {logdir}")
    return state
