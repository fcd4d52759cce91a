"""Model files: a network rebuilt from a checkpoint's own config and weights, the converter for
the reference's pickles, the small export for sampling, and which checkpoint a command uses."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import (config_of, load_model_checkpoint, load_state, model_file, save,
                         sampling_weights)
from .config import UserError
from .presets import get_preset
from .denoise import check_config
from .onnx_export import export_onnx, is_onnx
from .memory import parameter_count
from .networks import build_network
from .settings import apply_override


def load_model(path, device="cpu"):
    """Rebuild the network from a checkpoint's own config and weights. Returns (model, ckpt, cfg)."""
    ckpt = load_model_checkpoint(path)
    cfg = config_of(ckpt)
    # Count before allocating: a small file whose config asks for a huge network is refused
    # here, not after the network has taken the machine's memory.
    needed, held = parameter_count(cfg.model), sum(v.numel() for v in ckpt["model"].values())
    if held < needed:
        raise UserError(f"{path}: its config describes a network of {needed:,} parameters, but "
                        f"its weights hold {held:,} numbers; the file is damaged or hand-edited")
    model = build_network(cfg.model)
    load_state(model, ckpt["model"], str(path))
    return model.to(device), ckpt, cfg


# Names the reference code gave to what this package names otherwise (the last part of a key).
REFERENCE_NAMES = {"half_emb": "freqs"}  # the timestep embedding's frequencies


def from_reference_names(state: dict) -> dict:
    def rename(key: str) -> str:
        if not isinstance(key, str):  # left for load_state to refuse with its name
            return key
        head, _, last = key.rpartition(".")
        last = REFERENCE_NAMES.get(last, last)
        return f"{head}.{last}" if head else last
    return {rename(k): v for k, v in state.items()}


def convert_pickled(old, new, preset: str, trusted: bool, log=print) -> None:
    """The one place that unpickles arbitrary objects, and only when the user vouches for them."""
    if not trusted:
        raise UserError("converting unpickles the old file, which can run code: pass --trust "
                        "only for a file you trust")
    if Path(new).exists():
        raise UserError(f"{new} exists; choose another output path")
    cfg = get_preset(preset)
    try:
        obj = torch.load(old, map_location="cpu", weights_only=False)  # trusted by the user
    except Exception as e:  # any failure of a foreign pickle is the user's file, not our bug
        raise UserError(f"cannot read {old}: {type(e).__name__}: {e}") from None
    state = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj
    if isinstance(state, dict) and isinstance(state.get("config"), dict):
        # a file of this project (pickled by a script of its own): its own config and preset,
        # not --preset's, describe its weights (a flow model stays a flow model)
        cfg, preset = config_of(state), state.get("preset") or preset
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise UserError(f"{old} holds a {type(obj).__name__}, not a model or a state dict")
    state = from_reference_names(state)
    model = build_network(cfg.model)
    load_state(model, state, str(old))
    save(model_file(cfg, preset, {"model": model.state_dict()}), new)
    log(f"wrote {new}: weights only, loadable with weights_only=True")


# The shipped checkpoint: an earlier DDPM version of the `cpu` recipe (noise prediction, the
# linear schedule) trained 6,000 steps, exported as safetensors (docs/EXPERIMENTS.md)
SHIPPED_PATH = Path(__file__).parent / "weights" / "cpu.safetensors"
# LoRA r = 8 on the shipped checkpoint's attention and feed-forward, trained on bold MNIST
# (docs/EXPERIMENTS.md, "LoRA on the built-in bold target", has the commands)
BOLD_LORA_PATH = SHIPPED_PATH.with_name("bold_lora.safetensors")
# The flow-matching recipe (today's `cpu` preset) as trained, exported: the tour's flow model
FLOW_PATH = SHIPPED_PATH.with_name("cpu_flow.safetensors")
# The shipped checkpoint distilled into a few-step student, one network call a step (distill.py)
STUDENT_PATH = SHIPPED_PATH.with_name("cpu_student.safetensors")
# The `cpu-dit` preset as trained (a transformer, dit.py), exported: the tour's transformer
DIT_PATH = SHIPPED_PATH.with_name("cpu_dit.safetensors")
# The `cpu-onestep` preset as trained (MeanFlow from scratch, meanflow.py), exported
ONESTEP_PATH = SHIPPED_PATH.with_name("cpu_onestep.safetensors")


def export_for_sampling(src, dst, overrides=(), log=print) -> dict:
    """A small checkpoint for sampling only: the weights that sampling uses (EMA when there)
    under "model", the config and counters; no optimizer, no RNG states. Named .onnx, the
    network with those weights as an ONNX graph, the config in its metadata. `overrides`
    ('sample.guidance=3', ...) set the sampler defaults the file carries; nothing else may
    change, since the weights were trained for the rest."""
    ckpt = load_model_checkpoint(src)
    weights = sampling_weights(ckpt)
    cfg = config_of(ckpt)
    for assignment in overrides:
        if not assignment.startswith("sample."):
            raise UserError(f"export can only change sampler defaults (sample.*), not '{assignment}'")
        apply_override(cfg, assignment)
    check_config(cfg)  # a NaN guidance must not reach the file, nor a walk it cannot take
    counters = {k: ckpt[k] for k in ("epoch", "step", "step_in_epoch", "train_seconds") if k in ckpt}
    from_ema = weights is not ckpt["model"] or ckpt.get("exported_from_ema", False)  # (re-export)
    out = model_file(cfg, ckpt.get("preset"), {"model": weights, **counters,
                                               "exported_from_ema": from_ema})
    if is_onnx(dst):  # the network's forward as a graph (onnx_export.py), the config beside it
        model = build_network(cfg.model)
        load_state(model, weights, str(src))
        export_onnx(model, cfg, ckpt.get("preset"), dst)
    else:
        save(out, dst)
    what = "the network as an ONNX graph" if is_onnx(dst) else "sampling weights only"
    log(f"wrote {dst}: {what} ({Path(dst).stat().st_size / 1e6:.1f} MB)")
    return out


def default_checkpoint(path, log=print, adapters: bool = False):
    """The checkpoint a sampling command uses: the one asked for, else model.pt in the working
    folder, else the shipped student (and say so), which matches its teacher, the shipped
    checkpoint, in a tenth of the network calls (docs/EXPERIMENTS.md); with adapters, the
    teacher itself, on which the shipped adapter was trained."""
    if path is not None:
        return path
    if Path("model.pt").exists():
        return "model.pt"
    if adapters:
        log(f"no --ckpt and no model.pt here: using the shipped checkpoint {SHIPPED_PATH}")
        return SHIPPED_PATH
    log(f"no --ckpt and no model.pt here: using the shipped student {STUDENT_PATH}")
    return STUDENT_PATH
