"""Sampler sweeps for docs/EXPERIMENTS.md: conditional accuracy, FID, ink and time for a range of
guidance scales, step counts, guidance rules and (from a run's snapshots) EMA decays, each row
measured with the evaluation of scripts/evaluate.py.

  python benchmarks/sweep.py --ckpt model.pt --n 2000 --guidance 1,1.5,2,3,4
  python benchmarks/sweep.py --ckpt model.pt --n 2000 --sampler dpm --steps 10,25,50,100
  python benchmarks/sweep.py --ckpt model.pt --n 1000 --guidance 2,3 --intervals 0:1,0.1:0.7
  # rule x w x EMA decay, the EMA rebuilt from the run's snapshots (train.snapshot_every):
  python benchmarks/sweep.py --ckpt model.pt --snapshots model.snapshots --decays 0.99,0.999 \\
      --rules cfg,apg --guidance 1.5,2,3 --apg 0:-0.5:0 --plot sweep.png
  # autoguidance by an earlier snapshot of the same run (its step), with a cfg term:
  python benchmarks/sweep.py --ckpt model.pt --rules auto --guides 300,600 --guide-cfg 1,1.5
  # ... the guide being the run's own power EMA (gamma 17) at that step, or another model file
  # (a smaller network trained as long):
  python benchmarks/sweep.py --ckpt model.pt --rules auto --guides 600 --guide-gammas 17
  python benchmarks/sweep.py --ckpt model.pt --rules auto --guides small.pt --guide-cfg 1.75
  # FID and accuracy against steps, one curve per earlier sweep (e.g. one per objective):
  python benchmarks/sweep.py --replot ddpm.json,flow.json --plot-steps steps.png
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion101 import checkpoint  # noqa: E402
from diffusion101.denoise import Guide  # noqa: E402
from diffusion101.evaluate import generate_images, score  # noqa: E402
from diffusion101.generate import load_for_sampling  # noqa: E402
from diffusion101.images import to_unit  # noqa: E402
from diffusion101.posthoc_ema import rebuild, sigma_rel, snapshot_folder, snapshot_path  # noqa: E402


def floats(text, default):
    return [float(v) for v in text.split(",")] if text else default


def rule_settings(a) -> list:
    """(label, sampler options) of every rule setting asked for."""
    out = []
    for rule in a.rules.split(","):
        if rule == "apg":
            for spec in a.apg.split(","):
                eta, momentum, threshold = (float(v) for v in spec.split(":"))
                out.append((f"apg eta {eta:g}, momentum {momentum:g}, r {threshold:g}",
                            {"guidance_rule": "apg", "apg_eta": eta, "apg_momentum": momentum,
                             "apg_norm_threshold": threshold}))
        elif rule == "auto":
            for guide, w_cfg in itertools.product(a.guides.split(","), floats(a.guide_cfg, [1.0])):
                if not guide.isdecimal():  # a model file: used as it is
                    out.append((f"auto, guide {Path(guide).name}, cfg term {w_cfg:g}",
                                {"guidance_rule": "auto", "guide": (guide, None), "guide_cfg": w_cfg}))
                    continue
                for g in floats(a.guide_gammas, [None]):
                    profile = "raw" if g is None else f"power {g:g} EMA"
                    out.append((f"auto, guide step {guide} ({profile}), cfg term {w_cfg:g}",
                                {"guidance_rule": "auto", "guide": (int(guide), g), "guide_cfg": w_cfg}))
        else:
            out.append((rule, {"guidance_rule": rule}))
    return out


def weights_by_decay(a, model) -> list:
    """(label, state dict) of the model's own weights, or of each EMA decay rebuilt."""
    if not a.snapshots:
        return [("as saved", model.state_dict())]
    out = [(f"{d:g}", rebuild(a.snapshots, d)[0]) for d in floats(a.decays, [])]
    return out + [(f"power {g:g} (sigma_rel {sigma_rel(g):.3f})", rebuild(a.snapshots, gamma=g)[0])
                  for g in floats(a.gammas, [])]


def guide_for(options: dict, a):
    """The guide network of an auto setting: a model file, the run's snapshot at that step (raw
    weights), or the power EMA of that exponent over the snapshots up to that step."""
    if options.get("guidance_rule") != "auto":
        return None
    folder = Path(a.snapshots or snapshot_folder(a.ckpt))
    step, gamma = options["guide"]
    path = Path(step) if isinstance(step, str) else snapshot_path(folder, step)
    guide = load_for_sampling(path, "cpu", log=lambda *x: None)
    if gamma is not None:
        checkpoint.load_state(guide.net, rebuild(folder, gamma=gamma, until=step)[0], "the guide's EMA")
    return Guide(guide.net, guide.config.diffusion.prediction)


def measure(model, cfg, sc, a, guide) -> dict:
    images, labels, seconds = generate_images(model, cfg, a.n, "cpu", a.seed, sc, 0, guide)
    m = score(images, labels)
    m.update(ink=float(to_unit(images).mean()), seconds=seconds)
    return m


