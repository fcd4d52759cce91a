"""Everything this package needs to show on a GPU, in one call of at most 7 minutes, in stages.

  python benchmarks/gpu_check.py --out gpu_results            # on a CUDA machine: 7 min at most
  python benchmarks/gpu_check.py --out /tmp/dry --dry-run     # every stage on the CPU, ~2 min
  python benchmarks/gpu_check.py --out gpu_results --stages 3 # rerun one stage

Stages (each a separate process with a time limit it cannot overrun, the limits drawn from one
deadline; each writes what it measured into --out as soon as it has it, so a stage that fails
or runs out of time loses nothing else):
  1 tests      tests/test_cuda.py: every speed option against fp32, the one-token shortcut and
               CUDA graphs (training and sampling), determinism, kill/resume, torchrun with NCCL
  2 bench      the shipped checkpoint's 1000-step DDPM grid, eager and with the network call
               replayed as a CUDA graph (--cuda-graph); then the `reference` training step
               (batch 400) in one run: train.compile=graphs and `auto`, each with and without
               the one-token shortcut, as many rows as the stage's time allows
  3 reference  the `reference` recipe in the fastest setting stage 2 measured, for every second
               the deadline leaves after the grid and the evaluation; its 10x10 grid and
               scripts/evaluate.py on 1,000 digits (its own 1000-step DDPM, graph replayed)
  4 wide       only with a minute or more left: a wider `cpu` recipe, exported for sampling

Output (at most 8 files, as the device tool brings back): summary.json (every stage's status,
seconds and numbers), log.txt (every stage's output), shipped_grids.png, reference_grid.png,
reference_eval.json, runs_reference/ (its TensorBoard events), wide.pt.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# The whole script's seconds, and each stage's at most (None: what the deadline leaves), on one
# H200 and on the CPU for the dry run. Stage 3 trains for its limit less RESERVE (start-up,
# compiling from the cache stage 2 filled, the grid, the evaluation); stage 4 runs only when
# the deadline leaves it WIDE_MIN seconds.
TOTAL = {"gpu": 420, "dry": 200}
LIMITS = {"gpu": {1: 60, 2: 90, 3: None, 4: None}, "dry": {1: 40, 2: 50, 3: 55, 4: None}}
RESERVE = {"gpu": 130, "dry": 45}
# (What 7 minutes hold, from the last H200 run: compiling the reference network took 46-60 s,
# the 1,000-digit evaluation with its 1000-step DDPM 60 s, an epoch 6.4-7.4 s in `auto`. So
# 40 epochs fit only if the fastest setting trains an epoch in about 3.5 s: stage 3 gets what
# stages 1 and 2 leave, and says how many epochs that was.)
WIDE_MIN = {"gpu": 60, "dry": 20}
# Set from the command line (for a rerun of part of a stage): both empty means everything.
PYTEST_K = ""
STAGE_SECONDS = 0.0  # this stage's limit, set by main() in the stage's own process
BENCH_ROWS = []
NO_GRIDS = False
WIDE = ["--preset", "cpu", "--batch-size", "250", "--set", "model.channels=48,96,192",
        "--set", "diffusion.prediction=eps", "--set", "train.epochs=1000"]
# 250 divides 60,000: every batch has one shape, so torch.compile compiles once.


def log_to(out: Path, text: str) -> None:
    with open(out / "log.txt", "a") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def run(cmd, out: Path, timeout: float, env_extra=None) -> int:
    """Run a command, its output appended to log.txt; a command past its time is killed."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    log_to(out, f"$ {' '.join(map(str, cmd))}")
    with open(out / "log.txt", "a") as f:
        try:
            return subprocess.run(list(map(str, cmd)), cwd=ROOT, env=env, stdout=f,
                                  stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            f.write(f"!! killed after {timeout:.0f} s\n")
            return 124


def write_results(out: Path, stage: int, results: dict) -> None:
    """Merge one stage's numbers into summary.json (rewritten whole, atomically)."""
    path = out / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary.setdefault(f"stage{stage}", {}).update(results)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, path)


