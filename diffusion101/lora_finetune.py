"""LoRA fine-tuning: freeze the base, train only the adapters (by default on the cross-attention
Q/K/V projections), on MNIST or on a folder of the user's own digits."""
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
from .train import NonFiniteLoss, TrainState, make_lr_schedule, speed_options, train_step
from .unet import count_parameters


def load_finetune_data(spec: str, img_size: int):
    """'mnist' (the training set, as the reference did) or a folder of class sub-folders 0-9."""
    if spec == "mnist":
        return load_mnist(train=True, img_size=img_size)
    return load_image_folder(spec, img_size)


def finetune(base_path, out, device, r=None, alpha=None, epochs=None, max_steps=None, seed=0,
             data="mnist", targets=None, lr=None, full=False, log=print) -> dict:
    """Train a LoRA adapter (or, with full=True, every weight, for comparison) on `data`."""
    from tqdm import tqdm

    model, ckpt, cfg = models.load_model(base_path, device="cpu")
    # adapt the weights that sampling uses (the EMA copy, when the run kept one)
    checkpoint.load_state(model, checkpoint.sampling_weights(ckpt), str(base_path))
    lc = cfg.lora
    for name, value in (("r", r), ("alpha", alpha), ("epochs", epochs), ("max_steps", max_steps),
                        ("targets", tuple(targets) if targets else None), ("lr", lr)):
        if value is not None:
            setattr(lc, name, value)
    validate(cfg)  # the lora section's declared ranges: --r, --alpha, --lr, --epochs, ...
    if lc.epochs == 0 and lc.max_steps == 0:
        raise UserError(f"--epochs 0 and no --max-steps: nothing to train; {out} was not written")
    if isinstance(data, str):
        data = load_finetune_data(data, cfg.model.img_size)
    base_fp = checkpoint.base_fingerprint(ckpt)
    total = sum(p.numel() for p in model.parameters())
    if full:
        log(f"full fine-tune: all {total:,} parameters train")
    else:
        wrapped = inject_lora(model, lc.r, lc.alpha, lc.targets)
        if wrapped == 0:
            raise UserError(f"no Linear layer named {list(lc.targets)} in this model")
        trainable = count_parameters(model)
        log(f"LoRA r={lc.r} alpha={lc.alpha} on {wrapped} layers {list(lc.targets)}: "
            f"{trainable:,} trainable parameters ({100 * trainable / total:.3f}% of the base's "
            f"{total:,})")
    model.to(device)
    # The base is frozen, its BatchNorm statistics included: train mode would drift them, and
    # lora.pt does not carry them, so sampling would see other statistics than training did.
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()

    scheduler = make_scheduler("ddpm", cfg.diffusion, device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lc.lr)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    # The training step is train.py's own, with the base's loss and label dropout, and the
    # reference's plain recipe for the adapters: constant Adam, no clipping, no EMA, fp32.
    tc = dataclasses.replace(cfg.train, lr=lc.lr, lr_schedule="constant", grad_clip=0.0,
                             ema_decay=0.0)
    speed = speed_options(dataclasses.replace(tc, precision="fp32", channels_last="off",
                                              compile="off", fused_optimizer="off"), device)
    state = TrainState(model, optimizer, make_lr_schedule(optimizer, tc, 0), None, generator)
    if data is None:
        data = load_mnist(train=True, img_size=cfg.model.img_size)
    epochs = lc.epochs
    if lc.max_steps:  # a step budget wins over the epoch count, however small the data set
        per_epoch = len(epoch_batches(len(data), lc.batch_size, seed, 0))
        epochs = math.ceil(lc.max_steps / per_epoch)
    for epoch in range(epochs):
        batches = epoch_batches(len(data), lc.batch_size, seed, epoch)
        bar = tqdm(batches, desc=f"lora epoch {epoch + 1}/{epochs}", dynamic_ncols=True)
        for idx in bar:
            x0, y = data.batch(idx, device)
            try:
                value = train_step(state, scheduler, x0, y, tc, speed)
            except NonFiniteLoss as e:
                raise UserError(f"loss is {e} at LoRA step {state.step + 1}; stopped, "
                                f"nothing saved") from None
            bar.set_postfix(loss=f"{value:.4f}")
            if lc.max_steps and state.step >= lc.max_steps:
                break
        bar.close()
        if lc.max_steps and state.step >= lc.max_steps:
            break
    step = state.step
    if step == 0:
        raise UserError(f"no training step was taken (empty data?); {out} was not written")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    if full:  # a whole model checkpoint, loadable by denoise.py and evaluate.py
        state = {"format": checkpoint.MODEL_FORMAT, "preset": ckpt.get("preset"),
                 "config": cfg.to_dict(), "model": model.state_dict(), "epoch": 0,
                 "step": step, "step_in_epoch": 0}
        checkpoint.save(state, out)
        log(f"saved {out} (full fine-tune, {step} steps)")
        return state
    adapter = {"format": checkpoint.LORA_FORMAT, "lora": lora_state_dict(model),
               "lora_config": {"r": lc.r, "alpha": lc.alpha, "targets": list(lc.targets)},
               "base_fingerprint": base_fp, "config": cfg.to_dict(), "steps": step}
    checkpoint.save(adapter, out)
    log(f"saved {out} ({len(adapter['lora'])} tensors, {step} steps)")
    return adapter
