"""dit.py: patches in and out exactly, adaLN-Zero blocks that start as the identity, the label
heard only through its tokens, LoRA on the transformer's attention, checkpoints, refusals."""
import dataclasses

import pytest
import torch

from diffusion101.dit import DiT, patchify, unpatchify
from diffusion101.lora import inject_lora, merge_lora, unmerge_lora
from diffusion101.networks import build_network
from diffusion101.presets import get_preset


def tiny_dit(**changes):
    """A few thousand parameters at 16 px: the tiny preset with the transformer."""
    m = get_preset("tiny").model
    fields = dict(backbone="dit", patch_size=4, width=32, depth=2, heads=4, cond_tokens=2,
                  null_class=True)
    return dataclasses.replace(m, **{**fields, **changes})


def _wake(model: DiT, seed: int = 0) -> DiT:
    """Random adaLN and output weights, as training leaves them (at initialisation they are
    zero, and every block is the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ada" in name or "patch_out" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("p", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("channels", [1, 3])
def test_patchify_and_unpatchify_are_inverses(p, channels):
    x = torch.randn(2, channels, 16, 16)
    tokens = patchify(x, p)
    assert tokens.shape == (2, (16 // p) ** 2, channels * p * p)
    assert torch.equal(unpatchify(tokens, p, channels), x)
    # token 0 is the top-left patch, channel-first; token 1 the patch right of it
    assert torch.equal(tokens[:, 0], x[:, :, :p, :p].reshape(2, -1))
    if p < 16:
        assert torch.equal(tokens[:, 1], x[:, :, :p, p:2 * p].reshape(2, -1))
    assert torch.equal(patchify(unpatchify(tokens, p, channels), p), tokens)


def test_adaln_zero_makes_every_block_the_identity_and_the_network_zero():
    torch.manual_seed(0)
    model = build_network(tiny_dit())
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([0.0, 40.0, 99.0]), torch.tensor([0, 5, 10])
    h, c = model.tokens(x, t, y)
    for block in model.blocks:
        assert torch.equal(block(h, c), h)
    assert torch.equal(model(x, t, y), torch.zeros_like(x))
    _wake(model)
    assert not torch.equal(model.blocks[0](h, c), h)  # the identity came from the zero gates


@pytest.mark.parametrize("p", [1, 2, 4, 8, 16])
def test_output_shape_and_dtype_for_every_patch_size_that_divides_the_image(p):
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        model = _wake(build_network(tiny_dit(patch_size=p, in_channels=3, num_classes=3,
                                             class_names=("a", "b", "c")))).to(dtype)
        x = torch.randn(2, 3, 16, 16, dtype=dtype)
        out = model(x, torch.tensor([3.0, 70.0], dtype=dtype), torch.tensor([0, 2]))
        assert out.shape == x.shape and out.dtype == dtype and torch.isfinite(out).all()


def test_the_label_reaches_the_output_only_through_its_tokens():
    torch.manual_seed(0)
    model = _wake(build_network(tiny_dit()))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([20.0, 80.0])
    three, five = torch.tensor([3, 3]), torch.tensor([5, 5])
    assert (model(x, t, three) - model(x, t, five)).abs().max() > 1e-4
    with torch.no_grad():  # the same tokens for both labels: the same output, bit for bit
        model.cls_emb.weight[5] = model.cls_emb.weight[3]
    assert torch.equal(model(x, t, three), model(x, t, five))
    share = model.attention_to_label(x, t, three)  # (B, depth, patches), a share of each row
    assert share.shape == (2, 2, 16) and ((share > 0) & (share < 1)).all()


def test_lora_injects_merges_and_unmerges_the_transformers_attention_exactly():
    torch.manual_seed(0)
    model = _wake(build_network(tiny_dit()))
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([10.0, 60.0]), torch.tensor([1, 7])
    base = model(x, t, y)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert inject_lora(model, r=4, alpha=4.0) == 3 * 2  # q, k, v in each of the two blocks
    assert torch.equal(model(x, t, y), base)  # B starts at zero: nothing changes
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.1)
    adapted = model(x, t, y)
    assert (adapted - base).abs().max() > 1e-4
    merge_lora(model)
    torch.testing.assert_close(model(x, t, y), adapted, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    for path, value in model.state_dict().items():
        key = path.replace(".base.", ".")
        if key in before:
            assert torch.equal(value, before[key]), path  # restored, not subtracted


@pytest.mark.parametrize("change, words", [
    (["model.patch_size=3"], "model.patch_size=3 must divide model.img_size=16"),
    (["model.width=30"], "model.width=30 must be divisible by model.heads=4"),
])
def test_a_transformer_the_image_or_the_heads_cannot_hold_is_refused_before_anything_is_written(
        tmp_path, capsys, change, words):
    from diffusion101.cli import run_cli
    from diffusion101.commands import train
    sets = [a for s in ["model.backbone=dit", "model.width=32", "model.heads=4", *change]
            for a in ("--set", s)]
    assert run_cli(train, ["--preset", "tiny", *sets, "--out", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {words}"] or (len(err) == 1 and words in err[0]), err
    assert list(tmp_path.iterdir()) == []


def _train_tiny_dit(path, fake_data, *sets):
    """A tiny DiT trained for 4 steps on fake digits, saved at `path`."""
    from diffusion101.settings import apply_override
    from diffusion101.train_run import train
    cfg = get_preset("tiny")
    for assignment in ("model.backbone=dit", "model.patch_size=4", "model.width=32",
                       "model.depth=2", "model.heads=4", "train.max_steps=4", *sets):
        apply_override(cfg, assignment)
    return train(cfg, "tiny", path, path.parent / "runs", "cpu", data=fake_data, log=lambda *a: None)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_dit_checkpoint_round_trips_and_is_rebuilt_from_its_config(tmp_path, fake_data, suffix):
    from diffusion101.model_files import export_for_sampling, load_model
    saved = _train_tiny_dit(tmp_path / "dit.pt", fake_data)
    export_for_sampling(tmp_path / "dit.pt", tmp_path / f"s{suffix}", log=lambda *a: None)
    model, _, cfg = load_model(tmp_path / f"s{suffix}")
    assert isinstance(model, DiT) and cfg.model.backbone == "dit" and cfg.model.depth == 2
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved["model"][name]), name
    assert set(model.state_dict()) == set(saved["model"])


def test_the_transformer_samples_fine_tunes_and_refuses_a_unets_adapter(tmp_path, fake_data):
    import diffusion101 as d
    from diffusion101.config import UserError
    from diffusion101.lora_finetune import finetune
    from conftest import tiny_checkpoint
    from diffusion101 import checkpoint
    _train_tiny_dit(tmp_path / "dit.pt", fake_data)
    finetune(tmp_path / "dit.pt", tmp_path / "dit_lora.pt", "cpu", lora={"max_steps": 3},
             data=fake_data, log=lambda *a: None)
    adapted = d.load(tmp_path / "dit.pt", loras=[(tmp_path / "dit_lora.pt", 1.0)])
    images = d.sample(adapted, classes=[1, 2], n=1, sampler="ddim", steps=4)
    assert images.shape == (2, 16, 16) and torch.isfinite(images).all()
    checkpoint.save(tiny_checkpoint(), tmp_path / "unet.pt")
    finetune(tmp_path / "unet.pt", tmp_path / "unet_lora.pt", "cpu", lora={"max_steps": 2},
             data=fake_data, log=lambda *a: None)
    with pytest.raises(UserError, match="adapts a unet and this base is a dit"):
        d.load(tmp_path / "dit.pt", loras=[(tmp_path / "unet_lora.pt", 1.0)])
    with pytest.raises(UserError, match="adapts a dit and this base is a unet"):
        d.load(tmp_path / "unet.pt", loras=[(tmp_path / "dit_lora.pt", 1.0)])


def test_the_unets_are_built_as_before():
    """The network seam builds the UNet a config names bit for bit as the UNet class does."""
    from diffusion101.unet import UNet
    for preset in ("tiny", "cpu", "cpu-ddpm"):
        m = get_preset(preset).model
        torch.manual_seed(0)
        direct = UNet(m).state_dict()
        torch.manual_seed(0)
        built = build_network(m)
        assert type(built) is UNet and all(torch.equal(v, direct[k]) for k, v in built.state_dict().items())


def test_a_dit_exports_to_onnx_and_the_graph_computes_what_it_does(tmp_path, fake_data):
    pytest.importorskip("onnxruntime")
    from diffusion101.model_files import export_for_sampling, load_model
    from diffusion101.onnx_export import OnnxNetwork
    _train_tiny_dit(tmp_path / "dit.pt", fake_data)
    export_for_sampling(tmp_path / "dit.pt", tmp_path / "dit.onnx", log=lambda *a: None)
    model, _, cfg = load_model(tmp_path / "dit.pt")
    net = OnnxNetwork(tmp_path / "dit.onnx")
    g = torch.Generator().manual_seed(0)
    for n in (1, 5):  # any batch
        x, t = torch.randn(n, 1, 16, 16, generator=g), torch.rand(n, generator=g) * 99
        y = torch.randint(0, 10, (n,), generator=g)
        with torch.no_grad():
            expected = model.eval()(x, t, y)
        assert (net(x, t, y) - expected).abs().max() < 1e-4  # two libraries' fp32 sums


def test_a_dit_teacher_distils_into_a_dit_student_and_both_are_scored(tmp_path, fake_data):
    """Distillation and evaluation take the transformer with no option of their own."""
    from diffusion101 import checkpoint
    from diffusion101.distill import Recipe, distill
    from diffusion101.evaluate import evaluate_model
    from diffusion101.model_files import load_model
    _train_tiny_dit(tmp_path / "t.pt", fake_data, "diffusion.objective=flow", "diffusion.clip=none",
                    "sample.sampler=euler", "sample.steps=4")
    student = distill(tmp_path / "t.pt", tmp_path / "s.pt", "cpu",
                      Recipe(steps=2, pairs=16, max_steps=3, batch_size=8),
                      logdir=tmp_path / "r", log=lambda *a: None)
    cfg = checkpoint.config_of(student)
    assert cfg.model.backbone == "dit" and (cfg.sample.sampler, cfg.sample.steps) == ("euler", 2)
    model, _, _ = load_model(tmp_path / "s.pt")
    metrics = evaluate_model(model.eval(), cfg, n=10, device="cpu", seed=0)
    assert 0 <= metrics["accuracy"] <= 1 and metrics["fid"] >= 0
