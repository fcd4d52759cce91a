"""Memory estimates: what a network and a batch need, against what the device has, refused in
one line before anything is allocated."""
from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import torch

from .config import ModelConfig, UserError
from .networks import build_network


def parameter_count(m: ModelConfig) -> int:
    """The network's parameters, counted on the meta device, where nothing is allocated (once
    per architecture: every sampling request asks)."""
    return _parameter_count(dataclasses.astuple(m))


@functools.lru_cache(maxsize=32)
def _parameter_count(fields: tuple) -> int:
    with torch.device("meta"):  # (the network's own code counts, not a formula that could drift)
        return sum(p.numel() for p in build_network(ModelConfig(*fields)).parameters())


def activation_floats(m: ModelConfig, training: bool) -> int:
    """About how many floats one image keeps alive in the network a config names."""
    return ACTIVATIONS[m.backbone](m, training)


def dit_floats(m: ModelConfig, training: bool) -> int:
    """The transformer's: per block, each token's width through the norms, q, k, v, the
    attention's output and the 4x MLP (about twelve times the width), and each head's
    attention weights, token by token; training keeps every block's."""
    tokens = (m.img_size // m.patch_size) ** 2 + m.cond_tokens
    block = tokens * 12 * m.width + m.heads * tokens * tokens
    return 2 * m.depth * block if training else block + 2 * tokens * m.width


def unet_floats(m: ModelConfig, training: bool) -> int:
    """The UNet's: in training every block's
    maps, saved for the backward pass; in sampling the skip connections and the largest
    block's working maps. A block at a level of side r holds r^2 x (its channels in and out a
    few times over, the attention's queries and values, the feed-forward's width)."""
    sides = [m.img_size // 2 ** level for level in range(len(m.channels))]
    chs = [m.in_channels, *m.channels]
    blocks = [(sides[i], chs[i], chs[i + 1]) for i in range(len(m.channels))]  # encoder
    blocks += [(sides[i], 2 * chs[i + 1], chs[i + 1]) for i in range(len(m.channels) - 1)]
    work = [r * r * (c_in + 4 * c_out + m.q_dim + m.v_dim + m.ffn_dim) for r, c_in, c_out in blocks]
    if training:  # autograd keeps about twice the maps counted here (each norm's and
        return 2 * sum(work)  # activation's input too): checked against peak RSS, RELIABILITY.md
    return sum(r * r * c for r, _, c in blocks[:len(m.channels) - 1]) + max(work)


ACTIVATIONS = {"unet": unet_floats, "dit": dit_floats}


def device_memory(device) -> int:
    """Bytes of memory of the device: a GPU's own, or what this process may take on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return cpu_memory()


# Where cpu_memory reads the kernel's numbers (the tests point these at folders of their own)
PROC, CGROUP = Path("/proc"), Path("/sys/fs/cgroup")


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:  # not Linux, or no such controller here
        return ""


def _number(path: Path, key: str | None = None):
    """The integer in a kernel file (the one after `key`, in a file of 'key: value' lines), or
    None where the file, the key or a number is missing ('max': no limit)."""
    text = _text(path)
    if key is not None:
        text = next((line[len(key):] for line in text.splitlines() if line.startswith(key)), "")
    words = text.split()
    return int(words[0]) if words and words[0].isdigit() else None


def cpu_memory() -> int:
    """Bytes this process may still allocate on the CPU: the machine's available memory, or
    less where its cgroup (a container's limit, v1 or v2) or an address-space limit (ulimit
    -v) allows less. (A machine's total would admit what the kernel then kills unannounced.)"""
    import resource  # (Unix only)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    room = [total]
    available = _number(PROC / "meminfo", "MemAvailable:")
    if available is not None:
        room.append(available * 1024)
    groups = dict(line.split(":", 2)[1:] for line in _text(PROC / "self" / "cgroup").splitlines()
                  if line.count(":") >= 2)  # controller -> this process's group (v2: "")
    for folder, limit_file, usage_file in [
            (CGROUP / groups.get("", "/").lstrip("/"), "memory.max", "memory.current"),
            (CGROUP, "memory.max", "memory.current"),
            (CGROUP / "memory" / groups.get("memory", "/").lstrip("/"), "memory.limit_in_bytes",
             "memory.usage_in_bytes"),
            (CGROUP / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes")]:
        limit = _number(folder / limit_file)
        if limit is not None and limit < total:
            room.append(limit - (_number(folder / usage_file) or 0))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        room.append(soft - (_number(PROC / "self" / "status", "VmSize:") or 0) * 1024)
    return max(0, min(room))


def check_memory(m: ModelConfig, images: int, device, training: bool = False,
                 held: int = 0) -> None:
    """Refuse, with the number, a network and a batch of `images` that cannot fit the device's
    memory, before anything is allocated (a config with channels=8192,8192, a request for
    100,000 digits at once). Training keeps, per parameter, the weights, the gradient, Adam's
    two moments and the EMA; `held`: bytes already held on that device (the training set),
    added to a GPU's need (its total is compared), not to a CPU's (what is left is)."""
    params = parameter_count(m)
    floats = params * (5 if training else 1) + images * activation_floats(m, training)
    if torch.device(device).type == "cpu":  # taken already: cpu_memory() counts what is left
        held = 0
    what = f"training in batches of {images}" if training else f"sampling {images:,} images at once"
    check_fits(4 * floats + held, device, f"{what} with this network ({params:,} parameters, "
               f"{m.img_size} px{', beside the training set' if held else ''})",
               "ask for fewer images, or a smaller network")


def check_fits(need: int, device, what: str, advice: str) -> None:
    """Refuse what needs more bytes than the device has, in one line with both numbers."""
    have = device_memory(device)
    if need > have:
        where = "this process may take" if torch.device(device).type == "cpu" else "the device has"
        raise UserError(f"{what} needs about {need / 2 ** 30:,.1f} GiB; {where} "
                        f"{have / 2 ** 30:,.1f} GiB on the {device} device: {advice}")
