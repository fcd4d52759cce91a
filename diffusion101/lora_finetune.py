"""LoRA fine-tuning: freeze the base, train only the adapters (by default on the cross-attention
Q/K/V projections), on MNIST or on a folder of the user's own images. The loop is training's
own (train.fit), handed a recipe of its own (finetune_recipe)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from torch import nn

from . import checkpoint
from .config import TrainConfig, UserError
from .dataset import epoch_batches, load_image_folder, load_mnist
from .lora import inject_lora, lora_state_dict
from .model_files import load_model
from .classes import class_names, is_mnist_model
from .memory import check_memory
from .settings import validate
from .denoise import make_objective
from .train import NonFiniteLoss, Run, fit
from .train_state import TrainState, make_lr_schedule
from .networks import count_parameters


def load_finetune_data(spec: str, model_cfg):
    """'mnist' (the training set, as the reference did), or a folder whose sub-folders are
    named after classes the base knows (0-9 for an MNIST base); one class is enough."""
    if spec == "mnist":
        if not is_mnist_model(model_cfg):
            raise UserError("this base was not trained on MNIST's digits: fine-tune it on a "
                            "folder of its own classes (--data DIR)")
        return load_mnist(train=True, img_size=model_cfg.img_size)
    data, _ = load_image_folder(spec, model_cfg.img_size, model_cfg.in_channels,
                                known=class_names(model_cfg))
    return data


def load_base(base_path, lora: dict) -> tuple:
    """(model, ckpt, cfg): the base with the weights that sampling uses (the EMA copy when the
    run kept one), and its config with the lora section's fields in `lora` changed and checked
    against their declared ranges."""
    model, ckpt, cfg = load_model(base_path, device="cpu")
    checkpoint.load_state(model, checkpoint.sampling_weights(ckpt), str(base_path))
    changes = {k: v for k, v in lora.items() if v is not None}
    if "targets" in changes:
        changes["targets"] = tuple(changes["targets"])
    cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, **changes))
    validate(cfg)  # --r, --alpha, --lr, --epochs, ... against the lora section's ranges
    return model, ckpt, cfg


def add_adapters(model: nn.Module, lora_cfg, log) -> None:
    total = sum(p.numel() for p in model.parameters())
    wrapped = inject_lora(model, lora_cfg.r, lora_cfg.alpha, lora_cfg.targets)
    if wrapped == 0:
        raise UserError(f"no Linear layer named {list(lora_cfg.targets)} in this model")
    trainable = count_parameters(model)
    log(f"LoRA r={lora_cfg.r} alpha={lora_cfg.alpha} on {wrapped} layers {list(lora_cfg.targets)}: "
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


def finetune_recipe(cfg, seed: int, steps_per_epoch: int) -> TrainConfig:
    """The recipe fit() follows for a fine-tune: the base's loss and label dropout (its
    objective), the lora section's batch size, rate and budget, and for everything else the
    reference's plain recipe, the dataclass's defaults (constant Adam, no clipping, no EMA,
    fp32, no checkpoints or evaluations on the way), but no grids. A step budget wins over the
    epoch count, however small the data."""
    lora_cfg, base = cfg.lora, cfg.train
    epochs = lora_cfg.epochs
    if lora_cfg.max_steps:
        epochs = math.ceil(lora_cfg.max_steps / steps_per_epoch)
    return TrainConfig(epochs=epochs, batch_size=lora_cfg.batch_size, lr=lora_cfg.lr,
                       max_steps=lora_cfg.max_steps, seed=seed, loss=base.loss,
                       p_uncond=base.p_uncond, snr_gamma=base.snr_gamma, grid_every=0)


def finetune(base_path, out, device, lora: dict | None = None, seed: int = 0, data="mnist",
             full: bool = False, log=print) -> dict:
    """Train a LoRA adapter (or, with full=True, every weight, for comparison) on `data` and
    save it to `out`. lora: fields of the lora section to change ({"r": 4, "max_steps": 100})."""
    model, ckpt, cfg = load_base(base_path, lora or {})
    if cfg.lora.epochs == 0 and cfg.lora.max_steps == 0:
        raise UserError(f"--epochs 0 and no --max-steps: nothing to train; {out} was not written")
    if isinstance(data, str):
        data = load_finetune_data(data, cfg.model)
    # counted as a whole training run (a bound: the frozen weights need no optimizer state)
    check_memory(cfg.model, cfg.lora.batch_size, device, training=True, held=data.bytes_on(device))
    if full:
        log(f"full fine-tune: all {sum(p.numel() for p in model.parameters()):,} parameters train")
    else:
        add_adapters(model, cfg.lora, log)
    model.to(device)
    freeze_norm_statistics(model)
    recipe = finetune_recipe(cfg, seed, len(epoch_batches(len(data), cfg.lora.batch_size, seed, 0)))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=recipe.lr)
    state = TrainState(model, optimizer, make_lr_schedule(optimizer, recipe, 0), None,
                       torch.Generator(device="cpu").manual_seed(seed))
    run = Run(dataclasses.replace(cfg, train=recipe), None, None, torch.device(device))
    try:
        fit(run, state, data, make_objective(cfg.diffusion, device), desc="lora epoch")
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
    lora_cfg = cfg.lora
    saved = checkpoint.lora_file(cfg, lora_state_dict(model), lora_cfg.r, lora_cfg.alpha,
                                 lora_cfg.targets, checkpoint.base_fingerprint(base_ckpt), steps)
    checkpoint.save(saved, out)
    log(f"saved {out} ({len(saved['lora'])} tensors, {steps} steps)")
    return saved
