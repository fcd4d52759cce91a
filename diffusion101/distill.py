"""Distillation: a student that draws in one to four steps what its teacher draws in eight to
twenty, with one network call a step.

The method is rectified flow's (Liu, Gong and Liu 2023, "Flow straight and fast": reflow, then
distillation):
1. Pairs. The teacher's own deterministic walk, guidance included, carries a noise z and a
   class y to an image x = T(z, y) (make_pairs).
2. The student starts as a copy of the teacher's network and learns flow matching on the
   pairs: x_t = (1 - t) x + t z and the velocity z - x, with each pair's own noise in place of
   a fresh draw. A pair's path is the straight line from z to T(z, y), so a student that knows
   its velocity lands on T(z, y) in one Euler step, or in any number of them. The teacher's
   own paths curve (many images share a noisy x_t, and its velocity is their average), which
   is why it needs many small steps.
3. Only at the times its walks visit: t in {1/k, 2/k, ..., 1} (diffusion.t_sampling="walk"),
   so a walk of k steps, and of every divisor of k, is exactly what it trained for.
Guidance is distilled in (Meng et al. 2023, with w fixed): the pairs are guided and the
student samples at w = 1, one network call a step where its teacher needs two. A DDPM teacher
works the same way (DDIM and DPM-Solver++ walk deterministically too); the student is a flow
model either way. The loop is training's own (train_run.run_training and train.fit), so the progress bar,
TensorBoard and --resume are those of training.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint
from .config import BIG, Config, DiffusionConfig, SampleConfig, TrainConfig, UserError, num
from .dataset import Batch, bytes_on
from .denoise import finite_samples, make_sampler, sample, sampling_batch
from .guidance import is_guided, needs_uncond
from .memory import check_fits
from .files import atomic_write, same_file
from .model_files import load_model
from .settings import apply_override, check_field, validate
from .train_run import new_run, run_training

PAIRS_FORMAT = "diffusion101/pairs/1"
CHUNK = 1000  # pairs made between two saves of the pairs file


@dataclass
class Recipe:
    """What a distillation is asked for (the flags of diffusion101-distill)."""
    steps: int = num(4, 1, 1024)  # the student's walk (and every divisor of it)
    pairs: int = num(10_000, 1, 10_000_000)  # noise -> image pairs made by the teacher
    max_steps: int = num(1000, 1, BIG)  # the student's optimizer steps
    batch_size: int = num(128, 1, 1_000_000)
    lr: float = num(1e-3, 0.0, 10.0, above_lo=True)
    seed: int = num(0, 0, 2**32 - 1)
    # (not a field: the names the command line set, which a resumed student honours or refuses)
    given = frozenset()

    def check(self) -> None:
        for f in dataclasses.fields(self):
            check_field("distill", f, getattr(self, f.name))


@dataclass
class Pairs:
    """The teacher's images, their labels, and the noise each was drawn from."""
    images: torch.Tensor  # (N, C, S, S) float, about [-1, 1]
    labels: torch.Tensor  # (N,) int64
    noise: torch.Tensor  # (N, C, S, S)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device) -> "Pairs":
        return Pairs(self.images.to(device), self.labels.to(device), self.noise.to(device))

    def bytes_on(self, device) -> int:
        return bytes_on(device, self.images, self.noise)

    def batch(self, idx: torch.Tensor, device="cpu") -> Batch:
        """The pairs idx, each with its noise: train.diffusion_loss noises x0 with that noise."""
        idx = idx.to(self.labels.device)
        return Batch(*(v[idx].to(device) for v in (self.images, self.labels, self.noise)))


