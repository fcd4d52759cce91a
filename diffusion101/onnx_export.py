"""ONNX: a model file's network as an ONNX graph, and that graph run by onnxruntime as a network
the sampling loop takes. The demo page (web.py) runs the same files in a browser.

The graph is the network's forward and nothing else: (x, t, y) -> out, where x is the noisy
batch (B, C, S, S) float32, t the time on the scale the network reads (the objective's
net_time: DDPM's timestep, or flow's t times timesteps - 1) as (B,) float32, y the labels (B,)
int64, and out what the network predicts. The batch is dynamic, so one graph serves one digit,
ten, or a guided batch of twenty (labels and null labels). The walk (the sampler, guidance)
stays outside, in Python (denoise.py) or in the page's JavaScript. The file's metadata carries
the model file's config and preset as JSON, so a graph says what it was exported from.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import warnings
from pathlib import Path

import torch

from .config import Config, UserError
from .files import atomic_write

ONNX_SUFFIX = ".onnx"
# Opset 18: what torch's exporter writes natively, and onnxruntime-web 1.31 runs it.
OPSET = 18
EXTRA_HINT = "pip install 'diffusion101[onnx]'"


def is_onnx(path) -> bool:
    return Path(path).suffix.lower() == ONNX_SUFFIX


def require(module: str):
    """An optional dependency of the [onnx] extra, imported on first use, or one line saying
    how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"ONNX export and runtime need the package '{module}': "
                        f"{EXTRA_HINT}") from None


def export_onnx(model: torch.nn.Module, cfg: Config, preset, path) -> None:
    """Write `model`'s forward as an ONNX graph at `path` (atomically), with a dynamic batch and
    the config in its metadata. Uses torch's exporter (torch.export, then onnxscript)."""
    require("onnxscript")  # torch.onnx.export(dynamo=True) builds the graph with it
    onnx = require("onnx")
    model = model.eval()
    m = cfg.model
    # A batch of 2 as the example: a batch of 1 would be specialised away by torch.export.
    # (A network with an interval input takes two numbers per image: the time and t - r.)
    times = torch.zeros((2, 2) if m.interval_input else (2,))
    example = (torch.zeros(2, m.in_channels, m.img_size, m.img_size), times,
               torch.zeros(2, dtype=torch.long))
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        # the exporter reports its stages on stdout, and warns of axis names it merged
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, example, dynamo=True, opset_version=OPSET, input_names=["x", "t", "y"],
            output_names=["out"], dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
    proto = program.model_proto
    # The exporter's notes for debugging (each node's Python stack trace, the shapes between
    # nodes, which onnxruntime infers again) are an eighth of the file: a page downloads it.
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del proto.graph.value_info[:]
    onnx.helper.set_model_props(proto, {"diffusion101.config": json.dumps(cfg.to_dict()),
                                        "diffusion101.preset": json.dumps(preset)})
    data = proto.SerializeToString()
    atomic_write(path, lambda f: f.write(data))


class OnnxNetwork:
    """An exported graph under onnxruntime, called as the UNet is (net(x, t, y) -> tensor),
    with the .cfg and .null_label the sampling loop reads, and .config, the whole Config."""

    def __init__(self, path, threads: int = 1):
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only: its warnings are about graph fusions
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=["CPUExecutionProvider"])
            meta = self.session.get_modelmeta().custom_metadata_map
            self.config = Config.from_dict(json.loads(meta["diffusion101.config"]))
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(f"{path} is not an ONNX graph exported by Diffusion-101 ({e})") from None
        except Exception as e:  # onnxruntime's own errors have no common base class
            raise UserError(f"{path} cannot be read as ONNX: {str(e).splitlines()[0][:160]}") from None
        self.cfg = self.config.model
        self.null_label = self.cfg.num_classes if self.cfg.null_class else None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        feed = {"x": x.float().cpu().numpy(), "t": t.float().cpu().numpy(),
                "y": y.long().cpu().numpy()}
        return torch.from_numpy(self.session.run(None, feed)[0]).to(x.device)
