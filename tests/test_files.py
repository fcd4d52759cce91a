"""Atomic writes: a disk that fills in the middle of any writer (torch's, numpy's zip,
Pillow's PNG, safetensors) is one line naming the cause, the previous file untouched and no
temporary file left; torch.save, which turns the OSError into a RuntimeError of its own, too."""
import io

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from diffusion101.config import UserError
from diffusion101.files import WriteRecorder, atomic_write

WRITERS = {
    "torch.save": lambda f: torch.save({"w": torch.arange(50_000.0)}, f),
    "np.savez": lambda f: np.savez(f, images=np.zeros((20, 28, 28), np.uint8)),
    "PNG": lambda f: Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200),
                                                                       dtype=np.uint8)).save(f, format="PNG"),
    "safetensors": lambda f: f.write(safetensors.torch.save({"w": torch.arange(50_000.0)})),
}


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("full_at", ["", "100", "5000"])  # bytes written before the disk fills
def test_a_disk_that_fills_mid_write_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch,
                                                                         writer, full_at):
    path = tmp_path / "out.bin"
    path.write_bytes(b"the previous file")
    monkeypatch.setenv("DIFFUSION101_FAULT", f"disk_full:{full_at}")
    with pytest.raises(UserError, match=r"^could not save .*out\.bin: No space left on device; "
                                        r"the previous file, if any, is untouched$"):
        atomic_write(path, WRITERS[writer])
    assert path.read_bytes() == b"the previous file"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_torch_save_hides_the_cause_that_the_recorder_keeps(tmp_path, monkeypatch):
    """What the recorder is for: torch.save turns the full disk into its own RuntimeError."""
    monkeypatch.setenv("DIFFUSION101_FAULT", "disk_full:100")
    with open(tmp_path / "raw.pt", "wb") as f:
        recorder = WriteRecorder(f)
        with pytest.raises(RuntimeError) as e:
            torch.save({"w": torch.zeros(1000)}, recorder)
    assert "No space" not in str(e.value) and recorder.error.strerror == "No space left on device"


def test_every_writer_writes_whole_without_a_fault(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFUSION101_FAULT", raising=False)
    for name, write in WRITERS.items():
        atomic_write(tmp_path / name, write)
        expected = io.BytesIO()
        write(expected)
        if name != "np.savez":  # (zip entries carry a time stamp)
            assert (tmp_path / name).read_bytes() == expected.getvalue(), name
    assert torch.equal(torch.load(tmp_path / "torch.save", weights_only=True)["w"],
                       torch.arange(50_000.0))
    assert np.load(tmp_path / "np.savez")["images"].shape == (20, 28, 28)
