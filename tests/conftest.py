import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffusion101.dataset import ImageData  # noqa: E402


def load_script(name: str):
    """Import scripts/<name>.py as a module, to call its main() in-process."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, *args, cwd, env_extra=None, check=True, fault=None):
    """Run scripts/<name>.py in a fresh interpreter, as a user would; with fault (such as
    'kill_after_step:7'), the training command through tests/with_fault.py instead."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    if fault is None:
        command = [str(ROOT / "scripts" / f"{name}.py")]
    else:
        assert name == "train", "the loop's faults are faults of training"
        command = [str(ROOT / "tests" / "with_fault.py"), fault, "train"]
    proc = subprocess.run([sys.executable, *command, *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def tiny_checkpoint(seed=0) -> dict:
    """A model.pt's contents for the `tiny` preset with weights drawn from `seed`."""
    from diffusion101 import checkpoint
    from diffusion101.presets import get_preset
    from diffusion101.unet import UNet
    torch.manual_seed(seed)
    cfg = get_preset("tiny")
    return checkpoint.model_file(cfg, "tiny", {"model": UNet(cfg.model).state_dict(),
                                               "epoch": 1, "step": 3})


def one_token_unet_output_and_grads(shortcut: bool, device) -> list:
    """The `tiny` UNet (one label token, as the reference) on a fixed batch: its output and
    every parameter's gradient of a squared loss, with the attention's one-token shortcut on
    or off."""
    from diffusion101.presets import get_preset
    from diffusion101.speed import use_one_token_shortcut
    from diffusion101.unet import UNet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 16, 16, generator=g).to(device)
    t, y = torch.tensor([1, 30, 60, 99], device=device), torch.arange(4, device=device)
    torch.manual_seed(0)
    model = UNet(get_preset("tiny").model).to(device)
    use_one_token_shortcut(model, shortcut)
    out = model(x, t, y)
    out.square().mean().backward()
    return [out.detach(), *(p.grad.clone() for p in model.parameters())]


@pytest.fixture
def fake_data():
    """256 random 16x16 'digits' with labels: enough for a few tiny training steps, no MNIST load."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (256, 16, 16), generator=g, dtype=torch.uint8)
    return ImageData(images, torch.arange(256) % 10)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state, so a float32 tolerance that holds
    once holds on every run (an unseeded closed-form check failed 1 run in ~25)."""
    torch.manual_seed(0)


def sampler_by_name(name: str, cfg, steps=None, eta: float = 0.0, timestep_spacing="uniform",
                    device="cpu"):
    """diffusion.make_sampler from a sampler's name and settings (every timestep when steps
    is None)."""
    from diffusion101.config import SampleConfig
    from diffusion101.denoise import make_sampler
    sample_cfg = SampleConfig(sampler=name, steps=cfg.timesteps if steps is None else steps,
                              eta=eta, timestep_spacing=timestep_spacing)
    return make_sampler(sample_cfg, cfg, device)


@pytest.fixture(scope="session")
def demo_page(tmp_path_factory):
    """The demo page built once for the session (web.build_page: the shipped student and flow
    model exported to ONNX, onnxruntime-web from the npm registry or the cache)."""
    from diffusion101 import web
    folder = tmp_path_factory.mktemp("page") / "demo"
    web.build_page(folder, log=lambda *a: None)
    return folder
