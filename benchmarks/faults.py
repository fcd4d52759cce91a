"""Try every fault and bad input on a `tiny` run and print what happened, as the markdown table
in docs/RELIABILITY.md. Each row is measured now: exit code, the line on stderr, and whether
the files saved before are byte-for-byte intact.

  python benchmarks/faults.py              # every row
  python benchmarks/faults.py RANK export  # the rows whose title holds one of these words
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


# The training loop's faults are patched in from outside by tests/with_fault.py; the atomic
# writer's (disk_full, kill_before_replace) are read from DIFFUSION101_FAULT by files.fault().
LOOP_FAULTS = ("kill_after_step", "nan_at_step")


# A case's env may hold CTRL_C_AFTER (seconds): SIGINT is sent that long after the command
# starts, as a Ctrl-C in the terminal would. Script "api" runs its one argument as Python, the
# way a notebook would call the API: a clean refusal is a UserError, shown as exit 2.
CTRL_C = "CTRL_C_AFTER"
API = """import sys
import diffusion101 as d
from diffusion101.config import UserError
try:
    {code}
except UserError as e:
    print(f"UserError: {{e}}", file=sys.stderr)
    sys.exit(2)
"""


def run(script, *args, cwd, env=None):
    env = dict(env or {})
    fault, after = env.get("DIFFUSION101_FAULT", ""), env.pop(CTRL_C, None)
    if fault.startswith(LOOP_FAULTS):
        command, env = [str(ROOT / "tests" / "with_fault.py"), fault, "train"], None
    elif script == "api":
        command, args = ["-c", API.format(code=args[0])], ()
    else:
        command = [str(ROOT / "scripts" / f"{script}.py")]
    proc = subprocess.Popen([sys.executable, *command, *map(str, args)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **(env or {})},
                            # SIGINT as a terminal's child has it (a background shell ignores it)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if after is not None:
        time.sleep(float(after))
        proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate()
    lines = [ln for ln in stderr.strip().splitlines() if "it/s" not in ln and "s/it" not in ln and ln.strip()]
    return proc.returncode, (lines[-1] if lines else ""), "Traceback" in stderr


def make_bad_inputs(d: Path) -> None:
    """The image folders and files of FOLDER_CASES and FILE_CASES, beside model.pt."""
    from PIL import Image
    from safetensors.torch import save as safetensors_bytes
    run("make_shapes", "--out", "shapes", "--n", "40", cwd=d)
    run("train", "--preset", "tiny", "--data", "shapes", "--max-steps", "2", "--out", "shapes.pt",
        "--logdir", "runs", cwd=d)
    run("export_checkpoint", "model.pt", "model.safetensors", cwd=d)
    run("export_checkpoint", "model.pt", "export.pt", cwd=d)
    for name, classes in (("one", ["circle"]), ("gap", ["circle", "square"]),
                          ("broken", ["circle", "square"]), ("tab", ["circle", "a\tb"]),
                          ("unicode", ["3", "\u00b3"])):
        for c in classes:
            (d / name / c).mkdir(parents=True)
            if not (name == "gap" and c == "square"):
                Image.new("L", (8, 8)).save(d / name / c / "0.png")
    for c in ("a", "b"):
        (d / "loop" / c).mkdir(parents=True)
        Image.new("L", (8, 8)).save(d / "loop" / c / "0.png")
    (d / "loop" / "a" / "up").symlink_to("..")
    (d / "gap" / "square" / "readme.md").write_text("no image")
    (d / "broken" / "square" / "bad.png").write_bytes(b"not a png")
    (d / "empty").mkdir()
    for c in ("circle", "square"):  # a FIFO named like an image beside each image
        (d / "fifo" / c).mkdir(parents=True)
        Image.new("L", (8, 8)).save(d / "fifo" / c / "0.png")
        os.mkfifo(d / "fifo" / c / "1.png")
    os.mkfifo(d / "pipe.npz")
    os.symlink("/dev/null", d / "null.npz")
    (d / "real").mkdir()
    (d / "real" / "grid.png").write_bytes(b"a grid through a link")
    os.symlink("real/grid.png", d / "linked.png")
    lora = torch.load(d / "lora.pt", weights_only=True)  # finite weights that overflow: NaN samples
    torch.save({**lora, "lora": {k: v * 1e30 for k, v in lora["lora"].items()}}, d / "huge_lora.pt")
    torch.save({1: torch.ones(2)}, d / "intkeys.pt")
    with zipfile.ZipFile(d / "claims.npz", "w") as zf:  # a header that claims 71 TiB of images
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": "|u1", "fortran_order": False, "shape": (10 ** 7, 2800, 2800)})
        zf.writestr("images.npy", header.getvalue())
        labels = io.BytesIO()
        np.save(labels, np.zeros(10, np.int64))
        zf.writestr("labels.npy", labels.getvalue())
    for i in range(1001):
        (d / "many" / f"c{i}").mkdir(parents=True)
    data = (d / "model.safetensors").read_bytes()
    (d / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (d / "header.safetensors").write_bytes(data[:8] + b"[" + data[9:])
    ckpt = torch.load(d / "model.pt", weights_only=True)
    weights, config = ckpt["ema"] if "ema" in ckpt else ckpt["model"], json.dumps(ckpt["config"])
    meta = {"format": "diffusion101/model/1", "config": config, "epoch": "0", "step": "0",
            "step_in_epoch": "0"}
    files = {"noconfig": ({k: v for k, v in meta.items() if k != "config"}, weights),
             "version": ({**meta, "format": "diffusion101/model/0"}, weights),
             "dtype": (meta, {**weights, "output.bias": weights["output.bias"].half()}),
             "nan": (meta, {**weights, "output.bias": weights["output.bias"] * float("nan")}),
             "name": (meta, {**weights, "extra.weight": torch.ones(1)}),
             "shape": (meta, {**weights, "output.bias": torch.ones(5)})}
    for name, (metadata, tensors) in files.items():
        (d / f"{name}.safetensors").write_bytes(safetensors_bytes(tensors, metadata))
    lora = torch.load(d / "lora.pt", weights_only=True)
    (d / "foreign.safetensors").write_bytes(safetensors_bytes(lora["lora"], {
        "format": "diffusion101/lora/1", "lora_config": json.dumps(lora["lora_config"]),
        "base_fingerprint": json.dumps("0" * 64), "config": config}))
    for name, part in (("tensor", torch.zeros(3)), ("list", [1, 2]), ("text", "weights")):
        torch.save({**ckpt, "model": part}, d / f"model_is_{name}.pt")
    np.save(d / "samples.npy", np.zeros((10, 28, 28), dtype=np.uint8))
    (d / "dir").mkdir()


# Issue 25's image folders (made by make_bad_inputs): the base trains on them, LoRA reads them
FOLDER_CASES = [
    ("--data: a folder that does not exist", "train", ["--preset", "tiny", "--data", "absent", "--out", "f.pt"], None),
    ("--data: a folder with no class sub-folder", "train", ["--preset", "tiny", "--data", "empty", "--out", "f.pt"], None),
    ("--data: a single class", "train", ["--preset", "tiny", "--data", "one", "--out", "f.pt"], None),
    ("--data: a class folder with no image", "train", ["--preset", "tiny", "--data", "gap", "--out", "f.pt"], None),
    ("--data: a .png that is no image", "train", ["--preset", "tiny", "--data", "broken", "--out", "f.pt"], None),
    ("--data: 1,001 classes", "train", ["--preset", "tiny", "--data", "many", "--out", "f.pt"], None),
    ("--data: a class name with a tab", "train", ["--preset", "tiny", "--data", "tab", "--out", "f.pt"], None),
    ("--data: a folder with a link back up to itself", "train", ["--preset", "tiny", "--data", "loop", "--out", "f.pt"], None),
    ("--data: '' (an empty path)", "train", ["--preset", "tiny", "--data", "", "--out", "f.pt"], None),
    ("LoRA --data: a folder named with a Unicode digit", "lora_finetune", ["--base", "model.pt", "--data",
     "unicode", "--out", "u.pt"], None),
    ("LoRA --data: classes the base does not know", "lora_finetune", ["--base", "model.pt", "--data",
     "shapes", "--out", "u.pt"], None),
    ("--resume on a folder of other classes", "train", ["--resume", "--data", "shapes", "--out", "model.pt"], None),
    ("evaluate a model of shapes", "evaluate", ["--ckpt", "shapes.pt", "--n", "10"], None),
    ("sample a class the model does not have", "denoise", ["--ckpt", "shapes.pt", "--digits", "star",
     "--out", "grid.png"], None),
]
# Issue 25's files: safetensors, parts of the wrong type, files of the wrong kind, paths
FILE_CASES = [
    ("truncated .safetensors", "denoise", ["--ckpt", "cut.safetensors", "--out", "grid.png"], None),
    (".safetensors whose header is not JSON", "denoise", ["--ckpt", "header.safetensors", "--out", "grid.png"], None),
    (".safetensors metadata without a config", "denoise", ["--ckpt", "noconfig.safetensors", "--out", "grid.png"], None),
    (".safetensors of another format version", "denoise", ["--ckpt", "version.safetensors", "--out", "grid.png"], None),
    (".safetensors with a float16 tensor", "denoise", ["--ckpt", "dtype.safetensors", "--out", "grid.png"], None),
    (".safetensors with a NaN weight", "denoise", ["--ckpt", "nan.safetensors", "--out", "grid.png"], None),
    (".safetensors with a tensor the model lacks", "denoise", ["--ckpt", "name.safetensors", "--out", "grid.png"], None),
    (".safetensors with a tensor of another shape", "denoise", ["--ckpt", "shape.safetensors", "--out", "grid.png"], None),
    (".safetensors adapter of another base", "denoise", ["--ckpt", "model.safetensors", "--lora",
     "foreign.safetensors", "--out", "grid.png"], None),
    ("training --out .safetensors", "train", ["--preset", "tiny", "--out", "model.safetensors"], None),
    ("checkpoint whose model is a tensor", "denoise", ["--ckpt", "model_is_tensor.pt", "--out", "grid.png"], None),
    ("checkpoint whose model is a list", "denoise", ["--ckpt", "model_is_list.pt", "--out", "grid.png"], None),
    ("checkpoint whose model is a string", "denoise", ["--ckpt", "model_is_text.pt", "--out", "grid.png"], None),
    ("--resume from a sampling-only export", "train", ["--resume", "--out", "export.pt"], None),
    ("an .npy where an npz belongs", "evaluate", ["--npz", "samples.npy"], None),
    ("--out '' (an empty path)", "denoise", ["--ckpt", "model.pt", "--out", ""], None),
    ("--out dir/ (a folder)", "denoise", ["--ckpt", "model.pt", "--out", "dir/"], None),
    ("--out new/ (a folder not made yet)", "train", ["--preset", "tiny", "--out", "new/"], None),
    ("one adapter under two spellings", "denoise", ["--ckpt", "model.pt", "--lora", "lora.pt", "--lora",
     "./lora.pt:0.5", "--out", "grid.png"], None),
    ("--out: a name too long for the file system", "denoise", ["--ckpt", "model.pt", "--out",
     "n" * 250 + ".png"], None),
    ("--ckpt: a link to itself (a loop of links)", "denoise", ["--ckpt", "loop.pt", "--out", "grid.png"], None),
    ("distill: an adapter as the teacher", "distill", ["--teacher", "lora.pt", "--out", "student.pt"], None),
    ("distill: --out is the teacher", "distill", ["--teacher", "model.pt", "--out", "./model.pt"], None),
    ("distill: a teacher whose walk is random (DDPM)", "distill", ["--teacher", "model.pt", "--out",
     "student.pt"], None),
    ("--npz null.npz, a link to /dev/null (a device)", "denoise", ["--ckpt", "model.pt", "--npz", "null.npz",
     "--out", "g.png"], None),
    ("--npz /dev/null (no .npz name)", "denoise", ["--ckpt", "model.pt", "--npz", "/dev/null", "--out", "g.png"], None),
    ("--out grid.jpg (a PNG under a JPEG's name)", "denoise", ["--ckpt", "model.pt", "--out", "grid.jpg"], None),
    ("--out - (standard output)", "denoise", ["--ckpt", "model.pt", "--out", "-"], None),
    ("export onto a .txt name", "export_checkpoint", ["model.pt", "model.txt"], None),
    ("--out linked.png, a link to real/grid.png (written through)", "denoise", ["--ckpt", "model.pt",
     "--out", "linked.png"], None),
    ("--set model.img_size=1024 (MNIST held at 1024 px)", "train", ["--preset", "tiny", "--set",
     "model.img_size=1024", "--out", "big.pt"], None),
    ("evaluate with an adapter whose samples come out NaN", "evaluate", ["--ckpt", "model.pt", "--lora",
     "huge_lora.pt", "--n", "10"], None),
    ("convert a state dict keyed by numbers", "convert_checkpoint", ["--trust", "intkeys.pt", "conv.pt"], None),
    ("--npz naming a FIFO", "denoise", ["--ckpt", "model.pt", "--npz", "pipe.npz", "--out", "g.png"], None),
    ("--out newdir/. (a folder)", "denoise", ["--ckpt", "model.pt", "--out", "newdir/."], None),
    ("guidance on a model without a null class, in training", "train", ["--preset", "tiny", "--set",
     "sample.guidance=2", "--out", "g.pt"], None),
    ("--n-per-digit 10000 of the shipped student (all at once)", "denoise", ["--ckpt",
     ROOT / "diffusion101" / "weights" / "cpu_student.safetensors", "--n-per-digit", "10000",
     "--out", "grid.png"], None),
    ("an npz whose header claims 71 TiB", "evaluate", ["--npz", "claims.npz"], None),
    ("--data: a FIFO named 1.png in each class", "train", ["--preset", "tiny", "--data", "fifo",
     "--max-steps", "1", "--out", "fifo.pt", "--logdir", "runs"], None),
    ("post-hoc EMA written into its own snapshot folder", "posthoc_ema", ["snaps.snapshots",
     "snaps.snapshots/step_0000009.pt", "--decay", "0.9"], None),
    ("post-hoc EMA written to a link that names one of its snapshots", "posthoc_ema",
     ["snaps.snapshots", "snaplink.pt", "--decay", "0.9"], None),
]
# Issue 35's Ctrl-C rows (the moment is a wall-clock delay: what it hit, the line says) and the
# Python API's arguments, called as a notebook would
INTERRUPT_CASES = [
    (f"Ctrl-C {after} s after the sampling command starts", "denoise", ["--ckpt", "model.pt",
     "--out", "grid.png"], {CTRL_C: after}) for after in ("0.1", "0.4", "0.8", "1.5")
] + [
    (f"Ctrl-C {after} s after a training run starts (a save every 5 steps)", "train", ["--preset",
     "tiny", "--max-steps", "400", "--save-every", "5", "--out", "int.pt", "--logdir", "runs"],
     {CTRL_C: after}) for after in ("0.4", "3")
]
API_CASES = [(f"API: `{code}`", "api", [code], None) for code in (
    "d.load(123)", "d.load('absent.pt')", "d.load('lora.pt')", "d.load('model.pt', device='cuda')",
    "d.load('model.pt', device='tpu')", "d.load('model.pt', use_ema='no')",
    "d.load('model.pt', loras=[('lora.pt',)])", "d.load('model.pt', loras='lora.pt:2')",
    "d.load('model.pt', loras=[('lora.pt', float('nan'))])", "d.load('truncated.pt')",
    "d.sample('model.pt')", "d.sample(d.load('model.pt'), guidance_interval=0.5)",
    "d.sample(d.load('model.pt'), classes={1: 2})", "d.sample(d.load('model.pt'), classes=b'12')",
    "d.sample(d.load('model.pt'), classes=[10])", "d.sample(d.load('model.pt'), n=0)",
    "d.sample(d.load('model.pt'), n=10 ** 6)", "d.sample(d.load('model.pt'), steps=2.5)",
    "d.sample(d.load('model.pt'), guidance=2)", "d.sample(d.load('model.pt'), sampler='euler')",
    "d.sample(d.load('model.pt'), foo=1)",
)]

# Issue 46's rows (made by make_round_four_inputs): torchrun's variables, tensors that claim more
# than their file holds, a disk that fills inside torch.save, settings a run would use later or
# ignore, links the user did not name; and the ONNX export and demo page's bad inputs
TORCHRUN = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29517"}
TINY_RUN = ["--preset", "tiny", "--max-steps", "2", "--out", "r.pt", "--logdir", "runs"]
STUDENT = ROOT / "diffusion101" / "weights" / "cpu_student.safetensors"
ROUND_FOUR_CASES = [
    ("RANK=0 set by hand (no torchrun)", "train", TINY_RUN, {"RANK": "0"}),
    ("RANK=abc", "train", TINY_RUN, {**TORCHRUN, "RANK": "abc"}),
    ("WORLD_SIZE=0", "train", TINY_RUN, {**TORCHRUN, "WORLD_SIZE": "0"}),
    ("a peer that never comes (WORLD_SIZE=2, one process, a 3 s bound)", "train", TINY_RUN,
     {**TORCHRUN, "DIFFUSION101_PEER_TIMEOUT": "3"}),
    ("a model tensor of 10^12 numbers in a few KB (stride 0)", "denoise", ["--ckpt", "bomb.pt",
     "--out", "grid.png"], None),
    ("export of that file to .pt", "export_checkpoint", ["bomb.pt", "bomb_copy.pt"], None),
    ("an adapter tensor of 10^12 numbers", "denoise", ["--ckpt", "model.pt", "--lora", "bomb_lora.pt",
     "--out", "grid.png"], None),
    ("--resume of a run whose optimizer state holds 10^12 numbers", "train", ["--resume", "--out",
     "bomb_run.pt", "--max-steps", "8", "--logdir", "runs"], None),
    ("disk full 4 KB into torch.save of model.pt", "train", ["--out", "model.pt", "--resume",
     "--max-steps", "8", "--logdir", "runs"], {"DIFFUSION101_FAULT": "disk_full:4096"}),
    ("training a flow model whose grid walks 20,000 steps", "train", ["--preset", "tiny", "--set",
     "diffusion.objective=flow", "--set", "sample.sampler=euler", "--set", "sample.steps=20000",
     "--out", "f.pt"], None),
    ("training whose grid is DDPM in 7 of 100 steps", "train", ["--preset", "tiny", "--set",
     "sample.sampler=ddpm", "--set", "sample.steps=7", "--out", "f.pt"], None),
    ("export --set sample.steps=20000 of a flow model", "export_checkpoint", [STUDENT, "e.pt",
     "--set", "sample.steps=20000"], None),
    ("--shift 3 on a DDPM model", "denoise", ["--ckpt", "model.pt", "--shift", "3", "--out",
     "grid.png"], None),
    ("--eta 0.5 on a flow model", "denoise", ["--ckpt", STUDENT, "--eta", "0.5", "--out", "grid.png"], None),
    ("--shift 1e-300", "denoise", ["--ckpt", STUDENT, "--shift", "1e-300", "--out", "grid.png"], None),
    ("--guidance-rule apg at guidance 1", "denoise", ["--ckpt", STUDENT, "--guidance-rule", "apg",
     "--out", "grid.png"], None),
    ("API: `d.sample(d.load('model.pt'), shift=3)` (a DDPM model)", "api",
     ["d.sample(d.load('model.pt'), shift=3)"], None),
    ("the progress figure's derived name, a link to notes.txt", "denoise", ["--ckpt", "model.pt",
     "--out", "linked_grid.png"], None),
    ("--out a link to notes.txt (a PNG into a text file)", "denoise", ["--ckpt", "model.pt", "--out",
     "to_notes.png"], None),
    ("export to .onnx of an adapter", "export_checkpoint", ["lora.pt", "lora.onnx"], None),
    ("export to .onnx of a truncated checkpoint", "export_checkpoint", ["truncated.pt", "t.onnx"], None),
    ("demo --port 70000", "demo", ["--port", "70000"], None),
    ("demo --dir: a folder of the user's files", "demo", ["--dir", "real", "--build-only"], None),
    ("make-shapes --out: a link to nothing", "make_shapes", ["--out", "dangling", "--n", "10"], None),
    ("--data: an image over PIL's pixel limit (9,500 x 9,500)", "train", ["--preset", "tiny",
     "--data", "huge", "--out", "h.pt"], None),
]


# Issue 42: a transformer the image or its heads cannot hold, refused before any file
DIT = ["--preset", "tiny", "--set", "model.backbone=dit", "--set", "model.width=32", "--out", "dit.pt"]
DIT_CASES = [
    ("DiT: model.patch_size=3 on 16-px images", "train", [*DIT, "--set", "model.patch_size=3"], None),
    ("DiT: model.width=30 with 4 heads", "train", [*DIT, "--set", "model.width=30"], None),
    ("DiT: diffusion.prediction=x0 on a DDPM model", "train", [*DIT, "--set",
     "diffusion.prediction=x0"], None),
]


# Issue 44 and round four's mechanism 1: MeanFlow settings that cannot train, and distillation
# files checked for what they are and hold (make_distill_inputs)
ONESTEP = ["--preset", "cpu-onestep", "--set", "model.img_size=16", "--set", "model.channels=8,16",
           "--max-steps", "1", "--out", "one.pt"]
DISTILL = ["--teacher", "flow_t.pt", "--logdir", "runs"]
ONESTEP_DISTILL_CASES = [
    ("MeanFlow with BatchNorm", "train", [*ONESTEP, "--set", "model.norm=batch"], None),
    ("MeanFlow without the interval input", "train", [*ONESTEP, "--set", "model.interval_input=false"], None),
    ("diffusion.trained_guidance on a flow model", "train", ["--preset", "cpu", "--set",
     "diffusion.trained_guidance=2", "--out", "f.pt"], None),
    ("distill --resume into an ordinary training run", "distill", [*DISTILL, "--out", "flow_run.pt",
     "--resume"], None),
    ("distill --resume with --steps 8 (the student walks 2)", "distill", [*DISTILL, "--out", "st.pt",
     "--resume", "--steps", "8"], None),
    ("distill --resume with --batch-size 4", "distill", [*DISTILL, "--out", "st.pt", "--resume",
     "--batch-size", "4"], None),
    ("a pairs file whose images are 8 px (the teacher's are 16)", "distill", [*DISTILL, "--out",
     "small_px.pt", "--pairs", "32"], None),
    ("a pairs file whose labels are float", "distill", [*DISTILL, "--out", "float_y.pt", "--pairs",
     "32"], None),
    ("a pairs file whose labels reach 12", "distill", [*DISTILL, "--out", "big_y.pt", "--pairs",
     "32"], None),
    ("distill --pairs 10,000,000 of a 16-px teacher (twice 19 GiB)", "distill", [*DISTILL, "--out",
     "many.pt", "--pairs", "10000000"], None),
]


def make_distill_inputs(d: Path) -> None:
    """ONESTEP_DISTILL_CASES' files: a flow teacher, a training run of it, a student of it, and
    pairs files of that teacher whose tensors were changed."""
    flow = ["--set", "diffusion.objective=flow", "--set", "sample.sampler=euler", "--set",
            "sample.steps=2", "--set", "diffusion.clip=none"]
    run("train", "--preset", "tiny", *flow, "--max-steps", "2", "--out", "flow_t.pt", "--logdir",
        "runs", cwd=d)
    run("train", "--resume", "--out", "flow_t.pt", "--max-steps", "2", "--logdir", "runs", cwd=d)
    (d / "flow_run.pt").write_bytes((d / "flow_t.pt").read_bytes())
    run("distill", *DISTILL, "--out", "st.pt", "--pairs", "32", "--steps", "2", "--max-steps", "2",
        "--batch-size", "16", cwd=d)
    pairs = torch.load(d / "st.pt.pairs.pt", weights_only=True)
    changes = {"small_px": {"images": pairs["images"][:, :, :8, :8].clone(),
                            "noise": pairs["noise"][:, :, :8, :8].clone()},
               "float_y": {"labels": pairs["labels"].float()},
               "big_y": {"labels": pairs["labels"] + 3}}
    for name, change in changes.items():
        torch.save({**pairs, **change}, d / f"{name}.pt.pairs.pt")


def make_round_four_inputs(d: Path) -> None:
    """ROUND_FOUR_CASES' files: stride-0 tensors in a model, an adapter and a run's optimizer
    state; links to the user's notes."""
    bomb = torch.zeros(1).expand(10 ** 12)
    ckpt = torch.load(d / "model.pt", weights_only=True)
    torch.save({**ckpt, "model": {**ckpt["model"], "output.bias": bomb}}, d / "bomb.pt")
    torch.save({**ckpt, "optimizer": {"state": {0: {"exp_avg": bomb}}, "param_groups": []}},
               d / "bomb_run.pt")
    lora = torch.load(d / "lora.pt", weights_only=True)
    first = next(iter(lora["lora"]))
    torch.save({**lora, "lora": {**lora["lora"], first: bomb}}, d / "bomb_lora.pt")
    (d / "notes.txt").write_text("the user's notes")
    os.symlink("notes.txt", d / "linked_grid_progress.png")
    os.symlink("notes.txt", d / "to_notes.png")
    os.symlink("nowhere", d / "dangling")
    from PIL import Image
    for c in ("a", "b"):  # 90 M pixels: over PIL's warning limit, under its error
        (d / "huge" / c).mkdir(parents=True)
        Image.new("L", (9500, 9500) if c == "a" else (8, 8)).save(d / "huge" / c / "0.png")