# ---- stage 1: the CUDA tests ---------------------------------------------------------------

def stage_tests(out: Path, work: Path, dry: bool) -> dict:
    report = work / "cuda_report.jsonl"
    report.unlink(missing_ok=True)
    rc = run([sys.executable, "-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider",
              "tests/test_cuda.py"] + (["-k", PYTEST_K] if PYTEST_K else []), out, timeout=STAGE_SECONDS - 5,
             env_extra={"DIFFUSION101_CUDA_REPORT": str(report)})
    lines = report.read_text().splitlines() if report.exists() else []
    return {"pytest_exit_code": rc, "measured": [json.loads(line) for line in lines]}


# ---- stage 2: throughput -------------------------------------------------------------------

def matmul_rate(device, dry: bool) -> float:
    """FLOP/s of a large bf16 matmul on random data (fp32 on a CPU): the ceiling to compare with."""
    import torch
    n, dtype = (1024, torch.float32) if dry else (8192, torch.bfloat16)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_rate(cfg, device, options: dict, data, steps: int, warmup: int, profile_to=None):
    """Images/s of train.train_step (the loop's own step, loss read back every step) after
    `warmup` steps (which include torch.compile's compilation); returns (rate, warm-up seconds)."""
    import torch

    from diffusion101.dataset import ImageData, epoch_batches
    from diffusion101.diffusion import NoiseSchedule
    from diffusion101.speed import Speed
    from diffusion101.train import train_step
    from diffusion101.train_state import build_state
    tc = cfg.train
    for name, value in options.items():
        setattr(tc, name, value)
    speed = Speed.for_device(tc, device)
    # As train() does: TF32 matmuls only with the speed options; cuDNN's convolutions use TF32
    # in both modes (PyTorch's default), so "fp32 eager" is what a plain PyTorch user gets.
    torch.backends.cuda.matmul.allow_tf32 = speed.tf32
    torch.manual_seed(0)
    state = build_state(cfg, device, speed, total_steps=warmup + steps)
    state.net = speed.network(state.model)
    if speed.data_on_device:
        data = data.to(device)
    scheduler = NoiseSchedule(cfg.diffusion, device)
    batches = epoch_batches(len(data), tc.batch_size, 0, 0)

    def run_steps(first: int, count: int) -> None:
        for i in range(first, first + count):
            train_step(state, scheduler, data.batch(batches[i], device), tc, speed)

    start = time.perf_counter()
    run_steps(0, warmup)
    sync(device)
    warm_seconds = time.perf_counter() - start
    start = time.perf_counter()
    run_steps(warmup, steps)
    sync(device)
    rate = steps * tc.batch_size / (time.perf_counter() - start)
    if profile_to is not None:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            run_steps(0, 5)
            sync(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        profile_to(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70))
    return rate, warm_seconds


def stage_bench(out: Path, work: Path, dry: bool) -> dict:
    """The grids first (cheap), then the training rows, each written as soon as measured."""
    import torch

    from bench import flop_per_image
    from diffusion101.presets import get_preset
    from diffusion101.dataset import load_mnist
    from diffusion101.unet import UNet
    device = torch.device("cpu" if dry else "cuda")
    results = {"device": "CPU (dry run)" if dry else torch.cuda.get_device_name(),
               "torch": torch.__version__}
    if not NO_GRIDS:
        results.update(shipped_grids(out, device, dry))
        write_results(out, 2, results)
    peak = matmul_rate(device, dry)
    results["matmul_peak_tflops"] = peak / 1e12
    write_results(out, 2, results)
    steps, warmup = (3, 1) if dry else (20, 10)
    preset, batch = ("tiny", 16) if dry else ("reference", 400)
    data = load_mnist(train=True, img_size=get_preset(preset).model.img_size)
    for mode, options in training_modes(dry):
        if BENCH_ROWS and f"{preset}, {mode}" not in BENCH_ROWS:
            continue
        cfg = get_preset(preset)
        cfg.train.batch_size = batch
        rate, warm = train_rate(cfg, device, dict(options), data, steps, warmup)
        flop = 3 * flop_per_image(UNet(cfg.model).to(device), cfg, device)  # fwd + bwd ~ 3 fwd
        row = {"batch": batch, "options": options, "images_per_s": rate,
               "seconds_per_60k_epoch": 60000 / rate, "train_tflops": flop * rate / 1e12,
               "share_of_matmul_peak": flop * rate / peak, "warmup_seconds": warm,
               "train_gflop_per_image": flop / 1e9}
        results[f"train {preset}, {mode}"] = row
        write_results(out, 2, results)
        log_to(out, f"train {preset}, {mode}: {json.dumps(row)}")
    return results


