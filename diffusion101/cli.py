"""What the scripts share: config flags, device choice, and one-line errors instead of tracebacks."""
from __future__ import annotations

import argparse
import sys

import torch

from .config import Config, UserError, apply_override, get_preset, validate


def run_cli(main, argv=None) -> int:
    """Run main(argv); a UserError (or a bad flag) becomes one line on stderr and exit code 2."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; files already saved are intact", file=sys.stderr)
        return 130
    return 0


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message over two lines; keep it to one
        raise UserError(message)


def resolve_device(name: str | None) -> torch.device:
    """CUDA when available, else CPU; an explicit --device wins."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown device '{name}' (use cpu or cuda)")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(name)


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any config field, e.g. --set model.channels=32,64,128 "
                        "(repeatable)")


def build_config(preset: str, overrides, shortcuts: dict, base: Config | None = None) -> Config:
    """Preset (or a checkpoint's config), then --set overrides, then the named shortcut flags
    (e.g. --lr) that were given."""
    cfg = base if base is not None else get_preset(preset)
    for assignment in overrides:
        apply_override(cfg, assignment)
    for key, value in shortcuts.items():
        if value is not None:
            apply_override(cfg, f"{key}={value}")
    validate(cfg)
    return cfg
