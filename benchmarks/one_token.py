"""The one-token shortcut of the cross-attention (speed.OneTokenAttention, train.one_token_shortcut):
training-step time of the `reference` preset with it and without it, interleaved in one run.

  python benchmarks/one_token.py [--batch 8] [--steps 6] [--device cpu]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from diffusion101.presets import get_preset  # noqa: E402
from diffusion101.diffusion import NoiseSchedule  # noqa: E402
from diffusion101.speed import Speed, use_one_token_shortcut  # noqa: E402
from diffusion101.train import train_step  # noqa: E402
from diffusion101.train_state import build_state  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=6, help="timed steps per setting")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    device = torch.device(a.device)
    cfg = get_preset("reference")
    cfg.train.batch_size = a.batch
    torch.manual_seed(0)
    state = build_state(cfg, device, Speed(), total_steps=10 ** 6)
    schedule = NoiseSchedule(cfg.diffusion, device)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(a.batch, 1, 48, 48, generator=g) * 2 - 1).to(device)
    y = torch.randint(0, 10, (a.batch,), generator=g).to(device)
    seconds = {True: [], False: []}
    for i in range(2 * (a.steps + 1)):
        shortcut = i % 2 == 0
        use_one_token_shortcut(state.model, shortcut)
        start = time.perf_counter()
        train_step(state, schedule, (x0, y), cfg.train, Speed())
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # the first step of each setting is a warm-up
            seconds[shortcut].append(time.perf_counter() - start)
    on, off = statistics.median(seconds[True]), statistics.median(seconds[False])
    print(f"reference preset, batch {a.batch}, {device}, {torch.get_num_threads()} threads, "
          f"median of {a.steps} steps each:")
    print(f"full attention: {off:.3f} s a step; one-token shortcut: {on:.3f} s; "
          f"ratio {off / on:.2f}")


if __name__ == "__main__":
    main()
