"""What a training run changes as it trains, in one object: the model, the optimizer, the
learning-rate schedule, the EMA, the generator of timesteps and noise, the counters and the
clock. Built fresh (build_state) or restored from a checkpoint (open_resume checks it fits the
run, TrainState.load_state_dict reads it), so a resumed run continues exactly where the
interrupted one stopped."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from . import checkpoint
from .config import Config, TrainConfig, UserError
from .ema import EMA
from .rng import rng_state, set_rng_state
from .classes import class_names
from .memory import check_memory
from .speed import Speed
from .networks import build_network


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
    saved: dict | None = None  # the checkpoint written last (not part of a checkpoint)
    last_saved: int | None = None  # its step
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


def open_resume(out, cfg: Config) -> dict:
    """The checkpoint to continue, checked against the run's config, which takes the saved
    run's seed and learning rate: a resumed run continues the interrupted one exactly, whatever
    the command line says about those."""
    loaded = checkpoint.load_model_checkpoint(out)
    saved = checkpoint.config_of(loaded)
    if "optimizer" not in loaded:
        raise UserError(f"{out} holds sampling weights only (an export or a converted file: "
                        f"no optimizer, no RNG states), so it cannot be resumed; train anew "
                        f"with another --out, or fine-tune it with LoRA")
    if class_names(saved.model) != class_names(cfg.model):
        raise UserError(f"{cfg.train.data} holds the classes "
                        f"{', '.join(class_names(cfg.model))}; {out} was trained on "
                        f"{', '.join(class_names(saved.model))}; resume on the same classes")
    if saved.model != cfg.model or saved.diffusion != cfg.diffusion:
        raise UserError(f"{out} holds a model of another architecture or schedule (preset "
                        f"'{loaded.get('preset')}'); resume with the same preset and model "
                        f"settings, or write to another --out")
    if saved.train.batch_size != cfg.train.batch_size:
        raise UserError(f"{out} counts its place in the epoch in batches of "
                        f"{saved.train.batch_size}: resume with that batch size")
    cfg.train.seed, cfg.train.lr = saved.train.seed, saved.train.lr
    return loaded


def build_state(cfg: Config, device, speed: Speed, total_steps: int, rank: int = 0,
                held: int = 0) -> TrainState:
    """A fresh model, optimizer, schedule, EMA and generator, laid out as `speed` says; `held`:
    the bytes the training set holds on that device (its memory is counted before it is spent)."""
    recipe = cfg.train
    check_memory(cfg.model, recipe.batch_size, device, training=True, held=held)
    layout = torch.channels_last if speed.channels_last else torch.contiguous_format
    model = build_network(cfg.model).to(device, memory_format=layout)
    optimizer = make_optimizer(model.parameters(), recipe, fused=speed.fused_optimizer)
    # Offset by rank, so the processes of a distributed run draw different noise.
    generator = torch.Generator(device="cpu").manual_seed(recipe.seed + 1_000_003 * rank)
    return TrainState(model, optimizer, make_lr_schedule(optimizer, recipe, total_steps),
                      EMA(model, recipe.ema_decay) if recipe.ema_decay > 0 else None, generator)


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