def plot(rows: list, path: str, goal: str | None = None) -> None:
    """FID against accuracy, one curve (over w) per rule setting and EMA decay; with goal
    "ACC:FID" (e.g. 99.5:0.94), dashed lines at that accuracy and FID (the goal's corner is
    right of the one, below the other)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves = {}
    for r in rows:
        curves.setdefault((r["rule"], r["decay"]), []).append(r)
    for key, group in curves.items():
        group = sorted(group, key=lambda r: r["w"])
        ax.plot([100 * r["accuracy"] for r in group], [r["fid"] for r in group], "o-",
                label=f"{key[0]}; EMA {key[1]}")
        for r in group:
            ax.annotate(f"{r['w']:g}", (100 * r["accuracy"], r["fid"]), fontsize=7)
    if goal:
        acc, fid = (float(v) for v in goal.split(":"))
        ax.axvline(acc, color="grey", linestyle="--", linewidth=1)
        ax.axhline(fid, color="grey", linestyle="--", linewidth=1)
        ax.annotate("goal", (acc, fid), xytext=(4, -12), textcoords="offset points", fontsize=8)
    ax.set_xlabel("conditional accuracy (%)")
    ax.set_ylabel("FID (classifier features)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_steps(curves: dict, path: str) -> None:
    """FID (left) and accuracy (right) against sampler steps, log scale, one curve per label."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, rows in curves.items():
        rows = sorted(rows, key=lambda r: r["steps"])
        steps = [r["steps"] for r in rows]
        left.plot(steps, [r["fid"] for r in rows], "o-", label=label)
        right.plot(steps, [100 * r["accuracy"] for r in rows], "o-", label=label)
    for ax, name in ((left, "FID (classifier features)"), (right, "conditional accuracy (%)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampler steps")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    left.set_yscale("log")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--sampler", default=None)
    p.add_argument("--steps", default=None, help="comma list")
    p.add_argument("--guidance", default=None, help="comma list")
    p.add_argument("--intervals", default=None,
                   help="comma list of guidance intervals lo:hi in t/T (default: the checkpoint's)")
    p.add_argument("--rules", default="cfg", help="comma list of cfg, apg, auto")
    p.add_argument("--apg", default="0:0:0", help="comma list of eta:momentum:threshold")
    p.add_argument("--guides", default="", help="auto: comma list of snapshot steps or model files")
    p.add_argument("--guide-cfg", default=None, help="auto: comma list of cfg-term scales")
    p.add_argument("--guide-gammas", default=None,
                   help="auto: comma list of power-EMA exponents for the guide, each averaged over the "
                        "snapshots up to its step (default: the snapshot's raw weights)")
    p.add_argument("--snapshots", default=None, help="the run's snapshot folder")
    p.add_argument("--decays", default=None, help="comma list of EMA decays to rebuild")
    p.add_argument("--gammas", default=None, help="comma list of power-EMA exponents to rebuild")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--plot", default=None, help="FID against accuracy, as a PNG")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--goal", default=None, help="accuracy:FID of a goal to draw, e.g. 99.5:0.94")
    p.add_argument("--replot", default=None,
                   help="comma list of --json files of earlier sweeps: one plot of their rows, no sampling")
    p.add_argument("--plot-steps", default=None,
                   help="with --replot: FID and accuracy against steps, a curve per file")
    a = p.parse_args()
    if not (a.ckpt or a.replot and (a.plot or a.plot_steps)):
        p.error("give --ckpt, or --replot with --plot or --plot-steps")
    if a.replot and a.plot_steps:
        curves = {}
        for f in a.replot.split(","):
            rows = json.loads(Path(f).read_text())
            curves[f"{Path(f).stem} ({rows[0]['sampler']}, w {rows[0]['w']:g})"] = rows
        plot_steps(curves, a.plot_steps)
        return
    if a.replot:
        plot([r for f in a.replot.split(",") for r in json.loads(Path(f).read_text())], a.plot, a.goal)
        return
    loaded = load_for_sampling(a.ckpt, "cpu")
    model, cfg = loaded.net, loaded.config
    base = cfg.sample
    steps = [int(s) for s in a.steps.split(",")] if a.steps else [base.steps]
    intervals = ([tuple(float(f) for f in i.split(":")) for i in a.intervals.split(",")]
                 if a.intervals else [tuple(base.guidance_interval)])
    print(f"{a.ckpt}, n = {a.n}, {torch.get_num_threads()} threads")
    print("| rule | EMA decay | sampler, steps | w | interval (t/T) | accuracy | FID | floor (n) "
          "| ink | s per 1000 images |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for (decay, weights), (label, options) in itertools.product(weights_by_decay(a, model),
                                                               rule_settings(a)):
        checkpoint.load_state(model, weights, decay)
        guide = guide_for(options, a)
        if guide is not None:
            options = {**options, "guide": "snapshot"}
        for s, w, (lo, hi) in itertools.product(steps, floats(a.guidance, [base.guidance]), intervals):
            sc = dataclasses.replace(base, sampler=a.sampler or base.sampler, steps=s, guidance=w,
                                     guidance_interval=(lo, hi), **options)
            m = measure(model, cfg, sc, a, guide)
            rows.append({"rule": label, "decay": decay, "w": w, "sampler": sc.sampler, "steps": s,
                         "ckpt": str(a.ckpt), "accuracy": m["accuracy"],
                         "fid": m["fid"], "ink": m["ink"], "floor": m["fid_floor_mean"]})
            print(f"| {label} | {decay} | {sc.sampler}, {s} | {w:g} | {lo:g}-{hi:g} | "
                  f"{100 * m['accuracy']:.2f}% | {m['fid']:.3f} | {m['fid_floor_mean']:.3f} "
                  f"({m['floor_n']}) | {m['ink']:.4f} | {1000 * m['seconds'] / a.n:.1f} |", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    if a.plot:
        plot(rows, a.plot, a.goal)


if __name__ == "__main__":
    main()
