"""The command-line programs: each reads its flags and calls the package. pyproject.toml
declares them as commands (diffusion101-train, -finetune, -sample, -evaluate, -export,
-convert, -make-style-data, -make-shapes, -train-classifier, -posthoc-ema, -distill);
scripts/*.py run the same functions.

Each function takes argv (None: sys.argv) and raises UserError for bad input; the entry points
(entry.py) run them under cli.run_cli, which turns that into one line on stderr and exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from . import checkpoint, evaluate as evaluation, web
from .classifier import CLASSIFIER_PATH, train_classifier
from .cli import (Parser, add_common, add_config_flags, add_sampler_flags, build_config,
                  check_number, check_outputs, check_seed, input_path, output_file,
                  parse_classes, parse_lora_specs, add_field_flags, field_values)
from .config import SampleConfig, TrainConfig, UserError
from .presets import PRESETS
from .dataset import training_data, write_shapes, write_style_data
from .distill import Recipe, distill as distill_run, pairs_path
from .files import atomic_write
from .generate import (PROGRESS_FIGURE, Outputs, generate, load_for_sampling, load_guide,
                       resolve_sampler)
from .lora_finetune import finetune
from .model_files import convert_pickled, default_checkpoint, export_for_sampling
from .onnx_export import ONNX_SUFFIX
from .posthoc_ema import SNAPSHOT_PREFIX, export_rebuilt, snapshot_folder
from .classes import class_names
from .guidance import is_guided
from .speed import Speed, resolve_device
from .train_run import train as train_run


# What each kind of file output may be named: its suffix says its format.
MODEL_SUFFIXES = (".pt", checkpoint.SAFETENSORS)
# A checkpoint that can resume keeps the optimizer and RNG states: torch's format only.
TRAINING_OUT = output_file("a training checkpoint (it keeps the optimizer and RNG states; "
                           "export it as .safetensors afterwards)", ".pt")


# The training fields that have a flag of their own (any field: --set train.FIELD=VALUE)
TRAIN_SHORTCUTS = ("epochs", "max_steps", "batch_size", "lr", "save_every", "data",
                   "eval_every_steps")


def train(argv=None) -> None:
    """Train a class-conditioned diffusion model.  diffusion101-train --preset cpu"""
    p = Parser(description=train.__doc__)
    p.add_argument("--preset", default=None,
                   help=f"{', '.join(PRESETS)} (default: reference; with --resume, the "
                        f"checkpoint's own)")
    add_field_flags(p, TrainConfig, TRAIN_SHORTCUTS)
    p.add_argument("--out", default="model.pt", type=TRAINING_OUT,
                   help="checkpoint path (default: model.pt)")
    p.add_argument("--logdir", default=None, type=input_path, help="TensorBoard folder (default: runs/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    add_common(p)
    add_config_flags(p)
    a = p.parse_args(argv)
    check_seed(a.seed)
    base = preset = None
    if a.resume and a.preset is None:  # continue with the run's own configuration
        base, preset = checkpoint.saved_run_config(a.out)
        if preset == "student":  # its data are its teacher's pairs, not MNIST
            raise UserError(f"{a.out} is a distilled student: continue it with "
                            f"diffusion101-distill --resume --out {a.out}")
    preset = preset or a.preset or "reference"
    shortcuts = {f"train.{k}": v for k, v in field_values(a, TrainConfig, TRAIN_SHORTCUTS).items()}
    cfg = build_config(preset, a.set, {**shortcuts, "train.seed": a.seed}, base=base)
    if cfg.sample.guidance_rule == "auto" and is_guided(cfg.sample):
        raise UserError("sample.guidance_rule=auto: training draws its grids and evaluations "
                        "without a guide network; train with cfg or apg, and sample with "
                        "--guidance-rule auto --guide CKPT")
    device = resolve_device(a.device)
    Speed.for_device(cfg.train, device)  # a speed setting this device cannot take: before any file
    data = training_data(cfg)  # a folder's classes set the model's labels: before any file
    logdir = a.logdir or f"runs/{preset}"
    snapshots = snapshot_folder(a.out) if cfg.train.snapshot_every else None
    check_outputs({"--out": a.out}, inputs={"--data": data_path(cfg.train.data)},
                  folders={"--logdir": logdir, "the snapshot folder": snapshots},
                  lock=os.environ.get("RANK", "0") == "0")  # under torchrun, rank 0 alone writes
    if snapshots and not a.resume and list(snapshots.glob(f"{SNAPSHOT_PREFIX}*.pt")):
        raise UserError(f"{snapshots} holds the snapshots of an earlier run, which a new one "
                        f"would mix with its own: move the folder away, or --resume that run")
    train_run(cfg, preset, a.out, logdir, device, resume=a.resume, data=data)


def finetune_lora(argv=None) -> None:
    """Fine-tune LoRA adapters on the cross-attention Q/K/V of a trained model; save only them."""
    p = Parser(description=finetune_lora.__doc__)
    p.add_argument("--base", default="model.pt", type=input_path,
                   help="the trained model (default: model.pt)")
    p.add_argument("--out", default="lora.pt", type=output_file("an adapter", *MODEL_SUFFIXES),
                   help="adapter path (default: lora.pt; .safetensors writes that format)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--r", type=int, help="LoRA rank (default: the checkpoint's config, 8)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default: the checkpoint's config, 1)")
    p.add_argument("--lr", type=float, help="learning rate (default: the checkpoint's lora.lr)")
    p.add_argument("--data", default="mnist", type=input_path,
                   help="'mnist', or a folder of sub-folders named after the base's classes "
                        "(0-9 for an MNIST base; any image size or mode)")
    p.add_argument("--targets", default=None,
                   help="comma-separated Linear layer names to adapt (default: w_q,w_k,w_v); "
                        "e.g. w_q,w_k,w_v,z_linear,feedforward.0,feedforward.2,time_emb_linear")
    p.add_argument("--full", action="store_true",
                   help="fine-tune every weight instead (for comparison); --out is then a model")
    add_common(p)
    a = p.parse_args(argv)
    check_seed(a.seed)
    device = resolve_device(a.device)
    check_outputs({"--out": a.out}, inputs={"--base": a.base, "--data": data_path(a.data)})
    targets = [t for t in a.targets.split(",") if t] if a.targets else None
    finetune(a.base, a.out, device, lora={"r": a.r, "alpha": a.alpha, "epochs": a.epochs,
                                          "max_steps": a.max_steps, "lr": a.lr, "targets": targets},
             seed=a.seed or 0, data=a.data, full=a.full)


def sample(argv=None) -> None:
    """Generate digits 0-9 from a checkpoint; save a grid and the denoising progression beside it."""
    p = Parser(description=sample.__doc__)
    p.add_argument("--ckpt", default=None, type=input_path,
                   help="model checkpoint, .pt or .safetensors (default: model.pt if it "
                   "exists, else the checkpoint shipped with the package)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="a LoRA adapter with its strength (default 1); repeat to stack several")
    p.add_argument("--merge", action=argparse.BooleanOptionalAction, default=True,
                   help="fuse adapters into the weights (default) or add them in the forward "
                        "pass (--no-merge)")
    p.add_argument("--out", default="imgs/digits.png", type=output_file("the grid", ".png"),
                   help="grid PNG; the progression figure "
                   "goes beside it as <name>_progress.png")
    p.add_argument("--classes", "--digits", dest="classes", default=None,
                   help="classes to draw, by label or name: 3,7 or circle,square (default: all)")
    p.add_argument("--n-per-class", "--n-per-digit", dest="n_per_class", type=int, default=1)
    p.add_argument("--npz", default=None, type=output_file("--npz", ".npz"),
                   help="also write images (uint8 N,H,W; N,H,W,3 in RGB) and labels here")
    p.add_argument("--gif", default=None, type=output_file("--gif", ".gif"),
                   help="also write the first row's walk from noise to digits as an animated "
                        "GIF here")
    add_sampler_flags(p)
    add_common(p)
    a = p.parse_args(argv)
    check_seed(a.seed)
    check_number("--n-per-class", a.n_per_class, 1, 10000, integer=True)
    device = resolve_device(a.device)
    loras = parse_lora_specs(a.lora)
    ckpt = default_checkpoint(a.ckpt, adapters=bool(loras))
    outputs = Outputs(Path(a.out), a.npz and Path(a.npz), a.gif and Path(a.gif))
    check_outputs(outputs.by_flag(), inputs={"--ckpt": ckpt, "--guide": a.guide,
                                             **{f"--lora {p}": p for p, _ in loras}},
                  derived=[PROGRESS_FIGURE])
    model = load_for_sampling(ckpt, device, loras, False if a.no_ema else None, a.merge,
                              cuda_graph=a.cuda_graph)
    classes = parse_classes(a.classes, class_names(model.config.model))
    sample_cfg = resolve_sampler(model.config, **field_values(a, SampleConfig))
    guide = load_guide(sample_cfg, model)
    print(f"model: {ckpt}" + "".join(f" + {p} x{s:g}" for p, s in loras)
          + (" (merged)" if loras and a.merge else ""))
    generate(model, sample_cfg, classes, a.n_per_class, a.seed or 0, outputs, guide=guide)


def evaluate(argv=None) -> None:
    """Score a checkpoint (or an npz of samples): conditional accuracy and FID in the shipped
    MNIST classifier's feature space, with the real-data floor beside it.

      diffusion101-evaluate --ckpt model.pt --n 10000 --json results.json
      diffusion101-evaluate --npz samples.npz
    """
    p = Parser(description=evaluate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", default=None, type=input_path,
                     help="model checkpoint (default: model.pt, else the shipped one)")
    src.add_argument("--npz", default=None, type=input_path,
                     help="score these samples instead of generating")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="LoRA adapter(s) to merge into the model first")
    p.add_argument("--n", type=int, default=10000, help="digits to generate, in the test set's digit proportions")
    p.add_argument("--batch-size", type=int, default=0,
                   help="digits sampled at once (default: 100 on CPU, 1000 on CUDA)")
    add_sampler_flags(p)
    p.add_argument("--json", default=None, type=output_file("--json", ".json"),
                   help="also write the numbers here")
    add_common(p)
    a = p.parse_args(argv)
    check_seed(a.seed)
    check_number("--n", a.n, 10, 1_000_000, integer=True)
    check_number("--batch-size", a.batch_size, 0, 100_000, integer=True)
    loras = parse_lora_specs(a.lora)
    ckpt = None if a.npz else default_checkpoint(a.ckpt, adapters=bool(loras))
    check_outputs({"--json": a.json}, inputs={"--ckpt": ckpt, "--npz": a.npz,
                                              **{f"--lora {p}": p for p, _ in loras}})
    if a.npz:
        metrics = evaluation.evaluate_npz(a.npz)
    else:
        model = load_for_sampling(ckpt, resolve_device(a.device), loras,
                                  False if a.no_ema else None, cuda_graph=a.cuda_graph)
        sample_cfg = resolve_sampler(model.config, **field_values(a, SampleConfig))
        metrics = evaluation.evaluate_model(model.net, model.config, a.n, model.device,
                                            a.seed or 0, sample_cfg, a.batch_size,
                                            load_guide(sample_cfg, model))
        metrics["ckpt"], metrics["lora"] = str(ckpt), a.lora  # (the shipped one is a Path)
    print(evaluation.format_report(metrics))
    if a.json:
        text = json.dumps(metrics, indent=2).encode()
        atomic_write(a.json, lambda f: f.write(text))


def export(argv=None) -> None:
    """Write a small sampling-only copy of a checkpoint (EMA weights, config; no optimizer),
    or its network as an ONNX graph (needs the [onnx] extra).

      diffusion101-export model.pt shipped.safetensors --set sample.guidance=3
      diffusion101-export model.pt model.onnx
    """
    p = Parser(description=export.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=input_path)
    p.add_argument("dst", type=output_file("a model file", *MODEL_SUFFIXES, ONNX_SUFFIX),
                   help="a .pt, a .safetensors (portable: the config as JSON in its metadata), "
                        "or an .onnx (the network's forward, for onnxruntime)")
    p.add_argument("--set", action="append", default=[], metavar="sample.FIELD=VALUE",
                   help="sampler defaults to carry, e.g. --set sample.guidance=3")
    a = p.parse_args(argv)
    check_outputs({"dst": a.dst}, inputs={"src": a.src})
    export_for_sampling(a.src, a.dst, a.set)


def convert(argv=None) -> None:
    """Convert a pickled whole-model file (torch.save(model), what the original reference code
    saved) into a Diffusion-101 checkpoint of tensors and plain values.

    Loading a pickle runs whatever code it names: only do this for a file you trust.
      diffusion101-convert --trust old_model.pt model.pt [--preset reference]
    """
    p = Parser(description=convert.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old", type=input_path)
    p.add_argument("new", type=output_file("a model file", *MODEL_SUFFIXES))
    p.add_argument("--preset", default="reference", help="the architecture the old file holds")
    p.add_argument("--trust", action="store_true", help="required: I trust this file's code")
    a = p.parse_args(argv)
    check_outputs({"new": a.new}, inputs={"old": a.old})
    convert_pickled(a.old, a.new, a.preset, trusted=a.trust)


def folder_maker(doc: str, n_default: int) -> Parser:
    """The flags of a command that writes a new image folder: --out, --n, --seed."""
    p = Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=input_path, help="folder to create (must not exist)")
    p.add_argument("--n", type=int, default=n_default, help="how many images to write")
    p.add_argument("--seed", type=int, default=0)
    return p


def new_folder(a, n_max: int) -> Path:
    """The folder --out names, refused if it exists or its parent cannot be written."""
    out = Path(a.out)
    if out.exists() or out.is_symlink():  # (a link to nothing: the rename would fail on it)
        raise UserError(f"{out} exists{' (a link)' if out.is_symlink() else ''}; choose a new "
                        f"folder")
    check_number("--n", a.n, 10, n_max, integer=True)
    check_seed(a.seed)
    check_outputs({}, folders={"--out's parent": out.parent if str(out.parent) else Path(".")})
    return out


def make_style_data(argv=None) -> None:
    """Write the built-in LoRA style target, bold MNIST (strokes dilated by a 3x3 max filter),
    as a torchvision ImageFolder (DIR/0 .. DIR/9), the same kind of folder a user brings.

      diffusion101-make-style-data --out data/bold --n 6000
    """
    a = folder_maker(make_style_data.__doc__, 6000).parse_args(argv)
    write_style_data(new_folder(a, 60000), a.n, a.seed)


def make_shapes(argv=None) -> None:
    """Write a toy labelled set that is not MNIST: RGB pictures of coloured shapes (circle,
    cross, square, triangle) at random positions and sizes, one sub-folder per shape, to train
    the base model on (train --data DIR --set model.in_channels=3).

      diffusion101-make-shapes --out data/shapes --n 4000
    """
    a = folder_maker(make_shapes.__doc__, 4000).parse_args(argv)
    write_shapes(new_folder(a, 1_000_000), a.n, seed=a.seed)


def train_evaluation_classifier(argv=None) -> None:
    """Train the evaluation classifier on MNIST's training set; store it with the test-set
    feature statistics and real-data FID floors in diffusion101/weights/classifier.pt."""
    p = Parser(description=train_evaluation_classifier.__doc__)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(CLASSIFIER_PATH),
                   type=output_file("the classifier", ".pt"))
    a = p.parse_args(argv)
    check_number("--epochs", a.epochs, 1, 1000, integer=True)
    check_number("--batch-size", a.batch_size, 1, 100_000, integer=True)
    check_number("--lr", a.lr, 1e-8, 10.0)
    check_seed(a.seed)
    check_outputs({"--out": a.out})
    train_classifier(a.epochs, a.batch_size, a.lr, a.seed, a.out)


def data_path(spec: str):
    """The folder a --data (or train.data) names, for the path checks; None for MNIST."""
    return None if spec == "mnist" else spec


def posthoc_ema(argv=None) -> None:
    """Rebuild the EMA of any decay from a run's weight snapshots (train.snapshot_every), as a
    sampling-only model file: the averaging length chosen after training (post-hoc EMA).

      diffusion101-posthoc-ema model.snapshots ema.pt --decay 0.999
      diffusion101-posthoc-ema model.snapshots ema.pt --gamma 17
      diffusion101-posthoc-ema model.snapshots guide.pt --gamma 17 --until 600   # an earlier EMA
    """
    p = Parser(description=posthoc_ema.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("snapshots", type=input_path, help="the run's snapshot folder (<out>.snapshots)")
    p.add_argument("out", type=output_file("a model file", *MODEL_SUFFIXES),
                   help="the model file to write (.pt or .safetensors)")
    p.add_argument("--decay", type=float, default=None,
                   help="the EMA decay, in [0, 1), with training's warm-up")
    p.add_argument("--gamma", type=float, default=None,
                   help="or a power-function EMA (EDM2) of this exponent, e.g. 17 (sigma_rel 0.05)")
    p.add_argument("--until", type=int, default=None,
                   help="average only the snapshots up to this step (the EMA the run had then, "
                        "e.g. a guide for --guidance-rule auto)")
    a = p.parse_args(argv)
    if (a.decay is None) == (a.gamma is None):
        raise UserError("give one of --decay and --gamma")
    check_number("--decay", a.decay, 0.0, 0.999999)
    check_number("--gamma", a.gamma, 0.0, 1e6)
    check_number("--until", a.until, 1, 10 ** 12, integer=True)
    check_outputs({"out": a.out}, inputs={"snapshots": a.snapshots})
    export_rebuilt(a.snapshots, a.decay or 0.0, a.out, gamma=a.gamma, until=a.until)


def distill_student(argv=None) -> None:
    """Distill a teacher into a student that samples in a few steps, one network call each
    (rectified-flow distillation with the teacher's guidance built in; distill.py).

      diffusion101-distill --teacher model.pt --out student.pt            # 4 steps
      diffusion101-distill --teacher model.pt --out student.pt --resume   # continue it
      diffusion101-sample --ckpt student.pt                                # its own 4 steps
    """
    p = Parser(description=distill_student.__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="model.pt", type=input_path,
                   help="the teacher: a model checkpoint, .pt or .safetensors (default: model.pt)")
    p.add_argument("--out", default="student.pt", type=TRAINING_OUT,
                   help="the student checkpoint (default: student.pt); the teacher's pairs are "
                        "kept beside it in <out>.pairs.pt")
    # Defaults None, so that a resumed student can tell a flag given from one left out
    # (distill.resumed_student honours or refuses each).
    defaults = Recipe()
    p.add_argument("--steps", type=int, default=None,
                   help=f"the student's steps (default {defaults.steps}; it also walks in any divisor)")
    p.add_argument("--pairs", type=int, default=None,
                   help=f"noise -> image pairs the teacher makes (default {defaults.pairs})")
    p.add_argument("--max-steps", type=int, default=None,
                   help=f"the student's optimizer steps (default {defaults.max_steps}; with "
                        f"--resume, train it to this many)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"default {defaults.batch_size}")
    p.add_argument("--lr", type=float, default=None, help=f"default {defaults.lr:g}")
    p.add_argument("--teacher-set", action="append", default=[], metavar="sample.FIELD=VALUE",
                   help="change the teacher's walk (its sampler, steps, guidance: the pairs' "
                        "quality), e.g. sample.steps=16; repeatable")
    p.add_argument("--logdir", default=None, type=input_path,
                   help="TensorBoard folder (default: runs/distill_<out's name>)")
    p.add_argument("--resume", action="store_true", help="continue the student saved in --out")
    add_common(p)
    a = p.parse_args(argv)
    check_seed(a.seed)
    given = {name: getattr(a, name) for name in ("steps", "pairs", "max_steps", "batch_size", "lr")
             if getattr(a, name) is not None}
    if a.seed is not None:
        given["seed"] = a.seed
    recipe = Recipe(**given)
    recipe.given = frozenset(given)
    recipe.check()
    device = resolve_device(a.device)
    check_outputs({"--out": a.out, "the pairs file": str(pairs_path(a.out))},
                  inputs={"--teacher": a.teacher}, folders={"--logdir": a.logdir},
                  derived=["the pairs file"])
    distill_run(a.teacher, a.out, device, recipe, a.teacher_set, a.resume, a.logdir)


def demo(argv=None) -> None:
    """Build the demo page (the shipped student and flow model in the browser, with
    onnxruntime-web) into a folder, and serve it on 127.0.0.1 until Ctrl-C.

      diffusion101-demo                 # builds demo/ the first time, then serves it
      diffusion101-demo --build-only    # a folder for any static host (GitHub Pages)
    """
    p = Parser(description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="demo", type=input_path,
                   help="the page's folder (default: demo); built when it holds no page yet")
    p.add_argument("--port", type=int, default=8101, help="0: any free port (default: 8101)")
    p.add_argument("--rebuild", action="store_true", help="build the page again first")
    p.add_argument("--build-only", action="store_true", help="build the page, do not serve it")
    a = p.parse_args(argv)
    check_number("--port", a.port, 0, 65535, integer=True)
    folder = Path(a.dir)
    if a.rebuild or a.build_only or not (folder / web.MARK).is_file():
        check_outputs({}, folders={"--dir": folder}, lock=False)
        web.build_page(folder)
    if not a.build_only:
        web.serve(folder, a.port)
