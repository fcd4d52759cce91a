"""Training and sampling throughput for a preset on one device, as one table.

Every row is measured in this run, so the ratios between rows are the comparison:
  python benchmarks/bench.py --preset reference --device cpu --batch-size 32
  python benchmarks/bench.py --preset cpu --device cpu --unoptimised --sample-batches 100,500

Training: images/s of forward + backward + optimizer step in steady state (after warm-up),
including the batch preparation. Sampling: images/s of a 10-digit grid per sampler,
and of evaluation-style generation at chosen batch sizes.
FLOP per image from torch.utils.flop_counter; achieved FLOP/s = FLOP/image x images/s.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion101.presets import get_preset  # noqa: E402
from diffusion101.dataset import load_mnist  # noqa: E402
from diffusion101.config import SampleConfig  # noqa: E402
from diffusion101.denoise import make_sampler  # noqa: E402
from diffusion101.diffusion import NoiseSchedule  # noqa: E402
from diffusion101.train import diffusion_loss  # noqa: E402
from diffusion101.train_state import make_optimizer  # noqa: E402
from diffusion101.unet import UNet  # noqa: E402


def plain_loader(size: int, batch_size: int):
    """MNIST the reference's way: torchvision's dataset, per-image PIL Resize and ToTensor,
    batched by a DataLoader in the training process."""
    from torch.utils.data import DataLoader
    from torchvision import transforms
    from torchvision.datasets import MNIST

    from diffusion101.dataset import prepare_raw
    ds = MNIST(str(prepare_raw()), train=True, download=False, transform=transforms.Compose(
        [transforms.Resize((size, size)), transforms.ToTensor(), lambda x: x * 2 - 1]))
    return iter(DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=0))


def sync(device) -> None:
    """Wait for queued GPU work, so a timer reads the work and not just its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def unoptimised_train_rate(cfg, batch_size: int, steps: int, warmup: int) -> float:
    """The preset's own model and loss on the plain path: per-image PIL transforms through a
    DataLoader, a per-tensor (for-loop) optimizer and a host sync for the loss every step."""
    loader = plain_loader(cfg.model.img_size, batch_size)
    torch.manual_seed(0)
    model = UNet(cfg.model)
    opt_cls = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(model.parameters(), lr=cfg.train.lr, foreach=False)
    sched = NoiseSchedule(cfg.diffusion, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        x0, y = next(loader)
        loss = diffusion_loss(model, sched, (x0, y), g, cfg.train)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()  # the progress bar's per-step read of the loss
    return steps * batch_size / (time.perf_counter() - start)


def matmul_peak(device, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a large square fp32 matmul: the ceiling the training rates are measured against."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def conv_layer_rates(model, cfg, batch: int, device, repeats: int = 5):
    """Forward + backward FLOP/s of each 3x3 convolution of the network on its own, at the
    shape it sees in training: what the convolution library reaches, with nothing around it."""
    shapes = []
    hooks = [m.register_forward_hook(lambda m, inp, out: shapes.append((m, inp[0].shape[-1])))
             for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    s = cfg.model.img_size
    with torch.no_grad():
        model(torch.randn(2, cfg.model.in_channels, s, s, device=device),
              torch.tensor([1, 2], device=device), torch.tensor([3, 4], device=device))
    for h in hooks:
        h.remove()
    rows = []
    for conv, size in shapes:
        layer = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1).to(device)
        x = torch.randn(batch, conv.in_channels, size, size, device=device, requires_grad=True)
        for i in range(repeats + 2):
            if i == 2:
                start = time.perf_counter()
            layer(x).sum().backward()
        seconds = (time.perf_counter() - start) / repeats
        flop = 3 * 2 * batch * conv.out_channels * size * size * conv.in_channels * 9
        rows.append((f"{conv.in_channels}->{conv.out_channels} at {size}x{size}", flop / seconds))
    return rows


# ---- the package's own paths ----------------------------------------------------------------

def flop_per_image(model, cfg, device) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    s = cfg.model.img_size
    x = torch.randn(2, cfg.model.in_channels, s, s, device=device)
    t, y = torch.tensor([1, 500], device=device), torch.tensor([3, 4], device=device)
    with FlopCounterMode(display=False) as counter:
        model(x, t, y)
    return counter.get_total_flops() / 2


def train_rate(cfg, device, batch_size: int, steps: int, warmup: int, channels_last: bool,
               compile_model: bool, data) -> float:
    torch.manual_seed(0)
    model = UNet(cfg.model).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if compile_model else model
    sched = NoiseSchedule(cfg.diffusion, device)
    opt = make_optimizer(model.parameters(), cfg.train)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data), generator=g)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        x0, y = data.batch(order[i * batch_size:(i + 1) * batch_size], device)
        if channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        loss = diffusion_loss(net, sched, (x0, y), g, cfg.train)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return steps * batch_size / (time.perf_counter() - start)


