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


def _main_code(body: str) -> str:
    """A program whose main() runs `body`, under run_cli, as every command does."""
    return ("import os, sys\nfrom diffusion101.cli import run_cli\ndef main(argv):\n"
            + "".join(f"    {line}\n" for line in body.splitlines()) + "sys.exit(run_cli(main))\n")


def _run_main(body: str, tmp_path, **kw):
    return subprocess.run([sys.executable, "-c", _main_code(body)], cwd=tmp_path,
                          capture_output=True, text=True, **kw)


def _loop():
    os.symlink("loop", "loop")
    open("loop", "rb")


def _folder():
    os.mkdir("d")
    open("d", "wb")


def _full_disk():
    raise OSError(28, "No space left on device")


def _no_memory():
    raise MemoryError()


@pytest.mark.parametrize("fail, words", [
    (lambda: open("x" * 300 + ".png", "wb"), "File name too long"),
    (_loop, "Too many levels of symbolic links"), (_folder, "Is a directory"),
    (_full_disk, "No space left on device"), (_no_memory, "out of memory"),
])
def test_operating_system_and_memory_errors_become_one_line(tmp_path, monkeypatch, capsys, fail, words):
    from diffusion101.cli import run_cli
    monkeypatch.chdir(tmp_path)
    assert run_cli(lambda argv: fail()) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    # `diffusion101-... | head -1`: the first line is read, then the pipe closes
    body = "for i in range(100000):\n    print('line', i, flush=True)"
    proc = subprocess.Popen([sys.executable, "-c", _main_code(body)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert first == b"line 0\n" and proc.wait(timeout=60) == 141 and err == "", err


def test_a_path_an_ascii_console_cannot_show_is_escaped(tmp_path):
    body = "from diffusion101.config import UserError\nraise UserError('cannot read donn\\u00e9es.pt')"
    proc = _run_main(body, tmp_path, env=dict(os.environ, PYTHONIOENCODING="ascii"))
    assert proc.returncode == 2 and proc.stderr.strip() == "error: cannot read donn\\xe9es.pt"


def test_an_output_that_is_no_regular_file_is_refused_before_anything_is_written(tmp_path):
    # the atomic writer renames its temporary file over the output: /dev/null, a FIFO or a
    # link to a device would be replaced by a regular file (as root, the system's own)
    os.mkfifo(tmp_path / "pipe.npz")
    (tmp_path / "null.json").symlink_to("/dev/null")
    for out in ("/dev/null", tmp_path / "pipe.npz", tmp_path / "null.json"):
        with pytest.raises(UserError, match="a device, a FIFO or a socket"):
            check_outputs({"--npz": out})
    assert (tmp_path / "null.json").is_symlink() and os.path.exists("/dev/null")


@pytest.mark.parametrize("name", ["newdir/.", "newdir/..", ".", "a/", "./"])
def test_a_file_name_that_names_a_folder_is_refused(name):
    import argparse

    from diffusion101.cli import file_name
    with pytest.raises(argparse.ArgumentTypeError, match="names a folder"):
        file_name(name)
    assert file_name("newdir/x.png") == "newdir/x.png" and file_name("./x.pt") == "./x.pt"


def test_every_command_locks_its_outputs_and_no_input_is_a_lock_file(tmp_path):
    # export (like every command, through check_outputs) refuses a file that a training run
    # holds; and a command never truncates and deletes an input that happens to be its lock
    from diffusion101.cli import run_cli
    from diffusion101.commands import export
    from conftest import tiny_checkpoint
    from diffusion101 import checkpoint
    checkpoint.save(tiny_checkpoint(), tmp_path / "src.pt")
    held = tmp_path / "held.pt"
    held.write_bytes(b"a run's checkpoint")
    code = (f"import sys, time; from diffusion101.cli import lock_output; "
            f"lock_output({str(held)!r}); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert run_cli(export, [str(tmp_path / "src.pt"), str(held)]) == 2
        (tmp_path / "alias.pt").symlink_to(held)  # another name of the file: the same lock
        assert run_cli(export, [str(tmp_path / "src.pt"), str(tmp_path / "alias.pt")]) == 2
        assert held.read_bytes() == b"a run's checkpoint"
    finally:
        holder.kill()
        holder.wait()
    lock = tmp_path / ".x.pt.lock"
    lock.write_bytes(b"my notes")
    with pytest.raises(UserError, match="is the lock file of --out"):
        check_outputs({"--out": tmp_path / "x.pt"}, {"--ckpt": lock})
    with pytest.raises(UserError, match="is the lock file of --out .* give another name"):
        check_outputs({"--out": tmp_path / "x.pt", "--npz": lock})  # deleted at exit otherwise
    assert lock.read_bytes() == b"my notes"


def test_an_output_that_is_a_link_is_written_through_never_replaced(tmp_path):
    # the rename lands on the file the link names: the link stays a link (as root, a link such
    # as /dev/stdout would otherwise become a plain file), and the old target is not left stale
    from diffusion101.files import atomic_write
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "grid.png"
    target.write_bytes(b"old")
    link = tmp_path / "grid.png"
    link.symlink_to(target)
    check_outputs({"--out": link}, lock=False)
    atomic_write(link, lambda f: f.write(b"new"))
    assert link.is_symlink() and target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["grid.png", "grid.png", "real"]


def test_a_file_output_inside_a_folder_that_is_read_is_refused_even_through_a_link(tmp_path):
    # (post-hoc EMA's snapshots, an image folder): the write would replace what is read
    data = tmp_path / "data" / "0"
    data.mkdir(parents=True)
    (data / "img.png").write_bytes(b"an image")
    (tmp_path / "m.pt").symlink_to(data / "img.png")
    for out in (data / "m.pt", tmp_path / "m.pt"):
        with pytest.raises(UserError, match="lies inside --data"):
            check_outputs({"--out": out}, {"--data": tmp_path / "data"}, lock=False)
    check_outputs({"--out": tmp_path / "n.pt"}, {"--data": tmp_path / "data"}, lock=False)
    assert (data / "img.png").read_bytes() == b"an image"


def test_a_loop_of_links_as_an_input_is_one_line(tmp_path, monkeypatch, capsys):
    from diffusion101.cli import run_cli
    from diffusion101.commands import sample
    monkeypatch.chdir(tmp_path)
    os.symlink("loop.pt", "loop.pt")
    check_outputs({"--out": "grid.png"}, {"--ckpt": "loop.pt"})  # no file: no clash either
    assert run_cli(sample, ["--ckpt", "loop.pt", "--out", "grid.png"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loop.pt" in err[0] and not (tmp_path / "grid.png").exists(), err


@pytest.mark.parametrize("flag,name,target,derived,said", [
    # issue 46: the progress figure's derived name as a link to the user's text file
    ("--out's progress figure", "g_progress.png", "notes.txt", True, "that name is derived"),
    ("--out's progress figure", "g_progress.png", "other.png", True, "that name is derived"),
    ("the pairs file", "s.pt.pairs.pt", "keep.pt", True, "that name is derived"),
    ("--out", "grid.png", "notes.txt", False, "a file of another kind"),
    ("--npz", "s.npz", "photo.png", False, "a file of another kind"),
])
def test_a_link_is_written_through_only_when_named_and_of_the_same_kind(tmp_path, flag, name,
                                                                        target, derived, said):
    from diffusion101.files import atomic_write
    (tmp_path / target).write_bytes(b"the user's file")
    (tmp_path / name).symlink_to(tmp_path / target)
    with pytest.raises(UserError, match=said):
        check_outputs({flag: tmp_path / name}, lock=False, derived=[flag] if derived else [])
    with pytest.raises(UserError, match=said):  # and the writer itself, the last line
        atomic_write(tmp_path / name, lambda f: f.write(b"PNG"), derived=derived)
    assert (tmp_path / target).read_bytes() == b"the user's file"
    assert (tmp_path / name).is_symlink()


def test_the_sample_command_refuses_a_progress_figure_link_before_any_work(tmp_path, capsys):
    from diffusion101.commands import sample
    from diffusion101.cli import run_cli
    (tmp_path / "notes.txt").write_text("my notes")
    (tmp_path / "grid_progress.png").symlink_to(tmp_path / "notes.txt")
    assert run_cli(sample, ["--out", str(tmp_path / "grid.png")]) == 2
    assert "that name is derived" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "my notes" and not (tmp_path / "grid.png").exists()


def test_a_new_folder_named_by_a_dangling_link_is_refused_by_its_name(tmp_path, capsys):
    """make-shapes and make-style-data write a new folder: a link to nothing there is named
    in the error, not the temporary folder the rename would have failed on."""
    from diffusion101.cli import run_cli
    from diffusion101.commands import make_shapes
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    assert run_cli(make_shapes, ["--out", str(tmp_path / "out"), "--n", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'out'} exists (a link); choose a new folder"]
    assert (tmp_path / "out").is_symlink() and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_the_sampling_and_training_flags_are_the_config_fields_one_name_each():
    """Each sample field with help is a flag of the sampling command, named as the field, with
    its help, choices and range from the field's declaration; a given flag reads as the
    field's type; the API's sample() takes the same names; the training shortcuts likewise."""
    import dataclasses
    import inspect

    import diffusion101 as d
    from diffusion101.cli import Parser, add_field_flags, add_sampler_flags, field_values
    from diffusion101.commands import TRAIN_SHORTCUTS
    from diffusion101.config import SampleConfig, TrainConfig
    p = Parser()
    add_sampler_flags(p)
    flags = {a.dest: a for a in p._actions}
    fields = [f for f in dataclasses.fields(SampleConfig) if "help" in f.metadata]
    assert {f.name for f in fields} == set(flags) - {"help", "no_ema", "cuda_graph"}
    for f in fields:
        action = flags[f.name]
        assert action.option_strings == ["--" + f.name.replace("_", "-")]
        assert action.help.startswith(f.metadata["help"])
        for choice in f.metadata.get("choices", ()):
            assert choice in action.help
    a = p.parse_args(["--guidance", "2.5", "--steps", "7", "--guidance-interval", "0.1,0.7",
                      "--apg-norm-threshold", "3", "--guidance-rule", "apg"])
    assert field_values(a, SampleConfig) == {"guidance": 2.5, "steps": 7, "guidance_rule": "apg",
                                             "guidance_interval": (0.1, 0.7),
                                             "apg_norm_threshold": 3.0}
    with pytest.raises(UserError, match="invalid float value: 'lots'"):
        p.parse_args(["--guidance", "lots"])
    api = inspect.signature(d.sample).parameters
    named = set(api) | {"apg_eta", "apg_momentum", "apg_norm_threshold", "guide_cfg", "shift"}
    assert {f.name for f in fields} <= named  # the rules' fields reach it as **rule_options
    t = Parser()
    add_field_flags(t, TrainConfig, TRAIN_SHORTCUTS)
    a = t.parse_args(["--max-steps", "12", "--lr", "0.002", "--data", "folder"])
    assert field_values(a, TrainConfig, TRAIN_SHORTCUTS) == {"max_steps": 12, "lr": 0.002,
                                                             "data": "folder"}
