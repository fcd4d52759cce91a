"""The sampling job: a checkpoint (with LoRA adapters) loaded for sampling, the sampler options
resolved against the checkpoint's own, and the files written: the grid PNG, the progression
figure beside it, the npz of samples and the GIF of the walk (through images.py)."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import checkpoint
from .config import Config, SampleConfig, UserError
from .denoise import (Guide, check_config, cpu_generator, finite_samples, grid_labels, make_sampler,
                      sample)
from .files import same_file
from .images import progress_path, save_gif, save_grid, save_npz, save_progression
from .lora import apply_lora_file, merge_lora
from .model_files import load_model
from .classes import class_names
from .guidance import interval_text
from .speed import GraphedNetwork

PROGRESS_FRAMES = 20  # columns of the progression figure: x_t from noise to the result


@dataclass
class Outputs:
    """Where the sampling job writes: the grid PNG, with its progression figure beside it
    (images.progress_path), and when asked the npz of samples and the GIF of the walk."""
    grid: Path
    npz: Path | None = None
    gif: Path | None = None

    def by_flag(self) -> dict:
        """Each output under its command-line flag, for cli.check_outputs."""
        return {"--out": self.grid, PROGRESS_FIGURE: progress_path(self.grid),
                "--npz": self.npz, "--gif": self.gif}


PROGRESS_FIGURE = "--out's progress figure"  # an output whose name the command derives


@dataclass
class Pipeline:
    """A checkpoint ready to sample: the network (in eval mode, on `device`) and the config it
    came with, whose `sample` section holds the sampler defaults. (Not itself a network:
    diffusers' name for this pairing.)"""
    net: nn.Module
    config: Config
    device: torch.device


def load_for_sampling(ckpt_path, device, loras=(), use_ema=None, merge=True, log=print,
                      cuda_graph: bool = False) -> Pipeline:
    """The model to sample from: EMA weights when the checkpoint has them (unless told not
    to), with adapters [(path, strength), ...] added, merged into the weights or applied in
    the forward pass; with cuda_graph, its forward replayed as a CUDA graph
    (speed.GraphedNetwork)."""
    net, ckpt, cfg = load_model(ckpt_path, device="cpu")
    use_ema = cfg.sample.use_ema if use_ema is None else use_ema
    if use_ema and "ema" in ckpt:
        checkpoint.load_state(net, ckpt["ema"], f"{ckpt_path} (EMA weights)")
    if loras and not use_ema and "ema" in ckpt:
        log("note: the adapters were trained on the EMA weights; sampling without them")
    for i, (path, _) in enumerate(loras):
        for earlier, _ in loras[:i]:
            if same_file(path, earlier):
                raise UserError(f"adapter {path} is also {earlier}: one file given twice would "
                                f"apply twice; give it once, with the summed strength")
    base_fp = checkpoint.base_fingerprint(ckpt) if loras else None
    for i, (path, strength) in enumerate(loras):
        adapter = checkpoint.load_lora_file(path)
        apply_lora_file(net, adapter, base_fp, str(path), name=f"adapter{i}", strength=strength)
    if loras and merge:
        merge_lora(net)  # zero overhead at inference: W += (A @ B)^T * alpha / r * strength
    device = torch.device(device)
    net = net.to(device).eval()  # eval: BatchNorm's running statistics
    return Pipeline(GraphedNetwork(net) if cuda_graph else net, cfg, device)


def load_guide(sample_cfg: SampleConfig, model: Pipeline) -> Guide | None:
    """The guide network that sample_cfg's rule needs (autoguidance), loaded like the model
    (EMA weights when its file has them) onto the model's device; None for the other rules. A
    guide must draw what the model draws at the same noise levels: the same image size,
    channels, classes and noise schedule (its prediction, eps or v, may differ)."""
    if sample_cfg.guidance_rule != "auto":
        return None
    guide = load_for_sampling(sample_cfg.guide, model.device, log=lambda *a: None)
    mine, its = model.config, guide.config
    for what, a, b in (("image size", mine.model.img_size, its.model.img_size),
                       ("channels", mine.model.in_channels, its.model.in_channels),
                       ("classes", class_names(mine.model), class_names(its.model))):
        if a != b:
            raise UserError(f"guide {sample_cfg.guide} has another {what} ({b}) than the model "
                            f"({a}); a guide must draw the same images")
    schedule = ("objective", "timesteps", "schedule", "beta_start", "beta_end")
    if any(getattr(mine.diffusion, k) != getattr(its.diffusion, k) for k in schedule):
        raise UserError(f"guide {sample_cfg.guide} was trained on another noise schedule "
                        f"({', '.join(f'{k}={getattr(its.diffusion, k)}' for k in schedule)}); "
                        f"its x_t would mean other noise levels")
    return Guide(guide.net, its.diffusion.prediction)


def resolve_sampler(cfg: Config, **options) -> SampleConfig:
    """The SampleConfig to sample with: the checkpoint's own (cfg.sample), with the options
    given (any SampleConfig field; None: keep). A sampler other than the checkpoint's gets all
    its steps (DDPM) or 25 unless steps are given. A bad option is one UserError."""
    chosen = {k: v for k, v in options.items() if v is not None}
    sampler = chosen.get("sampler", cfg.sample.sampler)
    if "steps" not in chosen and sampler != cfg.sample.sampler:
        chosen["steps"] = cfg.diffusion.timesteps if sampler == "ddpm" else 25
    if "guidance_interval" in chosen:
        chosen["guidance_interval"] = tuple(chosen["guidance_interval"])
    known = {f.name for f in dataclasses.fields(SampleConfig)}
    unknown = sorted(set(chosen) - known)
    if unknown:
        raise UserError(f"unknown sampler option '{unknown[0]}' (known: {', '.join(sorted(known))})")
    result = dataclasses.replace(cfg.sample, **chosen)
    check_config(dataclasses.replace(cfg, sample=result))  # its rules, and a walk it can take
    return result


def generate(model: Pipeline, sample_cfg: SampleConfig, classes: list, n_per_class: int, seed: int,
             outputs: Outputs, log=print, guide: Guide | None = None) -> torch.Tensor:
    """Sample n_per_class images of each of `classes` (labels) and write what `outputs` names:
    the grid (a column per class, a row per repetition), the npz of samples, and the walk of the first
    row from noise to the result, as the progression figure and as the GIF. Returns the
    images, (N, C, S, S) in about [-1, 1]."""
    sampler = make_sampler(sample_cfg, model.config.diffusion, model.device)
    rule = "" if sample_cfg.guidance_rule == "cfg" else f" ({sample_cfg.guidance_rule})"
    log(f"sampling {len(classes) * n_per_class} images: {sample_cfg.sampler}, {sample_cfg.steps} "
        f"steps, guidance {sample_cfg.guidance}{rule}"
        f"{interval_text(sample_cfg.guidance_interval)} on {model.device}")
    start = time.perf_counter()
    labels = grid_labels(classes, n_per_class, model.device)
    images, frames = sample(model.net, sampler, labels, sample_cfg, cpu_generator(seed),
                            PROGRESS_FRAMES, guide)
    finite_samples(images)  # before any file is written
    log(f"sampled in {time.perf_counter() - start:.2f} s")
    paths = {flag: Path(p) for flag, p in outputs.by_flag().items() if p is not None}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    names = [class_names(model.config.model)[c] for c in classes]
    # MNIST's classes need no caption; a folder's classes are named above their column
    save_grid(images, outputs.grid, nrow=len(classes),
              captions=names if model.config.model.class_names else None)
    save_progression(frames[:len(classes)], names, progress_path(outputs.grid))
    if outputs.npz is not None:
        save_npz(images, classes * n_per_class, outputs.npz)
    if outputs.gif is not None:
        save_gif(frames[:len(classes)], outputs.gif, nrow=len(classes))
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    return images