def training_modes(dry: bool) -> list:
    """(name, train.* settings) of the rows stage 2 times, the likely fastest first: CUDA graphs
    (torch.compile's reduce-overhead) and `auto`, each with the one-token shortcut on and off.
    (The dry run does not compile: a CPU refuses graphs, and compiling takes most of its time.)"""
    auto = {"precision": "auto", "channels_last": "auto", "fused_optimizer": "auto",
            "data_on_device": "auto"}
    graphs = "off" if dry else "graphs"
    return [("graphs, one-token on", {**auto, "compile": graphs, "one_token_shortcut": "on"}),
            ("graphs, one-token off", {**auto, "compile": graphs, "one_token_shortcut": "off"}),
            ("auto, one-token on", {**auto, "compile": "auto", "one_token_shortcut": "on"}),
            ("auto, one-token off", {**auto, "compile": "auto", "one_token_shortcut": "off"})]


def fastest_setting(out: Path, dry: bool) -> tuple:
    """(name, train.* settings) of the fastest training row stage 2 measured; without one, the
    first of training_modes()."""
    summary = out / "summary.json"
    bench = json.loads(summary.read_text()).get("stage2", {}) if summary.exists() else {}
    rows = {k: v for k, v in bench.items() if k.startswith("train ")}
    if not rows:
        return training_modes(dry)[0]
    name = max(rows, key=lambda k: rows[k]["images_per_s"])
    return name.split(", ", 1)[1], rows[name]["options"]


def shipped_grids(out: Path, device, dry: bool) -> dict:
    """The shipped checkpoint's digits 0-9 with the 1000-step DDPM, eagerly (row 1) and with
    the network call replayed as a CUDA graph (row 2), each timed after a warm-up. (The dry run
    walks a 20-step DDIM, and eagerly twice: a CPU has no CUDA graphs.)"""
    import dataclasses

    import torch

    from diffusion101.denoise import sample_classes
    from diffusion101.denoise import make_sampler
    from diffusion101.generate import load_for_sampling
    from diffusion101.images import save_grid
    from diffusion101.model_files import SHIPPED_PATH
    rows, results = [], {}
    sampler, steps = ("ddim", 20) if dry else ("ddpm", 1000)
    for graph in (False, not dry):
        loaded = load_for_sampling(SHIPPED_PATH, device, log=lambda *a: None, cuda_graph=graph)
        model, cfg = loaded.net, loaded.config
        warm = dataclasses.replace(cfg.sample, sampler="dpm", steps=2)
        sample_classes(model, make_sampler(warm, cfg.diffusion, device), warm, range(10), 1, 0,
                       device)  # warm-up (and the graph's capture)
        sc = dataclasses.replace(cfg.sample, sampler=sampler, steps=steps)
        sync(device)
        start = time.perf_counter()
        images, _ = sample_classes(model, make_sampler(sc, cfg.diffusion, device), sc, range(10),
                                   1, 0, device)
        sync(device)
        results[f"shipped grid seconds, {sampler} {steps} steps, guidance {cfg.sample.guidance}"
                f"{', graph replayed' if graph else ', eager'}"] = time.perf_counter() - start
        rows.append(images.cpu())
    save_grid(torch.cat(rows), out / "shipped_grids.png", nrow=10)
    return results


