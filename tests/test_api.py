"""The Python API (diffusion101/api.py): the same digits as the denoise job, checked inputs,
and the README's example run as written."""
import re
from pathlib import Path

import pytest
import torch

import diffusion101 as d
from diffusion101 import checkpoint
from diffusion101.config import UserError
from diffusion101.generate import Outputs, generate, load_for_sampling, resolve_sampler

from conftest import tiny_checkpoint


@pytest.fixture
def tiny_path(tmp_path):
    path = tmp_path / "model.pt"
    checkpoint.save(tiny_checkpoint(seed=3), path)
    return path


@pytest.mark.parametrize("options", [{}, {"sampler": "ddim", "steps": 5, "eta": 0.5}])
def test_sample_equals_the_denoise_job(tiny_path, tmp_path, options):
    model = d.load(tiny_path)
    images = d.sample(model, classes=[3, 7, 0], n=2, seed=11, **options)
    loaded = load_for_sampling(tiny_path, "cpu")
    job = generate(loaded, resolve_sampler(loaded.config, **options), [3, 7, 0], 2, 11,
                   Outputs(tmp_path / "grid.png"), log=lambda *a: None)
    assert images.shape == (6, 16, 16)
    assert torch.equal(images, ((job[:, 0] + 1) / 2).clamp(0, 1))


def test_options_reach_the_sampler_and_seed_matters(tiny_path):
    model = d.load(tiny_path)
    base = d.sample(model, classes=[5], seed=0)
    assert torch.equal(base, d.sample(model, classes=[5], seed=0))
    assert not torch.equal(base, d.sample(model, classes=[5], seed=1))
    assert not torch.equal(base, d.sample(model, classes=[5], seed=0, sampler="ddim", steps=4))


@pytest.mark.parametrize("kwargs, match", [
    ({"classes": [10]}, "no class of this model"), ({"classes": []}, "at least one class"),
    ({"classes": ["three"]}, "no class"), ({"classes": [True]}, "no class"),
    ({"classes": ["³"]}, "no class"), ({"n": 0}, "n must be"),
    ({"seed": -1}, "seed"), ({"steps": 0}, "sample.steps"),
    ({"guidance": float("nan")}, "sample.guidance"), ({"sampler": "euler"}, "sample.sampler"),
    ({"guidance_interval": 0.5}, "guidance_interval must be a pair"),
    ({"classes": {1: 2}}, "classes must be a label, a name or a list"),
    ({"classes": {1, 2}}, "classes must be"), ({"guidance": 2.0}, "null class"),
    ({"classes": b"12"}, "classes must be"), ({"classes": [torch.tensor([1])]}, "no class"),
    ({"classes": torch.tensor([[1]])}, "no class"), ({"classes": [0] * 1001}, "at most 1000"),
])
def test_bad_arguments_are_refused_in_one_line(tiny_path, kwargs, match):
    model = d.load(tiny_path)
    with pytest.raises(UserError, match=match):
        d.sample(model, **kwargs)


def test_every_argument_of_load_and_sample_is_checked_and_refused_as_a_user_error(tiny_path):
    # what the docs promise: a UserError (a ValueError) naming the argument, not whatever
    # error the code below happens to meet
    cases = [(dict(path=123), "is no path"), (dict(path=tiny_path, loras=[("a.pt",)]), "neither"),
             (dict(path=tiny_path, loras=[(1, 2)]), "neither"), (dict(path=tiny_path, loras=5), "a list"),
             (dict(path=tiny_path, use_ema="no"), "use_ema must be"),
             (dict(path=tiny_path, device="tpu"), "unknown device")]
    if not torch.cuda.is_available():
        cases.append((dict(path=tiny_path, device="cuda"), "no CUDA device"))
    for kwargs, match in cases:
        with pytest.raises(UserError, match=match):
            d.load(**kwargs)
    assert issubclass(UserError, ValueError)
    with pytest.raises(UserError, match="model must be what d.load"):
        d.sample(str(tiny_path))
    with pytest.raises(UserError, match="not found"):  # one adapter given as a path: one file
        d.load(tiny_path, loras=str(tiny_path.with_name("lora.pt")))


def test_adapters_without_a_path_go_onto_the_default_checkpoint(tmp_path, monkeypatch):
    from diffusion101.model_files import BOLD_LORA_PATH, SHIPPED_PATH
    monkeypatch.chdir(tmp_path)  # no model.pt here: the shipped checkpoint
    from diffusion101.model_files import STUDENT_PATH
    assert d.load().config == d.load(STUDENT_PATH).config  # the 4-step student, and with
    base, bold = d.load(SHIPPED_PATH), d.load(loras=[BOLD_LORA_PATH])  # adapters its teacher
    assert bold.config == base.config
    assert not torch.equal(d.sample(base, classes=[3]), d.sample(bold, classes=[3]))


def test_bad_lora_strength_and_missing_file_are_refused(tiny_path, tmp_path):
    with pytest.raises(UserError, match="strength"):
        d.load(tiny_path, loras=[(tmp_path / "a.pt", float("inf"))])
    with pytest.raises(UserError, match="not found"):
        d.load(tmp_path / "absent.pt")


def test_the_readme_example_runs():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)  # the example as a user would paste it
    images = scope["images"]
    assert images.shape == (8, 28, 28) and 0 <= images.min() and images.max() <= 1
    assert images.mean() < 0.5  # digits: white strokes on a mostly black background


def test_the_api_refuses_one_adapter_twice_and_an_empty_path(tmp_path, monkeypatch):
    from diffusion101.model_files import BOLD_LORA_PATH
    monkeypatch.chdir(BOLD_LORA_PATH.parent)
    with pytest.raises(UserError, match="one file given twice"):
        d.load(loras=[BOLD_LORA_PATH, ("./" + BOLD_LORA_PATH.name, 0.5)])
    with pytest.raises(UserError, match="empty path"):
        d.load("")


def test_a_model_of_named_rgb_classes_samples_by_name(tmp_path):
    from diffusion101.config import Config
    cfg = Config.from_dict(tiny_checkpoint()["config"])
    cfg.train.data, cfg.model.in_channels = "shapes", 3
    cfg.model.num_classes, cfg.model.class_names = 3, ("circle", "square", "triangle")
    from diffusion101.unet import UNet
    torch.manual_seed(0)
    checkpoint.save(checkpoint.model_file(cfg, "tiny", {"model": UNet(cfg.model).state_dict()}),
                    tmp_path / "shapes.safetensors")
    model = d.load(tmp_path / "shapes.safetensors")
    images = d.sample(model, classes=["triangle", 0], n=2, seed=3)
    assert images.shape == (4, 16, 16, 3) and 0 <= images.min() and images.max() <= 1
    assert torch.equal(images, d.sample(model, classes=[2, "circle"], n=2, seed=3))
    assert d.sample(model, seed=3).shape == (3, 16, 16, 3)  # every class by default
    one = d.sample(model, classes="square", seed=3)  # one name is one class, not its letters
    assert one.shape == (1, 16, 16, 3) and torch.equal(one, d.sample(model, classes=1, seed=3))
    assert torch.equal(one, d.sample(model, classes=[torch.tensor(1)], seed=3))
