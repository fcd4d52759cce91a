"""What the commands share: their flags and how they are read (config overrides, sampler
options, classes, adapters), output-path checks, the one-writer lock, the device, and one-line
errors instead of tracebacks. The commands themselves are in commands.py."""
from __future__ import annotations

import argparse
import atexit
import dataclasses
import os
import re
import signal
import sys
from pathlib import Path

import torch

from .config import PRESSED, SEED_MAX, Config, SampleConfig, UserError
from .presets import get_preset
from .denoise import check_config
from .files import same_file, written_path
from .classes import class_labels
from .settings import apply_override, check_range, check_strength, parse_value, range_text


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that `finally` blocks and the atomic writer
    remove their temporary files as they do on Ctrl-C."""


INTERRUPTED = "error: interrupted; files already saved are intact"


def _on_sigterm(signum, frame):
    raise Terminated()


def _on_sigint(signum, frame):
    PRESSED.append(signum)  # kept even if the exception is swallowed (entry.check_interrupt)
    raise KeyboardInterrupt


def run_cli(main, argv=None) -> int:
    """Run main(argv): the one boundary where every command's failure becomes one line on
    stderr and a non-zero exit, never a traceback. A UserError (or a bad flag) exits 2; so do
    an operating-system error (a name too long, a full disk, a loop of links) and running out
    of memory; an interrupt 130, SIGTERM 143; a reader that went away (`| head`) ends it
    quietly with 141, as a pipe's writer does."""
    PRESSED.clear()
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # (not if ignored)
            signal.signal(signal.SIGINT, _on_sigint)
    except ValueError:  # not the main thread (a test calling main() from a worker)
        pass
    for stream in (sys.stdout, sys.stderr):  # a path an ASCII console cannot show: escaped
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        return _run(main, argv)
    finally:
        PRESSED.clear()  # (a later command in this process starts with none)


def _run(main, argv) -> int:
    try:
        main(argv)
    except UserError as e:
        return _fail(f"error: {e}", 2)
    except KeyboardInterrupt:
        return _fail(INTERRUPTED, 130)
    except Terminated:
        return _fail("error: terminated; files already saved are intact", 143)
    except BrokenPipeError:
        _silence_stdout()
        return 141
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        return _fail(f"error: {where}{e.strerror or e}; files already saved are intact", 2)
    except MemoryError:
        return _fail("error: out of memory (ask for fewer or smaller images, or a smaller "
                     "model); files already saved are intact", 2)
    except RuntimeError as e:  # an allocator's failure inside torch (ulimit -v, a cgroup)
        asked = allocation_failure(e)
        if asked is None:
            raise
        return _fail(f"error: out of memory: an allocation of {asked} failed (ask for fewer or "
                     f"smaller images, or a smaller model); files already saved are intact", 2)
    if PRESSED:  # pressed, and its KeyboardInterrupt swallowed before it reached here
        return _fail(INTERRUPTED, 130)
    return 0


def allocation_failure(e: RuntimeError):
    """How much an allocation that failed inside torch asked for ('4.0 GiB', or 'memory'
    where its message does not say), or None for any other RuntimeError."""
    text = str(e)
    if not (isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in text):
        return None
    found = re.search(r"allocate (\d+) bytes", text)
    return f"{int(found.group(1)) / 2 ** 30:,.1f} GiB" if found else "memory"


def _fail(line: str, code: int) -> int:
    try:
        print(line, file=sys.stderr)
    except OSError:  # stderr itself is gone: the exit code says it
        pass
    return code


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush does not fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def check_number(flag: str, value, lo, hi, integer: bool = False):
    """A command-line number that is no config field, through settings.check_range; None (the
    flag not given) passes, and the default applies."""
    return value if value is None else check_range(flag, value, lo, hi, integer=integer)


def check_seed(seed):
    return check_number("--seed", seed, 0, SEED_MAX, integer=True)


