"""benchmarks/gpu_check.py's wiring: its dry run does every stage on the CPU with `tiny`."""
import json
import subprocess
import sys

from PIL import Image

from conftest import ROOT


def test_gpu_check_dry_run_fills_every_stage(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"),
                           "--out", str(out), "--work", str(tmp_path / "work"), "--dry-run"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + (out / "log.txt").read_text())[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [summary[f"stage{i}"]["exit_code"] for i in (1, 2, 3, 4)] == [0, 0, 0, 0]
    bench = summary["stage2"]
    for row in ("train tiny, fp32 eager", "train tiny, auto"):
        r = bench[row]
        assert r["images_per_s"] > 0
        # the derived columns follow from the measured rate
        assert abs(r["seconds_per_60k_epoch"] * r["images_per_s"] - 60000) < 1e-6 * 60000
        assert abs(r["train_tflops"] - r["train_gflop_per_image"] * r["images_per_s"] / 1e3) < 1e-9
    assert summary["stage3"]["steps"] > 0 and summary["stage4"]["steps"] == 6
    evaluation = json.loads((out / "reference_eval.json").read_text())
    assert evaluation["n"] == 20 and 0 <= evaluation["accuracy"] <= 1
    # two rows of ten digits (DDPM/DDIM and DPM-Solver++), 28 px each with 2 px padding
    assert Image.open(out / "shipped_grids.png").size == (10 * 30 + 2, 2 * 30 + 2)
    assert Image.open(out / "reference_grid.png").size == (10 * 30 + 2, 30 + 2)  # tiny at 28 px
    assert len(list((out / "runs_reference").glob("events.out.tfevents.*"))) == 1
    assert (out / "wide.pt").stat().st_size < 16 * 2 ** 20  # what the device tool brings back
    assert len([p for p in out.rglob("*") if p.is_file()]) <= 8
