"""The commands' entry points: pyproject.toml's [project.scripts] and scripts/*.py call these.

This module imports nothing heavy. Importing torch and the package takes a second or more on a
cold start, and a Ctrl-C in that second would raise KeyboardInterrupt inside torch's own import
code, which may print a traceback, turn it into another error, or swallow it (the command then
runs on as if the key had not been pressed). So each entry point only notes a Ctrl-C while it
imports the command (commands.py), answers it once the imports are done (one line, exit 130),
and otherwise hands the command to cli.run_cli, the boundary for everything after."""
from __future__ import annotations

import signal
import sys

INTERRUPTED = "error: interrupted while starting; nothing was written"


def run(name: str, argv=None) -> int:
    """Run commands.<name>(argv) under cli.run_cli; a Ctrl-C while importing it: exit 130."""
    pressed = []
    put_back = _note_sigint(pressed)
    try:
        from . import cli, commands
    finally:
        if put_back is not None:
            signal.signal(signal.SIGINT, put_back)
    if pressed:
        try:
            print(INTERRUPTED, file=sys.stderr)
        except OSError:  # stderr itself is gone: the exit code says it
            pass
        return 130
    return cli.run_cli(getattr(commands, name), argv)


def _note_sigint(pressed: list):
    """Make SIGINT append to `pressed` instead of raising; return the handler to put back
    afterwards (Python's own when the one replaced was not set from Python), or None where
    SIGINT was left alone: ignored (a job started in the background), or not the main thread."""
    try:
        if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
            return None
        previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    except ValueError:  # not the main thread
        return None
    return signal.default_int_handler if previous is None else previous


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
demo_command = _entry("demo")
