"""LoRA fine-tuning: freeze the base, train only the adapters (by default on the cross-attention
Q/K/V projections), on MNIST or on a folder of the user's own digits. The step and the loop
are training's own (train.train_step, train.loop)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from torch import nn

from . import checkpoint, models
from .config import UserError, validate
from .dataset import epoch_batches, load_image_folder, load_mnist
from .diffusion import make_scheduler
from .lora import inject_lora, lora_state_dict
from .train import NonFiniteLoss, TrainState, loop, make_lr_schedule, speed_options
from .unet import count_parameters


def load_finetune_data(spec: str, img_size: int):
    """'mnist' (the training set, as the reference did) or a folder of class sub-folders 0-9."""
    if spec == "mnist":
        return load_mnist(train=True, img_size=img_size)
    return load_image_folder(spec, img_size)


def load_base(base_path, lora: dict) -> tuple:
    """(model, ckpt, cfg): the base with the weights that sampling uses (the EMA copy when the
    run kept one), and its config with the lora section's fields in `lora` changed and checked
    against their declared ranges."""
    model, ckpt, cfg = models.load_model(base_path, device="cpu")
    checkpoint.load_state(model, checkpoint.sampling_weights(ckpt), str(base_path))
    changes = {k: v for k, v in lora.items() if v is not None}
    if "targets" in changes:
        changes["targets"] = tuple(changes["targets"])
    cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, **changes))
    validate(cfg)  # --r, --alpha, --lr, --epochs, ... against the lora section's ranges
    return model, ckpt, cfg


def add_adapters(model: nn.Module, lc, log) -> None:
    total = sum(p.numel() for p in model.parameters())
    wrapped = inject_lora(model, lc.r, lc.alpha, lc.targets)
    if wrapped == 0:
        raise UserError(f"no Linear layer named {list(lc.targets)} in this model")
    trainable = count_parameters(model)
    log(f"LoRA r={lc.r} alpha={lc.alpha} on {wrapped} layers {list(lc.targets)}: "
        f"{trainable:,} trainable parameters ({100 * trainable / total:.3f}% of the base's "
        f"{total:,})")


def freeze_norm_statistics(model: nn.Module) -> None:
    """Train mode, except BatchNorm: the base is frozen, its running statistics included. In
    train mode they would drift, and lora.pt does not carry them, so sampling would see other
    statistics than training did."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def finetune(base_path, out, device, lora: dict | None = None, seed: int = 0, data="mnist",
             full: bool = False, log=print) -> dict:
    """Train a LoRA adapter (or, with full=True, every weight, for comparison) on `data` and
    save it to `out`. lora: fields of the lora section to change ({"r": 4, "max_steps": 100})."""
    model, ckpt, cfg = load_base(base_path, lora or {})
    lc = cfg.lora
    if lc.epochs == 0 and lc.max_steps == 0:
        raise UserError(f"--epochs 0 and no --max-steps: nothing to train; {out} was not written")
    if isinstance(data, str):
        data = load_finetune_data(data, cfg.model.img_size)
    if full:
        log(f"full fine-tune: all {sum(p.numel() for p in model.parameters()):,} parameters train")
    else:
        add_adapters(model, lc, log)
    model.to(device)
    freeze_norm_statistics(model)
    # The base's loss and label dropout, and the reference's plain recipe for the adapters:
    # constant Adam, no clipping, no EMA, fp32.
    tc = dataclasses.replace(cfg.train, lr=lc.lr, lr_schedule="constant", grad_clip=0.0,
                             ema_decay=0.0)
    speed = speed_options(dataclasses.replace(tc, precision="fp32", channels_last="off",
                                              compile="off", fused_optimizer="off"), device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lc.lr)
    state = TrainState(model, optimizer, make_lr_schedule(optimizer, tc, 0), None,
                       torch.Generator(device="cpu").manual_seed(seed))
    epochs = lc.epochs
    if lc.max_steps:  # a step budget wins over the epoch count, however small the data set
        epochs = math.ceil(lc.max_steps / len(epoch_batches(len(data), lc.batch_size, seed, 0)))
    try:
        loop(state, data, make_scheduler("ddpm", cfg.diffusion, device), tc, speed,
             batch_size=lc.batch_size, seed=seed, epochs=epochs, device=device,
             desc="lora epoch", stop=lambda: bool(lc.max_steps) and state.step >= lc.max_steps)
    except NonFiniteLoss as e:
        raise UserError(f"loss is {e} at LoRA step {state.step + 1}; stopped, nothing saved") from None
    if state.step == 0:
        raise UserError(f"no training step was taken (empty data?); {out} was not written")
    return save_result(model, ckpt, cfg, out, state.step, full, log)


def save_result(model, base_ckpt: dict, cfg, out, steps: int, full: bool, log) -> dict:
    """lora.pt (the adapters alone), or with full=True a whole model checkpoint that
    denoise.py and evaluate.py load like any other."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    if full:
        saved = checkpoint.model_file(cfg, base_ckpt.get("preset"),
                                      {"model": model.state_dict(), "step": steps})
        checkpoint.save(saved, out)
        log(f"saved {out} (full fine-tune, {steps} steps)")
        return saved
    lc = cfg.lora
    saved = checkpoint.lora_file(cfg, lora_state_dict(model), lc.r, lc.alpha, lc.targets,
                                 checkpoint.base_fingerprint(base_ckpt), steps)
    checkpoint.save(saved, out)
    log(f"saved {out} ({len(saved['lora'])} tensors, {steps} steps)")
    return saved
