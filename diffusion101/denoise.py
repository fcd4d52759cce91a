"""The reverse process: start from noise, predict, step, repeat, with classifier-free guidance;
and the sampling job that loads a checkpoint and writes what came out (through images.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import checkpoint, models
from .config import EVERY_STEP


def guided(model, x, t, labels, guidance: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): out_u + w (out_c - out_u), with the
    conditional and the unconditional (null-label) passes batched into one forward."""
    null = torch.full_like(labels, model.null_label)
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
    cond, uncond = both.chunk(2)
    return uncond + guidance * (cond - uncond)


@torch.inference_mode()
def sample(model, scheduler, labels: torch.Tensor, img_size: int, in_channels: int = 1,
           generator: torch.Generator | None = None, n_frames: int = 0, guidance: float = 1.0,
           guidance_interval=EVERY_STEP):
    """Generate one image per label: predict, step, repeat. Returns (images, frames).

    images: (N, C, S, S) in about [-1, 1]. frames: (N, n_frames, C, S, S), x_t at n_frames
    evenly spaced points of the walk (the last is the final image), or None when n_frames is 0.
    The model must already be in eval mode; guidance 1 is the plain conditional model.
    guidance_interval (lo, hi): guide only at the steps whose t / timesteps is in [lo, hi].
    """
    if guidance != 1.0 and getattr(model, "null_label", None) is None:
        from .config import UserError
        raise UserError("guidance needs a model trained with a null class "
                        "(model.null_class=true, train.p_uncond > 0)")
    device = labels.device
    n = labels.shape[0]
    scheduler.set_timesteps(len(scheduler.timesteps))  # resets a multistep solver's history
    gen_device = generator.device if generator is not None else device
    x = torch.randn((n, in_channels, img_size, img_size), generator=generator,
                    device=gen_device).to(device)  # x_T ~ N(0, I)
    steps = len(scheduler.timesteps)
    keep = set(np.linspace(0, steps - 1, n_frames).round().astype(int).tolist()) if n_frames else set()
    frames = []
    lo, hi = (f * scheduler.num_train_timesteps for f in guidance_interval)
    for i, t in enumerate(scheduler.timesteps.tolist()):
        t_batch = torch.full((n,), t, device=device, dtype=torch.long)
        if guidance != 1.0 and lo <= t <= hi:
            out = guided(model, x, t_batch, labels, guidance)
        else:
            out = model(x, t_batch, labels)
        x = scheduler.step(out, t, x, generator=generator)
        if i in keep:
            frames.append(x.cpu())
    return x, (torch.stack(frames, dim=1) if frames else None)