# argparse types of path flags: each refuses, as one line, a path that cannot mean what the
# flag wants, before any default is applied or any work starts.
def input_path(text: str) -> str:
    """A file or folder to read: not empty (Path('') would quietly mean the working folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; name a file or folder")
    return text


def file_name(text: str) -> str:
    """A file to write: not empty, and not a folder ('out/', '.', '..') or '-' (standard output,
    by the usual convention, which no command writes)."""
    input_path(text)
    last = text.replace(os.altsep or os.sep, os.sep).rsplit(os.sep, 1)[-1]  # as typed:
    if last in ("", ".", ".."):  # Path('new/.').name would be 'new', a file named new
        raise argparse.ArgumentTypeError(f"'{text}' names a folder; give a file name")
    if text == "-":
        raise argparse.ArgumentTypeError("'-' (standard output) cannot be written; give a file name")
    return text


def output_file(what: str, *suffixes: str):
    """The argparse type of a file output: file_name, and a name whose suffix (any case) is
    one of `suffixes`, since the suffix says what is written there: a grid named .jpg, an npz
    named .png, a training checkpoint named .safetensors would each hold something else than
    its name says."""
    def check(text: str) -> str:
        file_name(text)
        if Path(text).suffix.lower() not in suffixes:
            ends = " or ".join(suffixes)
            raise argparse.ArgumentTypeError(f"'{text}': {what} is written as a {ends} file; "
                                             f"give a name ending in {ends}")
        return text
    return check


def check_outputs(outputs: dict, inputs: dict | None = None, folders: dict | None = None,
                  lock: bool = True, derived=()) -> None:
    """Refuse, before any work, output paths that cannot be used: a file output that is one of
    the inputs (under any name), two outputs that are one file, a folder where a file is
    wanted (or the reverse), a device or FIFO, a folder that cannot be created or written;
    then lock every file output for the life of the command (lock_output), so that no other
    command writes it meanwhile. Each argument maps a flag to a path (None: not given);
    `folders` are outputs that are folders; `derived`, the flags of outputs whose names the
    command made up (files.written_path: never written through a link)."""
    inputs = {k: Path(v) for k, v in (inputs or {}).items() if v is not None}
    wanted = [(k, Path(v), False) for k, v in outputs.items() if v is not None]
    wanted += [(k, Path(v), True) for k, v in (folders or {}).items() if v is not None]
    for i, (flag, path, is_folder) in enumerate(wanted):
        if is_folder and path.exists() and not path.is_dir():
            raise UserError(f"{flag} {path} is a file; a folder is wanted there")
        if not is_folder and path.is_dir():
            raise UserError(f"{flag} {path} is a folder; give a file name")
        if not is_folder and path.exists() and not path.is_file():
            # /dev/null, a FIFO, a socket, or a link to one: the atomic rename would replace it
            raise UserError(f"{flag} {path} is a device, a FIFO or a socket, not a file; "
                            f"give the name of a file")
        for in_flag, in_path in inputs.items():
            if same_file(path, in_path):
                raise UserError(f"{flag} {path} is also {in_flag}: writing it would destroy the "
                                f"input; choose another name")
            if not is_folder and in_path.is_dir() and _inside(path, in_path):
                raise UserError(f"{flag} {path} lies inside {in_flag} {in_path}, which is read; "
                                f"write it elsewhere")
        for other_flag, other, _ in wanted[:i]:
            if same_file(path, other):
                raise UserError(f"{flag} and {other_flag} are the same file ({path}); "
                                f"give them different names")
        if not is_folder:  # a link: written through only if named, and to a file of its kind
            written_path(path, flag in derived)
        folder = path if is_folder else (path.parent if str(path.parent) else Path("."))
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise UserError(f"{flag} {path}: a file stands where its folder should be") from None
        except OSError as e:
            raise UserError(f"{flag} {path}: cannot create its folder ({e.strerror})") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UserError(f"{flag} {path}: folder {folder} is not writable")
    files = [(flag, path) for flag, path, is_folder in wanted if not is_folder]
    for flag, path in files:  # its lock file is written and deleted: no input, no other output
        for in_flag, in_path in [*inputs.items(), *files]:
            if same_file(lock_path(path), in_path):
                raise UserError(f"{in_flag} {in_path} is the lock file of {flag} {path}; "
                                f"{'rename it first' if in_flag in inputs else 'give another name'}")
    for flag, path in files if lock else ():
        lock_output(path, flag)


def _inside(path: Path, folder: Path) -> bool:
    """Whether the file `path` names (links followed: it is written through) lies in `folder`."""
    return Path(os.path.realpath(folder)) in Path(os.path.realpath(path)).parents


_LOCKS = []  # (fd, lock path) held until release_locks(), which runs at exit


def lock_path(path) -> Path:
    """The lock file beside the file `path` names, links followed: two names of one file
    (a link and its target) share one lock."""
    path = Path(os.path.realpath(path))
    return path.with_name(f".{path.name}.lock")


def lock_output(path, flag: str = "--out") -> None:
    """Hold an exclusive lock on `path` for the life of this process, so that a second run
    writing the same file stops at once with one line instead of both saving over each other.
    The lock is a hidden file beside it; the kernel releases it if the process dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        return
    lock = lock_path(path)
    if any(same_file(lock, held) for _, held in _LOCKS):  # this process holds it already
        return
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise UserError(f"{flag} {path} is being written by another run"
                            + (f" (pid {holder})" if holder else "")
                            + "; wait for it or write elsewhere") from None
        # A finishing run deletes its lock file while holding it: make sure the file locked
        # is still the one at that path, or start over.
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _LOCKS.append((fd, lock))


