"""The commands' entry points: pyproject.toml's [project.scripts] and scripts/*.py call these.

This module imports nothing heavy. Importing torch and the package takes a second or more on a
cold start, and a Ctrl-C in that second would otherwise print Python's traceback: each entry
point starts the one-line boundary first, then imports the command (commands.py) and hands it
to cli.run_cli, the boundary for everything after."""
from __future__ import annotations

import sys

INTERRUPTED = "error: interrupted while starting; nothing was written"


def run(name: str, argv=None) -> int:
    """Run commands.<name>(argv) under cli.run_cli; an interrupt while importing it: exit 130."""
    try:
        from . import cli, commands
    except KeyboardInterrupt:
        try:
            print(INTERRUPTED, file=sys.stderr)
        except OSError:  # stderr itself is gone: the exit code says it
            pass
        return 130
    return cli.run_cli(getattr(commands, name), argv)


def _entry(name: str):
    def command(argv=None) -> int:
        return run(name, argv)
    command.__name__ = command.__qualname__ = f"{name}_command"
    command.__doc__ = f"The command that runs commands.{name} (its flags: --help)."
    return command


train_command = _entry("train")
finetune_command = _entry("finetune_lora")
sample_command = _entry("sample")
evaluate_command = _entry("evaluate")
export_command = _entry("export")
convert_command = _entry("convert")
make_style_data_command = _entry("make_style_data")
make_shapes_command = _entry("make_shapes")
train_classifier_command = _entry("train_evaluation_classifier")
posthoc_ema_command = _entry("posthoc_ema")
distill_command = _entry("distill_student")
