"""ONNX export: the graph computes what the network computes, for any batch, alone and along
whole walks (the student's 4 steps, the teacher's guided Euler steps), for every objective."""
import json

import pytest
import torch

from conftest import tiny_checkpoint
from diffusion101 import checkpoint, commands, denoise, onnx_export
from diffusion101.config import UserError
from diffusion101.model_files import FLOW_PATH, STUDENT_PATH, load_model

# fp32 kernels of two libraries sum in different orders: the outputs (of order 1) agree to
# about 1e-5; the bound for the page is 1e-4.
TOLERANCE = 1e-4


def _random_inputs(cfg, n, generator, integer_times=False):
    m = cfg.model
    x = torch.randn(n, m.in_channels, m.img_size, m.img_size, generator=generator)
    t = torch.randint(0, cfg.diffusion.timesteps, (n,), generator=generator)
    t = t if integer_times else torch.rand(n, generator=generator) * (cfg.diffusion.timesteps - 1)
    y = torch.randint(0, m.num_classes + int(m.null_class), (n,), generator=generator)  # + null
    return x, t, y


@pytest.mark.parametrize("panel,path", [("student", STUDENT_PATH), ("teacher", FLOW_PATH)])
def test_the_graph_matches_the_network_for_any_batch(demo_page, panel, path):
    model, _, cfg = load_model(path)
    model.eval()
    net = onnx_export.OnnxNetwork(demo_page / "models" / f"{panel}.onnx")
    assert net.config.to_dict() == cfg.to_dict() and net.null_label == cfg.model.num_classes
    g = torch.Generator().manual_seed(1)
    for n in (1, 3, 20):  # exported at a batch of 2: the batch is dynamic
        x, t, y = _random_inputs(cfg, n, g)
        with torch.no_grad():
            expected = model(x, t, y)
        got = net(x, t, y)
        assert got.shape == expected.shape and got.dtype == torch.float32
        assert (got - expected).abs().max() < TOLERANCE


@pytest.mark.parametrize("panel,path,guidance", [("student", STUDENT_PATH, None),
                                                 ("teacher", FLOW_PATH, 1.75)])
def test_a_whole_walk_matches(demo_page, panel, path, guidance):
    """denoise.sample drives both: the same loop, guidance batched, the same x_T."""
    model, _, cfg = load_model(path)
    model.eval()
    net = onnx_export.OnnxNetwork(demo_page / "models" / f"{panel}.onnx")
    sample_cfg = cfg.sample
    if guidance is not None:  # the page's teacher panel: a few Euler steps, guided
        sample_cfg.sampler, sample_cfg.steps, sample_cfg.guidance = "euler", 4, guidance
    labels = torch.arange(10)
    start = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    walks = []
    for network in (model, net):
        sampler = denoise.make_sampler(sample_cfg, cfg.diffusion)
        walks.append(denoise.sample(network, sampler, labels, sample_cfg, start=start,
                                    n_frames=sample_cfg.steps)[1])
    assert walks[0].shape[1] == 4
    assert (walks[0] - walks[1]).abs().max() < TOLERANCE  # at every step, not only the end
    assert (walks[0][:, -1] - start).abs().mean() > 0.5  # the walk went somewhere


def test_the_export_command_writes_any_objective(tmp_path):
    """A DDPM checkpoint (integer timesteps, noise prediction; the `tiny` preset, one label
    token, the reference's block) through the command itself."""
    src, out = tmp_path / "tiny.pt", tmp_path / "ddpm.ONNX"  # any case of the suffix
    checkpoint.save(tiny_checkpoint(0), src)
    commands.export([str(src), str(out)])
    model, _, cfg = load_model(src)
    model.eval()
    net = onnx_export.OnnxNetwork(out)
    assert net.config.diffusion.objective == "ddpm"
    x, t, y = _random_inputs(cfg, 5, torch.Generator().manual_seed(3), integer_times=True)
    with torch.no_grad():
        assert (net(x, t, y) - model(x, t, y)).abs().max() < TOLERANCE
    meta = net.session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["diffusion101.preset"]) == "tiny"
    with pytest.raises(UserError, match="only change sampler defaults"):  # nothing written
        commands.export([str(src), str(tmp_path / "x.onnx"), "--set", "model.norm=group"])
    assert not (tmp_path / "x.onnx").exists()


def test_a_graph_not_ours_and_a_missing_extra_are_one_line(tmp_path, monkeypatch):
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["out"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), tmp_path / "other.onnx")
    with pytest.raises(UserError, match="not an ONNX graph exported by Diffusion-101"):
        onnx_export.OnnxNetwork(tmp_path / "other.onnx")
    (tmp_path / "cut.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(UserError, match="cannot be read as ONNX"):
        onnx_export.OnnxNetwork(tmp_path / "cut.onnx")
    monkeypatch.setitem(__import__("sys").modules, "onnxscript", None)  # as if not installed
    with pytest.raises(UserError, match=r"pip install 'diffusion101\[onnx\]'"):
        commands.export([str(STUDENT_PATH), str(tmp_path / "s.onnx")])
    assert not (tmp_path / "s.onnx").exists()
