"""Writing files so that a crash never leaves half of one, and the crash tests' fault hooks."""
from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

from .config import UserError


def fault(name: str) -> str | None:
    """Fault injection for the crash tests: DIFFUSION101_FAULT=name[:arg] simulates a fault.
    Returns the argument ('' if none) when `name` is the fault asked for, else None."""
    spec = os.environ.get("DIFFUSION101_FAULT", "")
    key, _, arg = spec.partition(":")
    return arg if key == name else None


def same_file(a, b) -> bool:
    """Whether two paths name one file: the same path, ./ or ../ spellings, a link, a hard link."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        pass
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError):  # a loop of links (RuntimeError before Python 3.13)
        return os.path.abspath(a) == os.path.abspath(b)


class WriteRecorder:
    """The temporary file as a writer sees it. Every write goes through; an OSError it raises
    (a full disk, a quota) is kept, because some writers turn it into an error of their own
    that names no cause (torch.save: a RuntimeError, "unexpected pos"). The fault
    disk_full:N makes the disk full once N bytes are written, as a real one would be, in the
    middle of a writer's own code (disk_full alone: at 0 bytes)."""

    def __init__(self, f):
        self.file, self.error = f, None

    def write(self, data):
        try:
            full_at = fault("disk_full")
            if full_at is not None and self.file.tell() + len(data) > int(full_at or 0):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):  # seek, tell, flush, fileno...: the file's own
        return getattr(self.file, name)


def written_path(path, derived: bool = False) -> Path:
    """Where writing `path` lands. A link the user named is written through: the rename
    replaces the file it points to, never the link (which would leave that file stale, or, as
    root, turn /dev/stdout into a plain file), if that file is of the same kind (its suffix).
    A link whose name the command derived (a progress figure beside a grid, a pairs file, a
    snapshot), or one to a file of another kind, is refused: writing through it would replace
    a file nobody named as an output."""
    path = Path(path)
    if not path.is_symlink():
        return path
    target = Path(os.path.realpath(path))
    if derived:
        raise UserError(f"{path} is a link to {target}; that name is derived, not given, so "
                        f"nothing is written through it: remove the link or choose another name")
    if target.suffix.lower() != path.suffix.lower():
        raise UserError(f"{path} is a link to {target}, a file of another kind; writing a "
                        f"{path.suffix or 'file'} through it would replace it: choose another name")
    return target


def atomic_write(path, write_fn, derived: bool = False) -> None:
    """Write through write_fn(file) to a temporary file in the same folder, fsync, then
    os.replace: a crash at any point leaves either the old file or the new one, never half.
    A link is written through, or refused, as written_path says (`derived`: the command made
    the name up)."""
    path = written_path(path, derived)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"cannot save {path}: folder {folder} does not exist")
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            recorder = WriteRecorder(f)
            try:
                write_fn(recorder)
            except Exception:
                if recorder.error is None:
                    raise
                raise recorder.error from None  # the cause the writer's own error hid
            if recorder.error is not None:  # a writer that went on after a failed write
                raise recorder.error
            f.flush()
            os.fsync(f.fileno())
        if fault("kill_before_replace") is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not save {path}: {e.strerror or e}; "
                        f"the previous file, if any, is untouched") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # Persist the rename itself (the folder entry), where the platform allows it.
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