def teacher_sampling(cfg: Config, overrides=()) -> SampleConfig:
    """The teacher's sampler settings, with `overrides` ('sample.steps=16', ...) applied; its
    walk must be deterministic, or the student would learn the mean of many images per noise."""
    cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample))
    for assignment in overrides:
        if not assignment.startswith("sample."):
            raise UserError(f"--teacher-set can only change the teacher's sampler (sample.*), "
                            f"not '{assignment}'")
        apply_override(cfg, assignment)
    validate(cfg)
    sampling = cfg.sample
    if sampling.sampler == "ddpm" or (sampling.sampler == "ddim" and sampling.eta > 0):
        raise UserError(f"the teacher's walk must be deterministic to pair each noise with one "
                        f"image; its sampler is {sampling.sampler}{' with eta > 0' * (sampling.sampler == 'ddim')}: "
                        f"pass --teacher-set sample.sampler=dpm (or ddim with eta 0)")
    if sampling.guidance_rule == "auto":
        raise UserError("distillation takes the cfg or apg guidance rule, not auto")
    return sampling


def student_config(teacher: Config, recipe: Recipe, n_pairs: int) -> Config:
    """The teacher's network, trained by flow matching at the times of a recipe.steps walk,
    sampled by Euler in that many steps without guidance (it is in the pairs)."""
    steps_per_epoch = math.ceil(n_pairs / recipe.batch_size)
    train = TrainConfig(epochs=math.ceil(recipe.max_steps / steps_per_epoch),
                        max_steps=recipe.max_steps, batch_size=recipe.batch_size, lr=recipe.lr,
                        loss="mse", optimizer="adamw", lr_schedule="cosine",
                        warmup_steps=min(100, recipe.max_steps // 10), ema_decay=0.995,
                        grad_clip=1.0, seed=recipe.seed, data=teacher.train.data)
    diffusion = DiffusionConfig(objective="flow", clip="none", t_sampling="walk",
                                walk_steps=recipe.steps, timesteps=teacher.diffusion.timesteps)
    cfg = Config(model=teacher.model, diffusion=diffusion, train=train, lora=teacher.lora,
                 sample=SampleConfig(sampler="euler", steps=recipe.steps, guidance=1.0))
    validate(cfg)
    return cfg


def read_pairs(path: Path, teacher_fp: str, sampling: dict, seed: int, m) -> dict | None:
    """The pairs file made so far for this teacher, sampling and seed (None when there is none);
    one of another teacher, sampling or seed is refused rather than replaced, and so is one
    whose tensors are not the pairs this teacher (model config m) makes: float32 images and
    noise of its shape, int64 labels of its classes, every number finite."""
    if not path.exists():
        return None
    saved = checkpoint.load(path, "pairs file")
    if saved.get("format") != PAIRS_FORMAT:
        raise UserError(f"{path} is not a pairs file of this version; move it away")
    if (saved.get("teacher"), saved.get("walk"), saved.get("seed")) != (teacher_fp, sampling, seed):
        raise UserError(f"{path} holds pairs of another teacher, sampler or seed; delete it, or "
                        f"distill into another --out")
    images, labels, noise = (saved.get(k) for k in ("images", "labels", "noise"))
    if not all(torch.is_tensor(v) for v in (images, labels, noise)):
        raise UserError(f"{path} is damaged (its images, labels or noise are missing)")
    shape = (m.in_channels, m.img_size, m.img_size)
    if (images.dtype, noise.dtype, labels.dtype) != (torch.float32, torch.float32, torch.int64) \
            or images.dim() != 4 or tuple(images.shape[1:]) != shape or noise.shape != images.shape \
            or labels.shape != images.shape[:1]:
        raise UserError(f"{path} holds images {images.dtype} {tuple(images.shape)}, noise "
                        f"{noise.dtype} {tuple(noise.shape)} and labels {labels.dtype} "
                        f"{tuple(labels.shape)}; this teacher's pairs are float32 (N, "
                        f"{', '.join(map(str, shape))}) with N int64 labels: delete the file")
    if len(labels) and (labels.min() < 0 or labels.max() >= m.num_classes):
        raise UserError(f"{path} holds labels outside 0..{m.num_classes - 1}, the teacher's "
                        f"classes: delete the file")
    if not (torch.isfinite(images).all() and torch.isfinite(noise).all()):
        raise UserError(f"{path} holds images or noise that are NaN or inf: delete the file")
    return saved


@torch.no_grad()
def make_pairs(teacher, cfg: Config, sampling: SampleConfig, n: int | None, seed: int, path: Path,
               log=print) -> Pairs:
    """n pairs (pair k of class k mod the classes), CHUNK at a time, the file at `path`
    rewritten after each: a distillation stopped here continues from the last chunk. n None:
    the pairs the file holds (a resumed student's)."""
    fp, sampling_dict = checkpoint.fingerprint(teacher.state_dict()), dataclasses.asdict(sampling)
    sampling_dict["guidance_interval"] = list(sampling_dict["guidance_interval"])
    m = teacher.cfg
    saved = read_pairs(path, fp, sampling_dict, seed, m)
    parts = {k: [saved[k]] if saved else [] for k in ("images", "labels", "noise")}
    done = len(saved["labels"]) if saved else 0
    if n is None:
        if saved is None:
            raise UserError(f"the student's pairs file {path} is gone: distill anew")
        n = done
    device, start = next(teacher.parameters()).device, time.perf_counter()
    sampler, batch = make_sampler(sampling, cfg.diffusion, device), sampling_batch(device)
    if done < n:
        # Counted before any walk: the pairs live in memory twice while the file is written
        # (the chunks and their concatenation).
        check_fits(2 * pairs_bytes(max(n, done), m), "cpu", f"{n:,} pairs",
                   "ask for fewer --pairs")
        calls = len(sampler.timesteps) * (2 if is_guided(sampling) and needs_uncond(sampling) else 1)
        log(f"pairs: {done:,} of {n:,} made; the teacher walks {sampling.sampler} {sampling.steps} "
            f"steps at guidance {sampling.guidance:g}: {(n - done) * calls:,} network calls")
    in_file = done
    with tqdm(total=n, initial=min(done, n), desc="pairs", dynamic_ncols=True) as bar:
        for first in range(done, n, CHUNK):
            size = min(CHUNK, n - first)
            labels = torch.arange(first, first + size) % m.num_classes
            noise = torch.stack([pair_noise(seed, k, m) for k in range(first, first + size)])
            images = torch.cat([sample(teacher, sampler, y.to(device), sampling, start=z)[0].cpu()
                                for y, z in zip(labels.split(batch), noise.split(batch))])
            for k, v in zip(parts, (finite_samples(images), labels, noise)):
                parts[k].append(v)
            made = first + size
            # The file is rewritten whole, so it is saved when the pairs made since the last
            # save are as many as it holds (and at the end): the bytes written stay a small
            # multiple of the file's, and a stop loses at most the last half.
            if made == n or made - in_file >= max(in_file, CHUNK):
                parts = {k: [torch.cat(v)] for k, v in parts.items()}
                whole = {k: v[0] for k, v in parts.items()}
                atomic_write(path, lambda f: torch.save({"format": PAIRS_FORMAT, "teacher": fp,
                                                         "walk": sampling_dict, "seed": seed,
                                                         **whole}, f),
                             derived=True)  # named after --out
                in_file = made
            bar.update(size)
    whole = {k: torch.cat(v)[:n] for k, v in parts.items()}
    if done < n:
        log(f"pairs: {n:,} in {(time.perf_counter() - start) / 60:.1f} min, saved in {path}")
    return Pairs(whole["images"], whole["labels"], whole["noise"])


def pairs_bytes(n: int, m) -> int:
    """The bytes of n pairs of the network m's images: image and noise in float32, a label."""
    return n * (2 * 4 * m.in_channels * m.img_size ** 2 + 8)


def pair_noise(seed: int, k: int, m) -> torch.Tensor:
    """The noise of pair k: a function of (seed, k) alone, so a file continued from any point
    holds the pairs that one made at once would."""
    g = torch.Generator().manual_seed(seed * 10_000_019 + k)
    return torch.randn((m.in_channels, m.img_size, m.img_size), generator=g)


def pairs_path(out) -> Path:
    return Path(f"{out}.pairs.pt")


def resumed_student(out: Path, teacher: Config, recipe: Recipe) -> tuple:
    """(the config, the recipe) of the student saved at `out`, to continue. The file must be a
    student (not a training run, which resuming would overwrite) of the teacher's network;
    a flag in `given` (the Recipe fields the command line set) that the student fixed when it
    started is refused if it differs, and --max-steps is honoured (a student can be trained
    longer)."""
    if not out.exists():
        raise UserError(f"nothing to resume: {out} does not exist (pairs made so far are "
                        f"kept: run the same command without --resume)")
    loaded = checkpoint.load_model_checkpoint(out)
    cfg = checkpoint.config_of(loaded)
    if loaded.get("preset") != "student" or cfg.diffusion.t_sampling != "walk":
        raise UserError(f"{out} is not a distilled student (preset '{loaded.get('preset')}'): "
                        f"distilling into it would overwrite that run; choose another --out")
    if cfg.model != teacher.model:
        raise UserError(f"{out} is a student of another network than this teacher's; resume "
                        f"with its own teacher, or choose another --out")
    given = recipe.given
    fixed = {"steps": cfg.diffusion.walk_steps, "batch_size": cfg.train.batch_size,
             "lr": cfg.train.lr, "seed": cfg.train.seed}
    for name, value in fixed.items():
        if name in given and getattr(recipe, name) != value:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} {getattr(recipe, name):g}: the student in {out} has "
                            f"{value:g}, fixed when it started; resume without {flag}, or "
                            f"distill into another --out")
    if "max_steps" in given:
        cfg.train.max_steps = recipe.max_steps  # (its epochs follow, once the pairs are read)
    return cfg, dataclasses.replace(recipe, **fixed)


