"""Sampler sweeps for docs/EXPERIMENTS.md: conditional accuracy, FID and time for a range of
guidance scales or step counts, each row measured with the evaluation of scripts/evaluate.py.

  python benchmarks/sweep.py --ckpt model.pt --n 2000 --guidance 1,1.5,2,3,4
  python benchmarks/sweep.py --ckpt model.pt --n 2000 --sampler dpm --steps 10,25,50,100
  python benchmarks/sweep.py --ckpt model.pt --n 1000 --guidance 2,3 --intervals 0:1,0.1:0.7
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion101.generate import load_for_sampling  # noqa: E402
from diffusion101.evaluate import evaluate_model  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--sampler", default=None)
    p.add_argument("--steps", default=None, help="comma list")
    p.add_argument("--guidance", default=None, help="comma list")
    p.add_argument("--intervals", default=None,
                   help="comma list of guidance intervals lo:hi in t/T (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    loaded = load_for_sampling(a.ckpt, "cpu")
    model, cfg = loaded.unet, loaded.config
    sc = cfg.sample
    sampler = a.sampler or sc.sampler
    steps = [int(s) for s in a.steps.split(",")] if a.steps else [sc.steps]
    guidance = [float(g) for g in a.guidance.split(",")] if a.guidance else [sc.guidance]
    intervals = ([tuple(float(f) for f in i.split(":")) for i in a.intervals.split(",")]
                 if a.intervals else [tuple(sc.guidance_interval)])
    print(f"{a.ckpt}, n = {a.n}, {torch.get_num_threads()} threads")
    print("| sampler | steps | guidance | interval (t/T) | accuracy | FID | floor (n) | "
          "s per 1000 images |")
    print("|---|---|---|---|---|---|---|---|")
    for s in steps:
        for w in guidance:
            for lo, hi in intervals:
                sc = dataclasses.replace(cfg.sample, sampler=sampler, steps=s, guidance=w,
                                         guidance_interval=(lo, hi))
                m = evaluate_model(model, cfg, a.n, "cpu", a.seed, sc)
                print(f"| {sampler} | {s} | {w:g} | {lo:g}-{hi:g} | {100 * m['accuracy']:.2f}% | "
                      f"{m['fid']:.3f} | {m['fid_floor_mean']:.3f} ({m['floor_n']}) | "
                      f"{1000 * m['sample_seconds'] / a.n:.1f} |", flush=True)


if __name__ == "__main__":
    main()
