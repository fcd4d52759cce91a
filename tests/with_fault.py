"""Run a command with a training fault, for the crash tests: the package has no fault hook in
its loop, so this patches train.train_step from outside, then runs the command as a user would.

  python tests/with_fault.py kill_after_step:7 train --preset tiny --max-steps 12 ...
  python tests/with_fault.py nan_at_step:4 train ...

kill_after_step:N dies by SIGKILL right after the update of step N (before that step's save),
as a killed job does; nan_at_step:N feeds step N a batch of NaN, so its loss is NaN.
(The atomic writer's own faults, disk_full and kill_before_replace, are files.fault()'s.)
"""
import os
import signal
import sys

from diffusion101 import commands, train
from diffusion101.cli import run_cli


def patch_train_step(fault: str, at_step: int) -> None:
    real = train.train_step

    def faulty(state, schedule, batch, *args, **kwargs):
        if fault == "nan_at_step" and state.step + 1 == at_step:
            batch = (batch[0] * float("nan"), *batch[1:])
        loss = real(state, schedule, batch, *args, **kwargs)
        if fault == "kill_after_step" and state.step == at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return loss

    train.train_step = faulty


if __name__ == "__main__":
    name, _, step = sys.argv[1].partition(":")
    if name not in ("kill_after_step", "nan_at_step") or not step.isdigit():
        sys.exit(f"unknown fault {sys.argv[1]!r}")
    patch_train_step(name, int(step))
    sys.exit(run_cli(getattr(commands, sys.argv[2]), sys.argv[3:]))
