"""Wall time of the grid command as a user runs it (interpreter start, imports, model load,
sampling, writing the PNGs), for the default sampler and for the 1000-step DDPM, in one run:
the ratio says how much of the default command is overhead rather than sampling.

  python benchmarks/grid_command.py [--repeats 3]
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wall_seconds(*flags: str, repeats: int) -> list:
    """Seconds of `python scripts/denoise.py FLAGS` in a folder with no model.pt (so the
    shipped checkpoint), each run from a fresh interpreter."""
    times = []
    with tempfile.TemporaryDirectory() as work:
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, str(ROOT / "scripts" / "denoise.py"), "--out",
                            "grid.png", *flags], cwd=work, check=True, capture_output=True)
            times.append(time.perf_counter() - start)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=3, help="runs of the default command")
    a = p.parse_args()
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    import_torch = time.perf_counter() - start
    default = wall_seconds(repeats=a.repeats)
    ddpm = wall_seconds("--sampler", "ddpm", repeats=1)[0]
    median = statistics.median(default)
    print(f"python -c 'import torch': {import_torch:.2f} s")
    print(f"default grid command (DPM-Solver++ 20), median of {a.repeats}: {median:.2f} s "
          f"({', '.join(f'{t:.2f}' for t in default)})")
    print(f"1000-step DDPM grid command: {ddpm:.2f} s, {ddpm / median:.1f} times the default")


if __name__ == "__main__":
    main()
