"""Ctrl-C at every moment of a training run: start-up, the steps, the saves, the last grid and
the final save (round four's mechanism 11). One run is timed uninterrupted; then SIGINT is
sent at delays spread over that time and a little past it, and each row says the exit code,
how long the process took to end after the signal, its last line on stderr, and the step the
saved file holds. Any row where the process outlived the signal by more than --grace seconds,
or ended 0 while the signal came before its end, is marked.

  python benchmarks/ctrl_c_sweep.py --points 40          # tiny preset, 300 steps
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--preset", "tiny", "--max-steps", "300", "--epochs", "5", "--save-every", "50",
        "--out", "int.pt", "--logdir", "runs"]


def once(cwd: Path, after: float | None):
    """(exit code, seconds from the signal to the exit, last stderr line, saved step)."""
    (cwd / "int.pt").unlink(missing_ok=True)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), *ARGS], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    sent = None
    if after is not None:
        time.sleep(after)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            sent = time.perf_counter()
    _, err = proc.communicate()
    end = time.perf_counter()
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and "it/s" not in ln and "s/it" not in ln]
    saved = torch.load(cwd / "int.pt", weights_only=True)["step"] if (cwd / "int.pt").exists() else None
    return proc.returncode, (None if sent is None else end - sent), (lines[-1] if lines else ""), \
        saved, end - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=40)
    p.add_argument("--grace", type=float, default=5.0)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        code, _, line, saved, whole = once(cwd, None)
        print(f"uninterrupted: exit {code}, {whole:.1f} s, saved step {saved}, last line: {line}")
        print("| SIGINT after (s) | exit | ended after the signal (s) | saved step | last line | |")
        print("|---|---|---|---|---|---|")
        bad = 0
        for k in range(a.points):
            after = (whole + 1.0) * k / (a.points - 1)
            code, lag, line, saved, _ = once(cwd, after)
            wrong = lag is not None and (lag > a.grace or code == 0)
            bad += wrong
            print(f"| {after:.2f} | {code} | {'-' if lag is None else f'{lag:.2f}'} | {saved} | "
                  f"{line[:90]} | {'**swallowed or slow**' if wrong else ''} |")
        print(f"{bad} of {a.points} rows wrong")
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