# ---- stage 3: the reference recipe, trained ------------------------------------------------

def stage_reference(out: Path, work: Path, dry: bool) -> dict:
    ckpt = work / "reference.pt"
    ckpt.unlink(missing_ok=True)
    mode, options = fastest_setting(out, dry)
    seconds = STAGE_SECONDS - RESERVE["dry" if dry else "gpu"]
    preset, device, n = ("tiny", "cpu", 20) if dry else ("reference", "cuda", 1000)
    logdir = out / "runs_reference"
    shutil.rmtree(logdir, ignore_errors=True)
    results = {"setting": mode, "options": options, "train_seconds_budget": seconds}
    write_results(out, 3, results)
    if seconds < 10:
        return results
    # (the dry run's tiny model at 28 px: at its own 16 px the evaluation would first classify
    # all 10,000 test digits resized, which takes most of a CPU test's time)
    sets = [f"train.{k}={v}" for k, v in options.items()] + [f"train.max_minutes={seconds / 60}"]
    sets += ["model.img_size=28"] if dry else []
    results["train_exit_code"] = run(
        [sys.executable, "scripts/train.py", "--preset", preset, "--device", device, "--out", ckpt,
         "--logdir", logdir, *[x for kv in sets for x in ("--set", kv)]], out, timeout=seconds + 60)
    write_results(out, 3, results)
    if not ckpt.exists():
        return results
    import torch
    saved = torch.load(ckpt, weights_only=True, map_location="cpu")
    epochs = saved["epoch"] + saved["step_in_epoch"] / -(-60000 // saved["config"]["train"]["batch_size"])
    results.update(steps=saved["step"], epochs=epochs, epoch=saved["epoch"],
                   step_in_epoch=saved["step_in_epoch"], train_seconds=saved["train_seconds"],
                   seconds_per_epoch=saved["train_seconds"] / max(epochs, 1e-9))
    write_results(out, 3, results)
    graph = [] if dry else ["--cuda-graph"]
    grid = work / "reference_grid.png"
    start = time.perf_counter()
    results["grid_exit_code"] = run([sys.executable, "scripts/denoise.py", "--ckpt", ckpt, "--out",
                                     grid, "--n-per-class", "10", "--device", device, "--seed", "0",
                                     *graph], out, 30)
    results["grid_seconds_with_start"] = time.perf_counter() - start
    if grid.exists():
        shutil.copy(grid, out / "reference_grid.png")
    write_results(out, 3, results)
    results["evaluate_exit_code"] = run(
        [sys.executable, "scripts/evaluate.py", "--ckpt", ckpt, "--n", n, "--device", device,
         "--json", out / "reference_eval.json", *graph], out, 80)
    return results


# ---- stage 4: a wider cpu recipe for the shipped checkpoint --------------------------------

def stage_wide(out: Path, work: Path, dry: bool) -> dict:
    ckpt = work / "wide.pt"
    ckpt.unlink(missing_ok=True)
    minutes = (STAGE_SECONDS - (20 if dry else 40)) / 60  # the export and start-ups after it
    # The cosine schedule needs its length up front: the steps that stage 2's measured rate
    # fits in the budget, less 15 s for compiling and the per-epoch grids. Without stage 2's
    # number the time budget alone stops the run.
    summary = out / "summary.json"
    rate = json.loads(summary.read_text()).get("stage2", {}).get(
        "train cpu wide, auto", {}).get("images_per_s") if summary.exists() else None
    steps = int((60 * minutes - 15) * rate / 250) if rate else 20000
    args = ["--preset", "tiny", "--device", "cpu", "--max-steps", "6"] if dry else \
        WIDE + ["--device", "cuda", "--max-steps", steps]
    results = {"train_minutes_budget": minutes, "max_steps": steps, "args": list(map(str, args))}
    results["train_exit_code"] = run(
        [sys.executable, "scripts/train.py", *args, "--out", ckpt, "--logdir", work / "runs_wide",
         "--set", f"train.max_minutes={minutes}"], out, timeout=60 * minutes + 15)
    write_results(out, 4, results)
    if ckpt.exists():
        import torch
        saved = torch.load(ckpt, weights_only=True, map_location="cpu")
        results.update(steps=saved["step"], train_seconds=saved["train_seconds"])
        results["export_exit_code"] = run([sys.executable, "scripts/export_checkpoint.py", ckpt,
                                           out / "wide.pt"], out, 60)
    return results


STAGES = {1: stage_tests, 2: stage_bench, 3: stage_reference, 4: stage_wide}


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the results")
    p.add_argument("--work", default=None, help="folder for large files that do not come back "
                   "(default: <out>/../gpu_check_work)")
    p.add_argument("--dry-run", action="store_true", help="every stage on the CPU, tiny preset")
    p.add_argument("--stages", default="1,2,3,4")
    p.add_argument("--pytest-k", default="", help="stage 1: only the tests pytest -k selects")
    p.add_argument("--bench-rows", default="", help="stage 2: only these rows, ';'-separated, "
                   "e.g. 'reference, auto;cpu, auto'")
    p.add_argument("--no-grids", action="store_true", help="stage 2: skip the shipped grids")
    p.add_argument("--stage", type=int, default=None, help=argparse.SUPPRESS)  # one stage, inside
    p.add_argument("--seconds", type=float, default=0, help=argparse.SUPPRESS)  # ... and its limit
    a = p.parse_args()
    global PYTEST_K, BENCH_ROWS, NO_GRIDS, STAGE_SECONDS
    PYTEST_K, NO_GRIDS, STAGE_SECONDS = a.pytest_k, a.no_grids, a.seconds
    BENCH_ROWS = [r.strip() for r in a.bench_rows.split(";") if r.strip()]
    out = Path(a.out).resolve()
    work = Path(a.work).resolve() if a.work else out.parent / f"{out.name}_work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if a.stage is not None:  # the child process: do one stage, record it
        write_results(out, a.stage, STAGES[a.stage](out, work, a.dry_run))
        return 0
    kind = "dry" if a.dry_run else "gpu"
    deadline = time.perf_counter() + TOTAL[kind]
    failed = []
    for stage in (int(s) for s in a.stages.split(",")):
        start = time.perf_counter()
        limit = min(LIMITS[kind][stage] or 1e9, deadline - start - 5)
        if limit < (WIDE_MIN[kind] if stage == 4 else 10):
            write_results(out, stage, {"skipped": f"{deadline - start:.0f} s left"})
            print(f"stage {stage} ({STAGES[stage].__name__}): skipped, the deadline is near")
            continue
        cmd = [sys.executable, __file__, "--stage", stage, "--out", out, "--work", work,
               "--seconds", f"{limit:.1f}"]
        cmd += ["--dry-run"] if a.dry_run else []
        cmd += ["--pytest-k", a.pytest_k, "--bench-rows", a.bench_rows]
        cmd += ["--no-grids"] if a.no_grids else []
        rc = run(cmd, out, timeout=limit)
        seconds = time.perf_counter() - start
        write_results(out, stage, {"exit_code": rc, "seconds": seconds})
        print(f"stage {stage} ({STAGES[stage].__name__}): exit {rc}, {seconds:.0f} s", flush=True)
        if rc != 0:
            failed.append(stage)
    summary = json.loads((out / "summary.json").read_text())
    for stage, numbers in summary.items():  # the short table: the reply carries the end of stdout
        short = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in numbers.items()
                 if k not in ("measured", "args")}
        print(stage, json.dumps(short))
    codes = {k: v for stage in summary.values() for k, v in stage.items() if k.endswith("exit_code")}
    bad = [k for k, v in codes.items() if v != 0]
    print(f"summary in {out / 'summary.json'}; failed stages: {failed or 'none'}; "
          f"failed steps: {bad or 'none'}")
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())
