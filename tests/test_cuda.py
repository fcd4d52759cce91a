"""The CUDA path every GPU user gets by default (the speed settings of speed.Speed).

Skipped without CUDA: CI has no GPU. benchmarks/gpu_check.py runs this file as its stage 1 on a
GPU machine. The model is `tiny` on a fixed batch, so each test is seconds after compilation.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_script
from diffusion101.presets import get_preset
from diffusion101.dataset import ImageData
from diffusion101.diffusion import NoiseSchedule
from diffusion101.speed import Speed
from diffusion101.train import train_step
from diffusion101.train_state import build_state

# DIFFUSION101_TEST_DEVICE=cpu runs these on the CPU, to check the tests themselves before a
# GPU is lent (slow: bf16 and torch.compile on a CPU); on the CPU they prove nothing about CUDA.
CUDA = torch.device(os.environ.get("DIFFUSION101_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA device")
ALL_OFF = {"precision": "fp32", "channels_last": "off", "compile": "off",
           "fused_optimizer": "off", "data_on_device": "off", "one_token_shortcut": "off"}
# bf16 keeps 8 bits of mantissa (relative rounding 2^-8); a loss is a mean over many such
# products, and three Adam steps let the weights drift apart a little: a relative 3e-2 covers
# that with room, and is far below what a wrong layout or a broken fused update would give.
BF16_RTOL = 3e-2
# Where the CUDA results go for the report (gpu_check.py points it into its output folder).
REPORT = os.environ.get("DIFFUSION101_CUDA_REPORT")


def _report(name: str, value) -> None:
    if REPORT:
        with open(REPORT, "a") as f:
            f.write(json.dumps({"test": name, "value": value}) + "\n")


_BASELINE = {}


def _fp32_losses(data: ImageData, steps: int) -> list:
    """The all-off (fp32 eager) losses, computed once per length."""
    if steps not in _BASELINE:
        _BASELINE[steps] = _losses({}, data, steps)
    return _BASELINE[steps]


def _losses(options: dict, data: ImageData, steps: int) -> list:
    """Losses of `steps` training steps on one fixed batch, with the speed options given."""
    cfg = get_preset("tiny")
    for name, value in {**ALL_OFF, **options}.items():
        setattr(cfg.train, name, value)
    speed = Speed.for_device(cfg.train, CUDA)
    torch.manual_seed(0)  # the same initial weights for every combination
    state = build_state(cfg, CUDA, speed, total_steps=steps)
    state.net = speed.network(state.model)
    if speed.data_on_device:
        data = data.to(CUDA)
    scheduler = NoiseSchedule(cfg.diffusion, CUDA)
    x0, y = data.batch(torch.arange(16), CUDA)
    return [train_step(state, scheduler, (x0, y), cfg.train, speed) for _ in range(steps)]


@pytest.mark.parametrize("option", [{"precision": "bf16"}, {"channels_last": "on"},
                                    {"compile": "on"}, {"compile": "graphs"},
                                    {"fused_optimizer": "on"},
                                    {"data_on_device": "on"}, {"one_token_shortcut": "on"}],
                         ids=lambda o: next(iter(o)))
def test_each_speed_option_matches_fp32(option, fake_data):
    if option.get("compile") == "graphs" and CUDA.type != "cuda":
        pytest.skip("CUDA graphs are refused off CUDA (tests/test_train.py checks the refusal)")
    reference = _fp32_losses(fake_data, 3)
    fast = _losses(option, fake_data, 3)
    rel = [abs(a - b) / abs(b) for a, b in zip(fast, reference)]
    _report(f"speed option {option}: relative loss difference per step", rel)
    assert max(rel) < BF16_RTOL, (option, fast, reference)


def test_all_speed_options_together_train_like_fp32(fake_data):
    # compile + channels_last + fused optimizer + data on the device + bf16: the `auto` path
    fast = _losses({name: "auto" for name in ALL_OFF}, fake_data, 30)
    reference = _fp32_losses(fake_data, 30)
    _report("auto vs fp32 eager over 30 steps (first, last losses)",
            {"auto": [fast[0], fast[-1]], "fp32": [reference[0], reference[-1]]})
    assert abs(fast[0] - reference[0]) / reference[0] < BF16_RTOL
    assert fast[-1] < 0.8 * fast[0]  # it learns the fixed batch
    assert abs(fast[-1] - reference[-1]) / reference[-1] < 0.1  # 30 steps apart, within a tenth


def test_same_seed_same_digits_on_cuda():
    from diffusion101.denoise import sample_classes
    from diffusion101.denoise import make_sampler
    from diffusion101.generate import load_for_sampling
    from diffusion101.model_files import SHIPPED_PATH
    model = load_for_sampling(SHIPPED_PATH, CUDA, log=lambda *a: None)
    sc, diffusion = model.config.sample, model.config.diffusion
    runs = [sample_classes(model.net, make_sampler(sc, diffusion, CUDA), sc, range(10), 2, 7, CUDA)[0]
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    model_cpu = load_for_sampling(SHIPPED_PATH, "cpu", log=lambda *a: None)
    on_cpu, _ = sample_classes(model_cpu.net, make_sampler(sc, diffusion, "cpu"), sc, range(10), 2,
                              7, "cpu")
    gap = (runs[0].cpu() - on_cpu).abs().mean().item()
    _report("shipped checkpoint, same seed: mean |CUDA - CPU| pixel difference in [-1, 1]", gap)
    assert gap < 0.05  # the same digits, up to TF32/cuDNN rounding


def test_kill_then_resume_on_cuda(tmp_path):
    common = ["--preset", "tiny", "--device", CUDA.type, "--max-steps", "12", "--save-every", "4",
              "--seed", "3", "--logdir", "runs"]
    run_script("train", *common, "--out", "straight.pt", cwd=tmp_path)
    run_script("train", *common, "--out", "again.pt", cwd=tmp_path)
    killed = run_script("train", *common, "--out", "crash.pt", cwd=tmp_path, check=False,
                        fault="kill_after_step:7")
    assert killed.returncode == -9
    assert torch.load(tmp_path / "crash.pt", weights_only=True)["step"] == 4
    run_script("train", *common, "--out", "crash.pt", "--resume", cwd=tmp_path)
    a, again, b = (torch.load(tmp_path / f"{n}.pt", weights_only=True)
                   for n in ("straight", "again", "crash"))
    assert a["step"] == b["step"] == 12

    def gap(x, y):
        return max((x["model"][k].float() - y["model"][k].float()).abs().max().item()
                   for k in x["model"] if x["model"][k].is_floating_point())
    run_to_run, resumed = gap(a, again), gap(a, b)
    _report("kill/resume on CUDA: max |w| gap, two straight runs and straight vs resumed",
            {"run_to_run": run_to_run, "resumed": resumed})
    # Resuming adds nothing of its own: where two straight runs agree bitwise (deterministic
    # kernels), the resumed run must too; otherwise it stays within the kernels' own spread.
    if run_to_run == 0:
        assert resumed == 0
    else:
        assert resumed <= 10 * run_to_run + 1e-6
    assert torch.equal(a["rng"]["generator"], b["rng"]["generator"])


def test_torchrun_one_process_nccl_trains_and_saves(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(ROOT / "scripts" / "train.py"), "--preset", "tiny", "--max-steps", "4",
           "--device", CUDA.type, "--out", "ddp.pt", "--logdir", "runs",
           "--set", "train.compile=off"]  # compiling is tested above; this is about NCCL
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 processes" in proc.stdout and "replicas agree" in proc.stdout
    ckpt = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert ckpt["step"] == 4
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])


def test_one_token_shortcut_matches_the_full_attention_on_cuda():
    # the `reference` layout (one label token): skipping Q, K and the softmax changes nothing
    # beyond float32 rounding on the GPU either, forward and backward
    from conftest import one_token_unet_output_and_grads
    fast = one_token_unet_output_and_grads(shortcut=True, device=CUDA)
    full = one_token_unet_output_and_grads(shortcut=False, device=CUDA)
    gap = max((u - v).abs().max().item() for u, v in zip(fast, full))
    _report("one-token shortcut vs full attention: max |difference| of output and gradients", gap)
    assert gap < 1e-4


@pytest.mark.skipif(CUDA.type != "cuda", reason="CUDA graphs are refused off CUDA (test_speed.py)")
def test_a_walk_through_the_replayed_graph_is_the_eager_walk():
    # the shipped checkpoint's 20-step DPM-Solver++ grid with guidance (two batch shapes: the
    # guided pair and, for a CUDA graph, its capture), eagerly and replayed
    from diffusion101.denoise import sample_classes
    from diffusion101.denoise import make_sampler
    from diffusion101.generate import load_for_sampling
    from diffusion101.model_files import SHIPPED_PATH
    images = []
    for graph in (False, True):
        model = load_for_sampling(SHIPPED_PATH, CUDA, log=lambda *a: None, cuda_graph=graph)
        sc = model.config.sample
        sampler = make_sampler(sc, model.config.diffusion, CUDA)
        images.append(sample_classes(model.net, sampler, sc, range(10), 2, 7, CUDA)[0])
    gap = (images[0] - images[1]).abs().max().item()
    _report("DPM-Solver++ 20 grid, replayed graph vs eager: max |pixel difference|", gap)
    assert gap < 1e-4

