"""entry.py: the entry points, and the one-line boundary that starts before torch is imported."""
import subprocess
import sys

import pytest

from diffusion101 import entry

# A program that sends itself SIGINT while `import torch` runs, as a Ctrl-C in the second that
# torch takes to load would, then runs an entry point as the installed command does: the moment
# is not left to a timer, so the test does not depend on how fast the machine imports.
CTRL_C_DURING_IMPORT = """
import os, signal, sys
class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            os.kill(os.getpid(), signal.SIGINT)
sys.meta_path.insert(0, CtrlC())
from diffusion101.entry import {name}
code = {name}({argv!r})
assert "torch.nn" in sys.modules  # the imports were not cut short: they ran to their end
sys.exit(code)
"""


@pytest.mark.parametrize("name", ["sample_command", "train_command"])
def test_ctrl_c_while_the_command_starts_is_one_line(tmp_path, name):
    argv = ["--out", str(tmp_path / "x.pt")]
    proc = subprocess.run([sys.executable, "-c", CTRL_C_DURING_IMPORT.format(name=name, argv=argv)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.splitlines() == [entry.INTERRUPTED]
    assert list(tmp_path.iterdir()) == []


def test_each_entry_point_runs_its_command_inside_the_boundary(tmp_path, capsys, monkeypatch):
    import signal

    from diffusion101.cli import release_locks
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # leave pytest's SIGTERM handler be
    # a bad input for each: exit 2 and one line, as from the installed command
    assert entry.sample_command(["--ckpt", str(tmp_path / "absent.pt")]) == 2
    assert entry.export_command([str(tmp_path / "absent.pt"), str(tmp_path / "b.pt")]) == 2
    assert entry.train_command(["--preset", "huge", "--out", str(tmp_path / "a.pt")]) == 2
    release_locks()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("error:") for line in err), err
    assert list(tmp_path.iterdir()) == []


def _swallowed_ctrl_c():
    """A Ctrl-C whose KeyboardInterrupt some library code catches and drops (as an import or
    a callback run from C can): the press is real, the exception never arrives."""
    import os
    import signal
    try:
        os.kill(os.getpid(), signal.SIGINT)
    except KeyboardInterrupt:
        pass


@pytest.fixture
def default_sigint():
    """SIGINT as a command started from a terminal has it (run_cli then notes each press)."""
    import signal
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("where", ["step", "final_save"])
def test_a_swallowed_ctrl_c_still_stops_training_at_once(tmp_path, capsys, monkeypatch, fake_data,
                                                         default_sigint, where):
    """Round four's mechanism 11: pressed during step 3 of 20, or during the final save, with
    the exception swallowed where it was raised: the run stops there (not 17 steps later: the
    file keeps step 2, as a Ctrl-C inside step 3 leaves it), exit 130 with the one line, and
    what was saved loads."""
    import torch

    from diffusion101 import commands, train, train_run
    from diffusion101.cli import INTERRUPTED, run_cli
    monkeypatch.setattr(train_run, "load_mnist", lambda **kw: fake_data)
    real_step, real_save = train.train_step, train.save

    def step(state, *args):
        loss = real_step(state, *args)
        if where == "step" and state.step == 3:
            _swallowed_ctrl_c()
        return loss

    def save(run, state):
        real_save(run, state)
        if where == "final_save" and state.step == 20:
            _swallowed_ctrl_c()
    monkeypatch.setattr(train, "train_step", step)
    monkeypatch.setattr(train, "save", save)
    out = tmp_path / "run.pt"
    code = run_cli(commands.train, ["--preset", "tiny", "--max-steps", "20", "--epochs", "5",
                                    "--save-every", "1", "--out", str(out), "--logdir",
                                    str(tmp_path / "runs")])
    assert code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == INTERRUPTED
    assert torch.load(out, weights_only=True)["step"] == (2 if where == "step" else 20)


def test_a_swallowed_ctrl_c_stops_a_walk_at_its_next_step(tmp_path, capsys, monkeypatch,
                                                          default_sigint):
    from conftest import tiny_checkpoint

    from diffusion101 import checkpoint, commands, denoise
    from diffusion101.cli import INTERRUPTED, run_cli
    checkpoint.save(tiny_checkpoint(0), tmp_path / "m.pt")
    calls, real = [], denoise.predict

    def predict(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            _swallowed_ctrl_c()
        return real(*args, **kw)
    monkeypatch.setattr(denoise, "predict", predict)
    code = run_cli(commands.sample, ["--ckpt", str(tmp_path / "m.pt"), "--out",
                                     str(tmp_path / "g.png")])
    assert code == 130 and len(calls) == 2 and not (tmp_path / "g.png").exists()
    assert capsys.readouterr().err.strip().splitlines()[-1] == INTERRUPTED
