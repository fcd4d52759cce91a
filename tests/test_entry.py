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