def main():
    d = Path(tempfile.mkdtemp())
    run("train", "--preset", "tiny", "--max-steps", "6", "--save-every", "3", "--out", "model.pt",
        "--logdir", "runs", cwd=d)
    run("lora_finetune", "--base", "model.pt", "--out", "lora.pt", "--max-steps", "2", cwd=d)
    run("train", "--preset", "tiny", "--max-steps", "2", "--seed", "9", "--out", "other.pt",
        "--logdir", "runs", cwd=d)
    (d / "grid.png").write_bytes(b"an earlier grid")
    data = (d / "model.pt").read_bytes()
    (d / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save({"model": torch.nn.Linear(2, 2)}, d / "pickled.pt")  # a whole module, as the reference saved
    marker = d / "MARKER"
    (d / "evil.py").write_text(
        "import os, torch\nclass P:\n    def __reduce__(self):\n"
        f"        return (os.system, ('touch {marker}',))\ntorch.save({{'model': P()}}, 'evil.pt')\n")
    subprocess.run([sys.executable, "evil.py"], cwd=d, check=True)
    make_bad_inputs(d)
    make_round_four_inputs(d)
    make_distill_inputs(d)
    os.symlink("loop.pt", d / "loop.pt")
    run("train", "--preset", "tiny", "--max-steps", "4", "--set", "train.snapshot_every=2",
        "--out", "snaps.pt", "--logdir", "runs", cwd=d)
    os.symlink("snaps.snapshots/step_0000002.pt", d / "snaplink.pt")
    watched = ["model.pt", "lora.pt", "grid.png", "snaps.snapshots/step_0000002.pt", "notes.txt"]
    cases = [
        ("SIGKILL mid-epoch, then --resume", "train", ["--preset", "tiny", "--max-steps", "9",
         "--save-every", "3", "--out", "kill.pt", "--logdir", "runs"], {"DIFFUSION101_FAULT": "kill_after_step:5"}),
        ("killed between write and rename of model.pt", "train", ["--out", "model.pt", "--resume",
         "--max-steps", "8", "--logdir", "runs"], {"DIFFUSION101_FAULT": "kill_before_replace"}),
        ("disk full while saving model.pt", "train", ["--out", "model.pt", "--resume", "--max-steps", "8",
         "--logdir", "runs"], {"DIFFUSION101_FAULT": "disk_full"}),
        ("loss becomes NaN/inf", "train", ["--preset", "tiny", "--save-every", "1",
         "--max-steps", "6", "--out", "nan.pt", "--logdir", "runs"], {"DIFFUSION101_FAULT": "nan_at_step:2"}),
        ("malicious pickle as model.pt", "denoise", ["--ckpt", "evil.pt", "--out", "grid.png"], None),
        ("whole pickled nn.Module (the reference's format)", "denoise", ["--ckpt", "pickled.pt", "--out", "grid.png"], None),
        ("truncated checkpoint", "denoise", ["--ckpt", "truncated.pt", "--out", "grid.png"], None),
        ("missing checkpoint", "denoise", ["--ckpt", "absent.pt", "--out", "grid.png"], None),
        ("lora.pt given as the model", "denoise", ["--ckpt", "lora.pt", "--out", "grid.png"], None),
        ("lora.pt of another base", "denoise", ["--ckpt", "other.pt", "--lora", "lora.pt", "--out", "grid.png"], None),
        ("resume under another architecture", "train", ["--preset", "tiny", "--set", "model.channels=8,32",
         "--out", "model.pt", "--resume", "--logdir", "runs"], None),
        ("unknown preset", "train", ["--preset", "huge", "--out", "model.pt"], None),
        ("unknown config field", "train", ["--preset", "tiny", "--set", "model.layers=3", "--out", "model.pt"], None),
        ("digit outside 0-9", "denoise", ["--ckpt", "model.pt", "--digits", "3,12", "--out", "grid.png"], None),
        ("--device cuda without a GPU", "denoise", ["--ckpt", "model.pt", "--device", "cuda", "--out", "grid.png"], None),
        ("--out is the checkpoint read", "denoise", ["--ckpt", "model.pt", "--out", "model.pt"], None),
        ("export onto its own source", "export_checkpoint", ["model.pt", "./model.pt"], None),
        ("--out and --npz one file", "denoise", ["--ckpt", "model.pt", "--out", "g.png", "--npz", "g.png"], None),
        ("--logdir is a file", "train", ["--preset", "tiny", "--out", "new.pt", "--logdir", "grid.png"], None),
        ("--epochs 0 (nothing to train)", "train", ["--preset", "tiny", "--epochs", "0", "--out", "model.pt"], None),
        ("LoRA --epochs 0 onto an existing lora.pt", "lora_finetune", ["--base", "model.pt", "--out", "lora.pt",
         "--epochs", "0"], None),
        ("--guidance nan", "denoise", ["--ckpt", "model.pt", "--guidance", "nan", "--out", "grid.png"], None),
        ("--lora with strength nan", "denoise", ["--ckpt", "model.pt", "--lora", "lora.pt:nan", "--out", "grid.png"], None),
        ("--lora with strength notanumber", "denoise", ["--ckpt", "model.pt", "--lora", "lora.pt:notanumber",
         "--out", "grid.png"], None),
        ("--steps 0", "denoise", ["--ckpt", "model.pt", "--steps", "0", "--out", "grid.png"], None),
        ("--seed 2**70", "denoise", ["--ckpt", "model.pt", "--seed", str(2 ** 70), "--out", "grid.png"], None),
        ("--lr nan", "train", ["--preset", "tiny", "--lr", "nan", "--out", "model.pt"], None),
        ("model.num_classes=0", "train", ["--preset", "tiny", "--set", "model.num_classes=0", "--out", "model.pt"], None),
        ("model.in_channels=3 on MNIST", "train", ["--preset", "tiny", "--set", "model.in_channels=3", "--out", "model.pt"], None),
        *FOLDER_CASES, *FILE_CASES, *INTERRUPT_CASES, *API_CASES, *ROUND_FOUR_CASES,
        *DIT_CASES, *ONESTEP_DISTILL_CASES,
    ]
    only = sys.argv[1:]  # words: run only the rows whose title holds one of them
    cases = [c for c in cases if not only or any(w in c[0] for w in only)]
    print("| fault or bad input | exit code | what it printed (stderr, last line) | traceback | files saved before |")
    print("|---|---|---|---|---|")
    for title, script, args, env in cases:
        before = {p: (d / p).read_bytes() for p in watched}
        code, line, tb = run(script, *args, cwd=d, env=env)
        intact = all((d / p).read_bytes() == b for p, b in before.items())
        extra = ""
        if title.startswith("SIGKILL"):
            saved = torch.load(d / "kill.pt", weights_only=True)["step"]
            code2, _, _ = run("train", "--out", "kill.pt", "--resume", "--logdir", "runs", cwd=d)
            extra = f"; kill.pt kept step {saved}; --resume exit {code2}, ended at step " \
                    f"{torch.load(d / 'kill.pt', weights_only=True)['step']}"
        if title.startswith("malicious"):
            extra = f"; marker file created: {marker.exists()}"
        if title.startswith("--out linked.png"):
            extra = f"; linked.png still a link: {(d / 'linked.png').is_symlink()}, its target " \
                    f"now a PNG: {(d / 'real' / 'grid.png').read_bytes()[:4] == bytes([137, 80, 78, 71])}"
        if title.startswith("Ctrl-C") and (d / "int.pt").exists():
            extra = f"; int.pt loads at step {torch.load(d / 'int.pt', weights_only=True)['step']}"
        if title.startswith("killed between"):
            extra = f"; model.pt still loads at step {torch.load(d / 'model.pt', weights_only=True)['step']}"
        line = line.replace("|", "\\|") or "(nothing)"
        print(f"| {title} | {code} | `{line}` | {'yes' if tb else 'no'} | "
              f"{'intact' if intact else 'CHANGED'}{extra} |")


if __name__ == "__main__":
    main()