@torch.inference_mode()
def sample_rate(cfg, device, sampler: str, steps: int, guidance: float):
    from diffusion101.denoise import sample_classes
    torch.manual_seed(0)
    model = UNet(cfg.model).to(device).eval()
    sc = dataclasses.replace(cfg.sample, sampler=sampler, steps=steps, guidance=guidance)
    warm = dataclasses.replace(sc, sampler="ddim", steps=2)
    sample_classes(model, make_sampler(SampleConfig(sampler="ddim", steps=2), cfg.diffusion, device), warm, range(10), 1, 0,
                  device)  # warm-up
    start = time.perf_counter()
    sample_classes(model, make_sampler(SampleConfig(sampler=sampler, steps=steps), cfg.diffusion, device), sc, range(10), 1,
                  0, device)
    sync(device)
    seconds = time.perf_counter() - start
    return 10 / seconds, seconds


@torch.inference_mode()
def eval_sample_rate(cfg, device, batch: int, guidance: float, n: int = 400) -> float:
    """Images/s of scripts/evaluate.py's generation (DPM-Solver++ 20 steps) at a given batch."""
    from diffusion101.evaluate import generate_images
    torch.manual_seed(0)
    model = UNet(cfg.model).to(device).eval()
    warm = dataclasses.replace(cfg.sample, sampler="dpm", steps=2, guidance=guidance)
    generate_images(model, cfg, batch, device, 0, warm, batch_size=batch)  # warm-up
    _, _, seconds = generate_images(model, cfg, n, device, 0,
                                    dataclasses.replace(warm, steps=20), batch_size=batch)
    return n / seconds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default="plain,channels_last",
                   help="comma list of plain, channels_last, compile, channels_last+compile")
    p.add_argument("--unoptimised", action="store_true",
                   help="also time the preset's own model on the plain path (CPU)")
    p.add_argument("--layers", action="store_true",
                   help="also time each 3x3 convolution alone (forward + backward)")
    p.add_argument("--sample-batches", default="",
                   help="comma list of digit batch sizes for evaluation-style sampling rows")
    p.add_argument("--samplers", default="ddpm:1000,ddim:25,dpm:20")
    a = p.parse_args()
    device = torch.device(a.device)
    cfg = get_preset(a.preset)
    bs = a.batch_size or cfg.train.batch_size
    data = load_mnist(train=True, img_size=cfg.model.img_size)
    model = UNet(cfg.model).to(device)
    flop = flop_per_image(model, cfg, device)
    print(f"preset {a.preset}, device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU, ' + str(torch.get_num_threads()) + ' threads'}), batch {bs}")
    print(f"forward FLOP per image: {flop / 1e9:.3f} G (training ~3x)")
    peak = matmul_peak(device)
    print(f"fp32 matmul (2048x2048) on this device: {peak / 1e9:.1f} GFLOP/s")
    rows = []
    if a.unoptimised:
        rate = unoptimised_train_rate(cfg, bs, a.steps, a.warmup)
        rows.append(("train", "preset model, unoptimised path", rate))
    for variant in a.variants.split(","):
        rate = train_rate(cfg, device, bs, a.steps, a.warmup, "channels_last" in variant,
                          "compile" in variant, data)
        rows.append(("train", f"package, {variant}", rate))
    base = rows[0][2]
    print("\n| what | path | images/s | vs first row | achieved GFLOP/s (of matmul peak) |\n"
          "|---|---|---|---|---|")
    for kind, name, rate in rows:
        print(f"| {kind} | {name} | {rate:.1f} | {rate / base:.2f}x | {3 * flop * rate / 1e9:.1f} "
              f"({300 * flop * rate / peak:.0f}%) |")
    if a.layers:
        for shape, rate in conv_layer_rates(model, cfg, bs, device):
            print(f"| conv 3x3 alone | {shape} | | | {rate / 1e9:.1f} ({100 * rate / peak:.0f}%) |")
    guidance = cfg.sample.guidance
    passes = 2 if guidance != 1 else 1  # guidance batches a conditional and an unconditional pass
    for spec in filter(None, a.samplers.split(",")):
        name, steps = spec.split(":")
        if name == "ddpm" and int(steps) != cfg.diffusion.timesteps:
            continue
        rate, seconds = sample_rate(cfg, device, name, int(steps), guidance)
        evals = int(steps) * passes
        print(f"| sample 10 digits | {name} {steps} steps, guidance {guidance} | {rate:.1f} "
              f"({seconds:.2f} s per grid) | | {flop * evals * rate / 1e9:.1f} |")
    for batch in [int(b) for b in a.sample_batches.split(",") if b]:
        rate = eval_sample_rate(cfg, device, batch, guidance)
        print(f"| sample for evaluation | dpm 20 steps, guidance {guidance}, {batch} digits a batch | "
              f"{rate:.1f} | | {flop * 20 * passes * rate / 1e9:.1f} |")


if __name__ == "__main__":
    main()