def sample_digits(model, scheduler, digits, n_per_digit: int, seed: int, device,
                  n_frames: int = 0, guidance: float = 1.0, guidance_interval=EVERY_STEP):
    """Images for `digits`, repeated n_per_digit times (row k holds repetition k of every digit)."""
    labels = torch.tensor(list(digits) * n_per_digit, dtype=torch.long, device=device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    cfg = model.cfg
    return sample(model, scheduler, labels, cfg.img_size, cfg.in_channels, generator, n_frames,
                  guidance, guidance_interval)


def parse_digits(text: str, num_classes: int = 10) -> list:
    from .config import UserError
    try:
        digits = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--digits '{text}' is not a comma-separated list of digits") from None
    bad = [d for d in digits if not 0 <= d < num_classes]
    if not digits or bad:
        raise UserError(f"--digits must list labels in 0-{num_classes - 1}, got '{text}'")
    return digits


def parse_interval(text):
    """'0.1,0.7' -> (0.1, 0.7); None stays None (the checkpoint's default)."""
    if text is None:
        return None
    from .config import UserError
    try:
        lo, hi = (float(s) for s in text.split(","))
    except ValueError:
        raise UserError(f"--guidance-interval '{text}' is not two numbers LO,HI") from None
    return lo, hi


def interval_text(interval) -> str:
    """' in t/T 0.1..0.7' for a limited guidance interval; '' when it holds every step."""
    lo, hi = interval
    return "" if (lo, hi) == EVERY_STEP else f" in t/T {lo:g}..{hi:g}"


def parse_lora_specs(specs) -> list:
    """['a.pt', 'b.pt:0.3'] -> [('a.pt', 1.0), ('b.pt', 0.3)]. A strength must be a finite
    number in [-100, 100]; a ':' stays part of the path only when that whole path exists."""
    from .config import UserError
    out = []
    for spec in specs or []:
        path, scale = spec, 1.0
        head, sep, tail = spec.rpartition(":")
        if sep and head and not Path(spec).exists():
            try:
                path, scale = head, float(tail)
            except ValueError:
                raise UserError(f"--lora {spec}: the strength after ':' must be a number, "
                                f"not '{tail}'") from None
            if not -100 <= scale <= 100:  # NaN fails this too
                raise UserError(f"--lora {spec}: the strength must be a finite number in "
                                f"[-100, 100], not {tail}")
        out.append((path, scale))
    if len(set(p for p, _ in out)) != len(out):
        raise UserError("the same --lora file was given twice")
    return out


def load_for_sampling(ckpt_path, device, loras=(), use_ema=None, merge=True, log=print):
    """The model to sample from: EMA weights when the checkpoint has them (unless told not
    to), with adapters [(path, strength), ...] added, merged into the weights or applied in
    the forward pass. Returns (model in eval mode, cfg)."""
    from .lora import apply_lora_file, merge_lora
    model, ckpt, cfg = models.load_model(ckpt_path, device="cpu")
    use_ema = cfg.sample.use_ema if use_ema is None else use_ema
    if use_ema and "ema" in ckpt:
        checkpoint.load_state(model, ckpt["ema"], f"{ckpt_path} (EMA weights)")
    if loras and not use_ema and "ema" in ckpt:
        log("note: the adapters were trained on the EMA weights; sampling without them")
    base_fp = checkpoint.base_fingerprint(ckpt) if loras else None
    for i, (path, strength) in enumerate(loras):
        adapter = checkpoint.load_lora_file(path)
        apply_lora_file(model, adapter, base_fp, str(path), name=f"adapter{i}", strength=strength)
    if loras and merge:
        merge_lora(model)  # zero overhead at inference: W += (A @ B)^T * alpha / r * strength
    return model.to(device).eval(), cfg  # eval: BatchNorm uses its running statistics


def resolve_sampler(cfg, **options):
    """The SampleConfig to sample with: the checkpoint's own (cfg.sample), with the options
    given (sampler=, steps=, guidance=, eta=, guidance_interval=, grid=; None: keep). A sampler
    other than the default gets all its steps (DDPM) or 25 unless steps are given."""
    import dataclasses

    from .config import validate
    sc = cfg.sample
    chosen = {k: v for k, v in options.items() if v is not None}
    sampler = chosen.get("sampler", sc.sampler)
    if "steps" not in chosen and sampler != sc.sampler:
        chosen["steps"] = cfg.diffusion.timesteps if sampler == "ddpm" else 25
    if "guidance_interval" in chosen:
        chosen["guidance_interval"] = tuple(chosen["guidance_interval"])
    result = dataclasses.replace(sc, **chosen)
    validate(dataclasses.replace(cfg, sample=result))  # one clear line for a bad option
    return result


def generate(ckpt_path, out, device, loras=(), seed=0, digits="0,1,2,3,4,5,6,7,8,9",
             n_per_digit=1, npz=None, n_frames=20, sample_options=None, use_ema=None, merge=True,
             log=print):
    """Load a checkpoint (and adapter), sample, and write the grid, progression figure and npz.
    sample_options (a dict for resolve_sampler) change the checkpoint's own sampler defaults."""
    import time

    from .config import UserError
    from .diffusion import sampler_for
    from .images import progress_path, save_grid, save_npz, save_progression

    if n_per_digit < 1:
        raise UserError("--n-per-digit must be at least 1")
    model, cfg = load_for_sampling(ckpt_path, "cpu", loras, use_ema, merge, log)
    digit_list = parse_digits(digits, cfg.model.num_classes)
    sc = resolve_sampler(cfg, **(sample_options or {}))
    scheduler = sampler_for(sc, cfg.diffusion, device)
    model.to(device)
    out = Path(out)
    for path in [out] + ([Path(npz)] if npz else []):
        path.parent.mkdir(parents=True, exist_ok=True)
    log(f"sampling {len(digit_list) * n_per_digit} images: {sc.sampler}, {sc.steps} steps, "
        f"guidance {sc.guidance}{interval_text(sc.guidance_interval)}, from {ckpt_path}"
        + "".join(f" + {p} x{s:g}" for p, s in loras) + (" (merged)" if loras and merge else "")
        + f" on {device}")
    start = time.perf_counter()
    images, frames = sample_digits(model, scheduler, digit_list, n_per_digit, seed, device,
                                   n_frames, sc.guidance, sc.guidance_interval)
    log(f"sampled in {time.perf_counter() - start:.2f} s")
    save_grid(images, out, nrow=len(digit_list))
    written = [str(out)]
    if frames is not None:
        progress = progress_path(out)
        save_progression(frames[:len(digit_list)], digit_list, progress)
        written.append(str(progress))
    if npz:
        save_npz(images, digit_list * n_per_digit, npz)
        written.append(str(npz))
    log("wrote " + ", ".join(written))
    return images