def distill(teacher_path, out, device, recipe: Recipe, sampling_overrides=(), resume: bool = False,
            logdir=None, log=print) -> dict:
    """Distill the teacher at `teacher_path` into a student checkpoint at `out` (its pairs
    beside it, in <out>.pairs.pt); with resume, continue the student saved there (
    recipe.given, the fields the command line set, honoured or refused: resumed_student)."""
    out = Path(out)
    if Path(teacher_path).exists() and same_file(teacher_path, out):
        raise UserError(f"--out {out} is the teacher itself: distill into another file")
    recipe.check()
    teacher, ckpt, tcfg = load_model(teacher_path, device="cpu")
    checkpoint.load_state(teacher, checkpoint.sampling_weights(ckpt), str(teacher_path))
    sampling = teacher_sampling(tcfg, sampling_overrides)
    if resume:
        given = recipe.given
        cfg, recipe = resumed_student(out, tcfg, recipe)
    pairs = make_pairs(teacher.to(device).eval(), tcfg, sampling, None if resume else recipe.pairs,
                       recipe.seed, pairs_path(out), log)
    if not resume:
        cfg = student_config(tcfg, recipe, len(pairs))
    elif "pairs" in given and recipe.pairs != len(pairs):
        raise UserError(f"--pairs {recipe.pairs:,}: the student in {out} learns from the "
                        f"{len(pairs):,} pairs it started with; resume without --pairs")
    else:  # enough epochs for the steps asked (--max-steps honoured)
        per_epoch = math.ceil(len(pairs) / cfg.train.batch_size)
        cfg.train.epochs = max(cfg.train.epochs, math.ceil(cfg.train.max_steps / per_epoch))
    run = new_run(cfg, "student", out, device, log,
                  init={k: v.detach().cpu() for k, v in teacher.state_dict().items()})
    return run_training(run, logdir or Path("runs") / f"distill_{out.stem}", resume, pairs)