@atexit.register
def release_locks() -> None:
    """Delete each lock file while still holding it, then let it go."""
    while _LOCKS:
        fd, lock = _LOCKS.pop()
        try:
            os.unlink(lock)
        except OSError:
            pass
        os.close(fd)


class Parser(argparse.ArgumentParser):
    def __init__(self, **kwargs):
        # No prefixes: '--eval' must not quietly mean '--eval-every-steps'
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message):  # argparse prints usage + message over two lines; keep it to one
        raise UserError(message)


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def add_field_flags(p: argparse.ArgumentParser, section, names=None) -> None:
    """One flag per field of a config section (a dataclass of config.py), named as the field
    (--max-steps is max_steps, --guidance-rule guidance_rule), with its type and its help,
    choices and range from the field's one declaration; each defaults to None (not given).
    `names`: only these fields."""
    for f in dataclasses.fields(section):
        if (names is None or f.name in names) and "help" in f.metadata:
            meta = f.metadata
            told = f" ({', '.join(meta['choices'])})" if "choices" in meta else ""
            told += f" in {range_text(*meta['range'])}" if "range" in meta else ""
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                           type=_flag_type(f), help=meta["help"] + told)


def _flag_type(f):
    """How a flag's text becomes the field's value: a number or text as the field's type, a
    path as one (input_path), a tuple as comma-separated items ('0.1,0.7')."""
    if "text" in f.metadata:
        return input_path
    if isinstance(f.default, tuple):
        def items(text: str):
            return parse_value(text, f.default)
        items.__name__ = "comma-separated list"  # argparse names the type in its error
        return items
    return type(f.default)


def field_values(a: argparse.Namespace, section, names=None) -> dict:
    """{field: value} of the add_field_flags flags that were given."""
    return {f.name: getattr(a, f.name) for f in dataclasses.fields(section)
            if (names is None or f.name in names) and getattr(a, f.name, None) is not None}


def add_sampler_flags(p: argparse.ArgumentParser) -> None:
    """The sampler options of the sampling and evaluation commands: every sample.* field (each
    defaults to the checkpoint's own), and two that are no field."""
    add_field_flags(p, SampleConfig)
    p.add_argument("--no-ema", action="store_true", help="sample with the raw, not EMA, weights")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay the network call as a CUDA graph (CUDA only; faster small batches)")


def parse_classes(text: str | None, names: tuple) -> list:
    """'0,3,7' -> [0, 3, 7]; 'circle,square' -> their labels; None -> every class."""
    if text is None:
        return list(range(len(names)))
    shown = text if len(text) <= 60 else text[:57] + "..."  # the error line stays one line
    return class_labels([s.strip() for s in text.split(",") if s.strip()], names,
                        f"--classes '{shown}'")


def parse_lora_specs(specs) -> list:
    """['a.pt', 'b.pt:0.3'] -> [('a.pt', 1.0), ('b.pt', 0.3)]. A ':' stays part of the path
    only when that whole path exists; the strength is checked by settings.check_strength."""
    out = []
    for spec in specs or []:
        if not spec.strip():
            raise UserError("--lora: an empty path; name an adapter file")
        path, scale = spec, 1.0
        head, sep, tail = spec.rpartition(":")
        if sep and head and not Path(spec).exists():
            try:
                path, scale = head, float(tail)
            except ValueError:
                raise UserError(f"--lora {spec}: the strength after ':' must be a number, "
                                f"not '{tail}'") from None
            check_strength(f"--lora {spec}", scale)
        out.append((path, scale))
    return out


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
    check_config(cfg)
    return cfg
