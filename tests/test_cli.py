"""What the scripts share: output-path checks, the one-writer lock, number checks, SIGTERM."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from diffusion101.cli import (check_number, check_outputs, check_seed, lock_output, parse_classes,
                              parse_lora_specs, release_locks)
from diffusion101.config import UserError


def test_outputs_that_would_destroy_an_input_or_each_other_are_refused(tmp_path):
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"weights")
    (tmp_path / "link.pt").symlink_to(ckpt)
    os.chdir(tmp_path)
    cases = [
        ({"--out": "m.pt"}, {"--ckpt": ckpt}, "also --ckpt"),               # the input itself
        ({"--out": "./sub/../m.pt"}, {"--ckpt": "m.pt"}, "also --ckpt"),   # another spelling
        ({"--out": "link.pt"}, {"--ckpt": "m.pt"}, "also --ckpt"),          # a link to it
        ({"--out": "x.png", "--npz": "./x.png"}, {}, "same file"),          # two outputs
        ({"--out": str(tmp_path)}, {}, "is a folder"),                      # a folder
        ({"--out": "m.pt/x.png"}, {}, "a file stands where its folder should be"),
    ]
    (tmp_path / "sub").mkdir()
    for outputs, inputs, message in cases:
        with pytest.raises(UserError, match=message):
            check_outputs(outputs, inputs)
    with pytest.raises(UserError, match="is a file; a folder is wanted"):
        check_outputs({}, folders={"--logdir": "m.pt"})
    assert ckpt.read_bytes() == b"weights"
    check_outputs({"--out": "new/deeper/x.png", "--npz": "x.npz"}, {"--ckpt": "m.pt"})
    assert (tmp_path / "new" / "deeper").is_dir()  # created up front, before any work


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(UserError, match="not writable"):
        check_outputs({"--out": ro / "x.pt"})


def test_a_second_writer_of_the_same_output_is_refused(tmp_path):
    out = tmp_path / "run.pt"
    lock_output(out)  # held by this process until it exits
    code = ("import sys; from diffusion101.cli import lock_output, run_cli; "
            f"sys.exit(run_cli(lambda argv: lock_output({str(out)!r})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: --out {out} is being written by another run "
                                   f"(pid {os.getpid()}); wait for it or write elsewhere")
    # another file is free
    other = subprocess.run([sys.executable, "-c", code.replace("run.pt", "other.pt")], cwd=ROOT,
                           capture_output=True, text=True)
    assert other.returncode == 0 and not (tmp_path / ".other.pt.lock").exists()  # cleaned up
    release_locks()
    assert not (tmp_path / ".run.pt.lock").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, 11.0, 2.5])
def test_numbers_outside_their_range_are_refused(value):
    with pytest.raises(UserError, match=r"--n must be an integer in \[0, 10\]"):
        check_number("--n", value, 0, 10, integer=True)
    assert check_number("--n", 7, 0, 10, integer=True) == 7 and check_number("--n", None, 0, 1) is None
    with pytest.raises(UserError, match="--seed"):
        check_seed(2 ** 64)


def test_sigterm_mid_save_removes_the_temporary_file(tmp_path):
    # the atomic writer's temporary file goes on SIGTERM as on Ctrl-C, and the old file stays
    target = tmp_path / "m.pt"
    target.write_bytes(b"old")
    code = f"""
import os, signal, sys
from diffusion101.files import atomic_write
from diffusion101.cli import run_cli
def write(f):
    f.write(b"half")
    os.kill(os.getpid(), signal.SIGTERM)
sys.exit(run_cli(lambda argv: atomic_write({str(target)!r}, write)))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 143 and "terminated" in proc.stderr and "Traceback" not in proc.stderr
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


DIGITS = tuple("0123456789")


@pytest.mark.parametrize("bad", ["10", "-1", "a,b", "", "1,,x", "³", "٣", "circle"])
def test_bad_digits(bad):
    with pytest.raises(UserError, match="no class|at least one"):
        parse_classes(bad, DIGITS)


def test_digits_by_label_or_by_name():
    assert parse_classes("0, 3,7", DIGITS) == [0, 3, 7]
    assert parse_classes(None, DIGITS) == list(range(10))
    shapes = ("circle", "cross", "square")
    assert parse_classes("square,0,circle", shapes) == [2, 0, 0]
    # a name wins over a label: a folder of classes '1', '2', '3' is sampled by its names
    assert parse_classes("3,1", ("1", "2", "3")) == [2, 0]


def test_lora_specs_and_their_strengths(tmp_path):
    assert parse_lora_specs(["a.pt", "b.pt:0.3"]) == [("a.pt", 1.0), ("b.pt", 0.3)]
    odd = tmp_path / "x:1.pt"
    odd.write_bytes(b"")
    assert parse_lora_specs([str(odd)]) == [(str(odd), 1.0)]  # an existing path keeps its ':'
    for spec in ("a.pt:nan", "a.pt:101", "a.pt:-inf"):
        with pytest.raises(UserError, match=r"the LoRA strength must be a finite number in \[-100, 100\]"):
            parse_lora_specs([spec])
    with pytest.raises(UserError, match="empty path"):
        parse_lora_specs([""])
