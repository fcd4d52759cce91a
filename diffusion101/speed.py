"""The speed settings, apart from the loop: for training bf16 autocast, TF32, channels_last,
torch.compile (and CUDA graphs), the fused Adam update, the data kept on the GPU, and the
cross-attention's one-token shortcut; for sampling, the network call replayed as a CUDA graph.
None changes what a step computes beyond float rounding (bf16 and TF32 round more coarsely);
all off is plain fp32 eager PyTorch, the reference's way.
docs/BENCHMARKS.md has what each one buys.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .config import TrainConfig, UserError
from .cross_attn import CrossAttention


@dataclass
class Speed:
    """The train.* speed settings resolved for one device."""
    bf16: bool = False  # autocast the forward pass to bfloat16
    tf32: bool = False  # TF32 matmuls and convolutions (CUDA)
    channels_last: bool = False  # NHWC memory layout
    compile: bool = False  # torch.compile the network
    cuda_graphs: bool = False  # ... and replay it as CUDA graphs (compile mode reduce-overhead)
    fused_optimizer: bool = False  # one kernel for the whole Adam update (CUDA)
    data_on_device: bool = False  # the uint8 training set kept on the GPU
    one_token: bool = False  # skip the softmax over a single label token (OneTokenAttention)

    @classmethod
    def for_device(cls, recipe: TrainConfig, device: torch.device) -> "Speed":
        """'auto' means on for CUDA and off for a CPU, where bf16 matmuls are far slower than
        fp32. CUDA graphs only when asked (train.compile=graphs), and only on CUDA."""
        cuda = device.type == "cuda"
        if recipe.compile == "graphs" and not cuda:
            raise UserError(f"train.compile=graphs replays CUDA graphs and needs a CUDA device, "
                            f"not {device.type}; use train.compile=on or off here")

        def pick(value: str) -> bool:
            return cuda if value == "auto" else value == "on"

        return cls(bf16=recipe.precision == "bf16" or (recipe.precision == "auto" and cuda),
                   tf32=cuda and recipe.precision != "fp32",
                   channels_last=pick(recipe.channels_last),
                   compile=pick(recipe.compile) or recipe.compile == "graphs",
                   cuda_graphs=recipe.compile == "graphs",
                   fused_optimizer=pick(recipe.fused_optimizer),
                   data_on_device=cuda and pick(recipe.data_on_device),
                   one_token=pick(recipe.one_token_shortcut))

    def enabled(self) -> list:
        return [name for name, on in vars(self).items() if on]

    def setup(self) -> None:
        """The process-wide switches (TF32 is a global setting of torch's CUDA backends)."""
        if self.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """A batch in the network's memory layout."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def autocast(self, device_type: str):
        """The forward pass's precision: bf16 autocast, or nothing."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=torch.bfloat16)

    def network(self, net: nn.Module) -> nn.Module:
        """What the loop calls: the network with the one-token shortcut where asked, then
        torch.compile'd (with CUDA graphs: mode "reduce-overhead") where asked. The weights
        stay those of `net`, so checkpoints save the network's own names."""
        if self.one_token:
            use_one_token_shortcut(net)
        if not self.compile:
            return net
        return torch.compile(net, mode="reduce-overhead" if self.cuda_graphs else None)


def use_one_token_shortcut(net: nn.Module, on: bool = True) -> None:
    """Every CrossAttention of `net` made a OneTokenAttention (on) or back: the same module with
    the same weights, another forward."""
    for module in net.modules():
        if isinstance(module, CrossAttention):
            module.__class__ = OneTokenAttention if on else CrossAttention


class OneTokenAttention(CrossAttention):
    """CrossAttention, less the work a single label token makes moot. With one token each
    pixel's softmax runs over one key and is exactly 1, so the per-pixel query projection,
    Q K^T and the softmax can be skipped: the weights are ones, and `ones @ v` is the very
    product the full computation takes (the same bits, forward and backward; the tests compare
    the two). With more tokens it is CrossAttention itself."""

    def attend(self, pixels: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if context.shape[1] != 1:
            return super().attend(pixels, context)
        ones = pixels.new_ones(pixels.shape[0], pixels.shape[1], 1)  # the softmax over one key
        # A scalar of every weight of w_q and w_k (adapters included), times 0: they get the
        # zero gradient the full computation gives them, and stay in the graph, which
        # DistributedDataParallel asks of every parameter.
        unused = sum(p.sum() for p in self.w_q.parameters()) + self.w_k(context).sum()
        return ones @ (self.w_v(context) + 0.0 * unused)  # (B, HW, v)


class GraphedNetwork(nn.Module):
    """A network for sampling whose forward pass is captured as a CUDA graph the first time it
    sees an input shape, then replayed: one launch per call instead of one per kernel, which is
    what bounds a sampler's step at small batches on a GPU. Shapes are static: each call's
    inputs are copied into the captured ones and the captured output is copied out. CUDA
    only; it behaves as the network (cfg, null_label) to denoise.sample."""

    def __init__(self, net: nn.Module):
        super().__init__()
        if not next(net.parameters()).is_cuda:
            raise UserError("replaying the network as a CUDA graph (--cuda-graph) needs the "
                            "model on a CUDA device")
        self.net, self.cfg, self.null_label = net, net.cfg, getattr(net, "null_label", None)
        self.graphs = {}  # (shape of x, shape of t) -> (graph, its inputs, its output)

    def forward(self, x, t, y):
        key = (tuple(x.shape), tuple(t.shape))
        if key not in self.graphs:
            self.graphs[key] = self.capture(x, t, y)
        graph, inputs, out = self.graphs[key]
        for buffer, value in zip(inputs, (x, t, y)):
            buffer.copy_(value)
        graph.replay()
        return out.clone()

    def capture(self, x, t, y):
        inputs = [x.clone(), t.clone(), y.clone()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as capturing asks
            for _ in range(3):
                self.net(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.net(*inputs)
        return graph, inputs, out


def resolve_device(name: str | None) -> torch.device:
    """CUDA when available, else CPU; an explicit choice (--device, the API's device) wins, if
    this machine has it."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(name, str) or name not in ("cpu", "cuda"):
        raise UserError(f"unknown device {name!r} (use cpu or cuda)")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for, but no CUDA device is available")
    return torch.device(name)
