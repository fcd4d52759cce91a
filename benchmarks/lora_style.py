"""Does a LoRA adapter learn a style? Measure it on the built-in bold target.

Style statistic: mean ink (mean pixel value in [0, 1]) of generated digits. Reports how far an
adapter (and, for comparison, a full fine-tune) moves it from the base model's samples toward
the bold training data, and how often the evaluation classifier still reads the digit asked for.

  python scripts/make_style_data.py --out bold --n 6000
  python scripts/lora_finetune.py --base model.pt --data bold --out bold_lora.pt ...
  python scripts/lora_finetune.py --base model.pt --data bold --out bold_full.pt --full ...
  python benchmarks/lora_style.py --base model.pt --lora bold_lora.pt --full bold_full.pt --data bold
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion101.dataset import load_image_folder  # noqa: E402
from diffusion101.cli import parse_lora_specs  # noqa: E402
from diffusion101.generate import load_for_sampling  # noqa: E402
from diffusion101.evaluate import generate_images, score  # noqa: E402


def ink(images) -> float:
    """Mean pixel value in [0, 1] of images in [-1, 1]."""
    return float(((images.clamp(-1, 1) + 1) / 2).mean())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--lora", required=True)
    p.add_argument("--full", default=None, help="a fully fine-tuned model, for comparison")
    p.add_argument("--data", required=True, help="the style target ImageFolder")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--guidance", type=float, default=None, help="default: the checkpoint's")
    a = p.parse_args()
    rows = []
    for name, ckpt, loras in (("base", a.base, []), ("base + LoRA", a.base, parse_lora_specs([a.lora])),
                              ("full fine-tune", a.full, [])):
        if ckpt is None:
            continue
        loaded = load_for_sampling(ckpt, "cpu", loras)
        model, cfg = loaded.net, loaded.config
        sc = cfg.sample
        w = sc.guidance if a.guidance is None else a.guidance
        images, labels, _ = generate_images(model, cfg, a.n, "cpu", 0,
                                            dataclasses.replace(sc, guidance=w))
        rows.append((name, ink(images), score(images, labels)["accuracy"]))
    target, _ = load_image_folder(a.data, cfg.model.img_size)
    target_ink = float(target.images.float().mean() / 255)
    base_ink = rows[0][1]
    print(f"n = {a.n} per model, guidance {w:g}; target data mean ink {target_ink:.4f}")
    print("| model | mean ink | share of the way base -> target | classifier accuracy |")
    print("|---|---|---|---|")
    for name, value, acc in rows:
        moved = (value - base_ink) / (target_ink - base_ink)
        print(f"| {name} | {value:.4f} | {100 * moved:.0f}% | {100 * acc:.1f}% |")


if __name__ == "__main__":
    main()
