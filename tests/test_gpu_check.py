"""benchmarks/gpu_check.py's wiring: its dry run does every stage on the CPU with `tiny`, in
order, each inside the limit drawn from the one deadline."""
import json
import subprocess
import sys

import pytest
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
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check
    limits = gpu_check.LIMITS["dry"]
    assert sum(summary[f"stage{i}"]["seconds"] for i in (1, 2, 3, 4)) <= gpu_check.TOTAL["dry"]
    for i in (1, 2, 3):
        assert summary[f"stage{i}"]["seconds"] <= limits[i], i
    bench = summary["stage2"]
    rows = {mode: bench[f"train tiny, {mode}"] for mode, _ in gpu_check.training_modes(True)}
    assert len(rows) == 4  # graphs and auto, each with the one-token shortcut on and off
    for r in rows.values():
        assert r["images_per_s"] > 0
        # the derived columns follow from the measured rate
        assert abs(r["seconds_per_60k_epoch"] * r["images_per_s"] - 60000) < 1e-6 * 60000
        assert abs(r["train_tflops"] - r["train_gflop_per_image"] * r["images_per_s"] / 1e3) < 1e-9
    # stage 3 trains in the fastest setting stage 2 measured, for its limit less the reserve
    fastest = max(rows, key=lambda mode: rows[mode]["images_per_s"])
    assert summary["stage3"]["setting"] == fastest
    assert summary["stage3"]["options"] == rows[fastest]["options"]
    assert summary["stage3"]["train_seconds_budget"] == pytest.approx(
        limits[3] - gpu_check.RESERVE["dry"], abs=0.2)
    assert summary["stage3"]["steps"] > 0 and summary["stage4"]["steps"] == 6
    evaluation = json.loads((out / "reference_eval.json").read_text())
    assert evaluation["n"] == 20 and 0 <= evaluation["accuracy"] <= 1
    # two rows of ten digits (the DDPM, eager and replayed; on a CPU a DDIM, eager twice)
    assert Image.open(out / "shipped_grids.png").size == (10 * 30 + 2, 2 * 30 + 2)
    assert Image.open(out / "reference_grid.png").size == (10 * 30 + 2, 10 * 30 + 2)  # 10 x 10
    assert len(list((out / "runs_reference").glob("events.out.tfevents.*"))) == 1
    assert (out / "wide.pt").stat().st_size < 16 * 2 ** 20  # what the device tool brings back
    assert len([p for p in out.rglob("*") if p.is_file()]) <= 8
