"""What the commands share: their flags and how they are read (config overrides, sampler
options, classes, adapters), output-path checks, the one-writer lock, the device, and one-line
errors instead of tracebacks. The commands themselves are in commands.py."""
from __future__ import annotations

import argparse
import atexit
import os
import signal
import sys
from pathlib import Path

import torch

from .config import SEED_MAX, Config, UserError, get_preset
from .files import same_file
from .settings import apply_override, check_range, check_strength, class_labels, validate


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that `finally` blocks and the atomic writer
    remove their temporary files as they do on Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated()


def run_cli(main, argv=None) -> int:
    """Run main(argv); a UserError (or a bad flag) becomes one line on stderr and exit code 2."""
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (a test calling main() from a worker)
        pass
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; files already saved are intact", file=sys.stderr)
        return 130
    except Terminated:
        print("error: terminated; files already saved are intact", file=sys.stderr)
        return 143
    return 0


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
    """A file to write: not empty, and not a folder ('out/', '.', '..')."""
    input_path(text)
    if text.endswith(("/", os.sep)) or (os.altsep and text.endswith(os.altsep)) \
            or Path(text).name in ("", ".", ".."):
        raise argparse.ArgumentTypeError(f"'{text}' names a folder; give a file name")
    return text


def check_outputs(outputs: dict, inputs: dict | None = None, folders: dict | None = None) -> None:
    """Refuse, before any work, output paths that cannot be used: a file output that is one of
    the inputs (under any name), two outputs that are one file, a folder where a file is
    wanted (or the reverse), a folder that cannot be created or written. Each argument maps a
    flag to a path (None: not given); `folders` are outputs that are folders."""
    inputs = {k: Path(v) for k, v in (inputs or {}).items() if v is not None}
    wanted = [(k, Path(v), False) for k, v in outputs.items() if v is not None]
    wanted += [(k, Path(v), True) for k, v in (folders or {}).items() if v is not None]
    for i, (flag, path, is_folder) in enumerate(wanted):
        if is_folder and path.exists() and not path.is_dir():
            raise UserError(f"{flag} {path} is a file; a folder is wanted there")
        if not is_folder and path.is_dir():
            raise UserError(f"{flag} {path} is a folder; give a file name")
        for in_flag, in_path in inputs.items():
            if same_file(path, in_path):
                raise UserError(f"{flag} {path} is also {in_flag}: writing it would destroy the "
                                f"input; choose another name")
        for other_flag, other, _ in wanted[:i]:
            if same_file(path, other):
                raise UserError(f"{flag} and {other_flag} are the same file ({path}); "
                                f"give them different names")
        folder = path if is_folder else (path.parent if str(path.parent) else Path("."))
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise UserError(f"{flag} {path}: a file stands where its folder should be") from None
        except OSError as e:
            raise UserError(f"{flag} {path}: cannot create its folder ({e.strerror})") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UserError(f"{flag} {path}: folder {folder} is not writable")


_LOCKS = []  # (fd, lock path) held until release_locks(), which runs at exit


def lock_output(path, flag: str = "--out") -> None:
    """Hold an exclusive lock on `path` for the life of this process, so that a second run
    writing the same file stops at once with one line instead of both saving over each other.
    The lock is a hidden file beside it; the kernel releases it if the process dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        return
    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
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


def add_sampler_flags(p: argparse.ArgumentParser) -> None:
    """The sampler options of denoise.py and evaluate.py (config.SampleConfig; each defaults to
    the checkpoint's own)."""
    p.add_argument("--sampler", default=None,
                   help="ddpm, ddim or dpm; euler or heun for a flow model (default: the checkpoint's)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (ddpm: all of them)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale w")
    p.add_argument("--guidance-rule", default=None,
                   help="how guidance combines the predictions: cfg, apg or auto (denoise.py)")
    p.add_argument("--apg-eta", type=float, default=None,
                   help="apg: weight of the part parallel to the conditional x_0 (1: cfg)")
    p.add_argument("--apg-momentum", type=float, default=None, help="apg: momentum, e.g. -0.5")
    p.add_argument("--apg-threshold", type=float, default=None,
                   help="apg: largest norm of the guidance term per image (0: none)")
    p.add_argument("--guide", default=None, type=input_path,
                   help="auto: the guide checkpoint, a weaker model of the same data")
    p.add_argument("--guide-cfg", type=float, default=None,
                   help="auto: scale of a classifier-free term beside it (1: none)")
    p.add_argument("--guidance-interval", default=None, metavar="LO,HI",
                   help="guide only while t/T is in [LO, HI] (default: the checkpoint's)")
    p.add_argument("--eta", type=float, default=None, help="DDIM noise (0: deterministic)")
    p.add_argument("--shift", type=float, default=None, help="flow: SD3's time shift of the grid")
    p.add_argument("--timestep-spacing", default=None,
                   help="timesteps of a few-step sampler: uniform, logsnr or trailing")
    p.add_argument("--no-ema", action="store_true", help="sample with the raw, not EMA, weights")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay the network call as a CUDA graph (CUDA only; faster small batches)")


def sampler_options(a: argparse.Namespace) -> dict:
    """The flags of add_sampler_flags as options for generate.resolve_sampler."""
    return {"sampler": a.sampler, "steps": a.steps, "guidance": a.guidance,
            "guidance_rule": a.guidance_rule, "apg_eta": a.apg_eta, "apg_momentum": a.apg_momentum,
            "apg_norm_threshold": a.apg_threshold, "guide": a.guide, "guide_cfg": a.guide_cfg, "eta": a.eta,
            "shift": a.shift,
            "guidance_interval": parse_interval(a.guidance_interval),
            "timestep_spacing": a.timestep_spacing}


def parse_interval(text):
    """'0.1,0.7' -> (0.1, 0.7); None stays None (the checkpoint's default)."""
    if text is None:
        return None
    try:
        lo, hi = (float(s) for s in text.split(","))
    except ValueError:
        raise UserError(f"--guidance-interval '{text}' is not two numbers LO,HI") from None
    return lo, hi


def parse_classes(text: str | None, names: tuple) -> list:
    """'0,3,7' -> [0, 3, 7]; 'circle,square' -> their labels; None -> every class."""
    if text is None:
        return list(range(len(names)))
    return class_labels([s.strip() for s in text.split(",") if s.strip()], names,
                        f"--classes '{text}'")


def parse_lora_specs(specs) -> list:
    """['a.pt', 'b.pt:0.3'] -> [('a.pt', 1.0), ('b.pt', 0.3)]. A ':' stays part of the path
    only when that whole path exists; the strength is checked by config.check_strength."""
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
    validate(cfg)
    return cfg
