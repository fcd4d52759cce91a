"""Training: one flat loop (noise, predict, loss, step), checkpoints and TensorBoard.

A run is fully described by its config; the checkpoint stores that config, the optimizer,
the counters and every RNG state, so --resume continues exactly where the run stopped.
"""
from __future__ import annotations

import math
import os
import random
import signal
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint
from .config import Config, UserError
from .dataset import MNISTData, epoch_batches, load_mnist
from .denoise import sample_digits
from .diffusion import DDPMScheduler
from .unet import UNet, count_parameters


def diffusion_loss(model, scheduler: DDPMScheduler, x0, y, generator, loss: str) -> torch.Tensor:
    """Noise x0 to a random timestep per image and score the model's noise prediction."""
    b = x0.shape[0]
    t = torch.randint(0, scheduler.num_train_timesteps, (b,), generator=generator,
                      device=generator.device).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
    pred = model(scheduler.add_noise(x0, noise, t), t, y)  # (B, 1, S, S)
    return F.l1_loss(pred, noise) if loss == "l1" else F.mse_loss(pred, noise)


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


def log_sample_grid(writer, model, scheduler, cfg: Config, device, seed: int, tag: str, step: int):
    """Generate digits 0-9 and put the grid in TensorBoard (BatchNorm in eval mode)."""
    from torchvision.utils import make_grid
    was_training = model.training
    model.eval()
    images, _ = sample_digits(model, scheduler, list(range(cfg.model.num_classes)), 1,
                              seed=seed, device=device)
    model.train(was_training)
    writer.add_image(tag, make_grid((images + 1) / 2, nrow=cfg.model.num_classes), step)


def train(cfg: Config, preset: str, out, logdir, device, resume: bool = False,
          data: MNISTData | None = None, log=print) -> dict:
    """Train (or resume) and return the final checkpoint dict."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    out = Path(out)
    ckpt = None
    if resume:
        ckpt = checkpoint.load_model_checkpoint(out)
        saved = checkpoint.config_of(ckpt)
        if saved.model != cfg.model or saved.diffusion != cfg.diffusion:
            raise UserError(f"{out} holds a model of another architecture or schedule (preset "
                            f"'{ckpt.get('preset')}'); resume with the same preset and model "
                            f"settings, or write to another --out")
        # Architecture, schedule and seed come from the checkpoint; epochs and limits may change.
        cfg.train.seed = saved.train.seed
    elif out.exists():
        log(f"note: {out} exists and will be replaced at the first save (use --resume to continue it)")
    out.parent.mkdir(parents=True, exist_ok=True)

    tc = cfg.train
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    random.seed(tc.seed)
    model = UNet(cfg.model).to(device)
    scheduler = DDPMScheduler(cfg.diffusion, device=device)
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr)
    generator = torch.Generator(device="cpu").manual_seed(tc.seed)  # timesteps and noise
    epoch, step, step_in_epoch = 0, 0, 0
    if ckpt is not None:
        checkpoint.load_state(model, ckpt["model"], str(out))
        if "optimizer" in ckpt:  # a converted legacy file has weights only
            optimizer.load_state_dict(ckpt["optimizer"])
            for group in optimizer.param_groups:  # a new --lr applies to the resumed run
                group["lr"] = tc.lr
        epoch, step, step_in_epoch = ckpt["epoch"], ckpt["step"], ckpt["step_in_epoch"]
        if "rng" in ckpt:
            set_rng_state(generator, ckpt["rng"])
        log(f"resumed {out} at epoch {epoch}, step {step}")

    if data is None:
        data = load_mnist(train=True, img_size=cfg.model.img_size)
    log(f"config (preset '{preset}'):\n{cfg}")
    log(f"{count_parameters(model):,} trainable parameters; {len(data):,} training images; "
        f"device {device}")
    writer = SummaryWriter(str(logdir))

    def snapshot() -> dict:
        return {"format": checkpoint.MODEL_FORMAT, "preset": preset, "config": cfg.to_dict(),
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "epoch": epoch, "step": step, "step_in_epoch": step_in_epoch,
                "rng": rng_state(generator)}

    state = None
    model.train()
    try:
        while epoch < tc.epochs and not (tc.max_steps and step >= tc.max_steps):
            batches = epoch_batches(len(data), tc.batch_size, tc.seed, epoch)
            bar = tqdm(batches[step_in_epoch:], desc=f"epoch {epoch + 1}/{tc.epochs}",
                       initial=step_in_epoch, total=len(batches), dynamic_ncols=True)
            for idx in bar:
                x0, y = data.batch(idx, device)
                loss = diffusion_loss(model, scheduler, x0, y, generator, tc.loss)
                value = loss.item()
                if not math.isfinite(value):
                    raise UserError(f"loss is {value} at step {step + 1} (epoch {epoch + 1}); "
                                    f"training stopped, {out} keeps the last good checkpoint "
                                    f"(step {ckpt['step'] if ckpt else 'none saved yet'})")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                step_in_epoch += 1
                writer.add_scalar("train/loss", value, step)
                bar.set_postfix(loss=f"{value:.4f}")
                if tc.save_every and step % tc.save_every == 0:
                    ckpt = snapshot()
                    checkpoint.save(ckpt, out)
                if checkpoint.fault("kill_after_step") == str(step):
                    os.kill(os.getpid(), signal.SIGKILL)  # a crash test: die like a killed job
                if tc.max_steps and step >= tc.max_steps:
                    break
            bar.close()
            if step_in_epoch == len(batches):  # the epoch ran to its end
                epoch, step_in_epoch = epoch + 1, 0
                log_sample_grid(writer, model, scheduler, cfg, device, tc.seed, "samples", epoch)
            ckpt = snapshot()
            checkpoint.save(ckpt, out)
        state = ckpt
    finally:
        writer.close()
    if state is None:
        state = snapshot()
    log(f"saved {out} (epoch {epoch}, step {step}); TensorBoard logs in {logdir}")
    return state
