import os
import subprocess
import sys
import zipfile

import pytest
import torch

from diffusion101 import checkpoint
from diffusion101 import model_files as models
from diffusion101.config import UserError
from diffusion101.presets import get_preset
from diffusion101.unet import UNet

from conftest import ROOT, tiny_checkpoint


def test_round_trip_under_weights_only(tmp_path):
    path = tmp_path / "model.pt"
    checkpoint.save(tiny_checkpoint(), path)
    raw = torch.load(path, weights_only=True)
    assert raw["step"] == 3 and raw["config"]["model"]["img_size"] == 16
    model, ckpt, cfg = models.load_model(path)
    for k, v in tiny_checkpoint()["model"].items():
        assert torch.equal(model.state_dict()[k], v)
    assert cfg.model.channels == (8, 16)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left


def test_fingerprint_tracks_weights():
    a, b = tiny_checkpoint(0)["model"], tiny_checkpoint(1)["model"]
    # equal for the same numbers in other tensors and another key order ...
    copy = {k: a[k].clone() for k in reversed(list(a))}
    assert checkpoint.fingerprint(a) == checkpoint.fingerprint(copy)
    assert checkpoint.fingerprint(a) != checkpoint.fingerprint(b)
    assert len(checkpoint.fingerprint(a)) == 64
    # ... and different when one number moves by one float32 step, or a name changes
    key = next(k for k, v in a.items() if v.is_floating_point())
    nudged = dict(copy)
    nudged[key] = copy[key].clone()
    nudged[key].view(-1)[0] = torch.nextafter(nudged[key].view(-1)[0], torch.tensor(float("inf")))
    assert checkpoint.fingerprint(nudged) != checkpoint.fingerprint(a)
    renamed = {("x." + k if k == key else k): v for k, v in copy.items()}
    assert checkpoint.fingerprint(renamed) != checkpoint.fingerprint(a)


class _Payload:
    """Unpickling this would create a marker file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"model": _Payload(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(UserError, match="pickled Python objects.*convert"):
        models.load_model(path)
    assert not marker.exists()


def test_whole_module_pickle_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(UNet(get_preset("tiny").model), path)  # what the reference saved
    with pytest.raises(UserError, match="pickled Python objects"):
        models.load_model(path)


def test_truncated_and_foreign_files(tmp_path):
    path = tmp_path / "model.pt"
    checkpoint.save(tiny_checkpoint(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        models.load_model(path)
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="truncated or corrupt"):
        models.load_model(path)
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(UserError, match="not a Diffusion-101 model checkpoint"):
        models.load_model(path)
    with pytest.raises(UserError, match="not found"):
        models.load_model(tmp_path / "absent.pt")


def test_weights_of_another_architecture_refused(tmp_path):
    ckpt = tiny_checkpoint()
    ckpt["config"]["model"]["channels"] = [8, 32]  # config says one thing, weights another
    checkpoint.save(ckpt, tmp_path / "m.pt")
    with pytest.raises(UserError, match="its config describes a network of 19,489 parameters"):
        models.load_model(tmp_path / "m.pt")


def test_crash_between_write_and_replace_keeps_previous(tmp_path):
    path = tmp_path / "model.pt"
    checkpoint.save(tiny_checkpoint(0), path)
    before = path.read_bytes()
    code = ("import torch, sys; sys.path.insert(0, sys.argv[2]); from diffusion101 import checkpoint;"
            "checkpoint.save({'format': 'x', 'model': torch.ones(1000)}, sys.argv[1])")
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(ROOT)],
                          env=dict(os.environ, DIFFUSION101_FAULT="kill_before_replace"))
    assert proc.returncode == -9  # SIGKILL, after the temporary file was written and synced
    assert path.read_bytes() == before
    model, ckpt, _ = models.load_model(path)
    assert ckpt["step"] == 3


def test_save_into_missing_folder_is_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        checkpoint.save(tiny_checkpoint(), tmp_path / "nope" / "model.pt")


def _export(tmp_path, name="m.safetensors", **change) -> "Path":
    """The tiny checkpoint exported as safetensors (through checkpoint.save), parts changed."""
    ckpt = {**tiny_checkpoint(), **change}
    checkpoint.save(ckpt, tmp_path / name)
    return tmp_path / name


def test_safetensors_round_trip_with_the_config_as_json_metadata(tmp_path):
    import json

    from safetensors import safe_open
    path = _export(tmp_path)
    with safe_open(str(path), framework="pt") as f:  # what any safetensors reader sees
        meta = f.metadata()
        assert set(f.keys()) == set(tiny_checkpoint()["model"])
    assert meta["format"] == checkpoint.MODEL_FORMAT
    assert json.loads(meta["config"])["model"]["channels"] == [8, 16]
    assert json.loads(meta["step"]) == 3 and json.loads(meta["preset"]) == "tiny"
    back = checkpoint.load_model_checkpoint(path)
    assert back["step"] == 3 and back["config"] == tiny_checkpoint()["config"]
    for k, v in tiny_checkpoint()["model"].items():
        assert torch.equal(back["model"][k], v) and back["model"][k].dtype == v.dtype
    # the layout, not the name, says which reader: a safetensors file named .pt loads too
    (tmp_path / "renamed.pt").write_bytes(path.read_bytes())
    assert checkpoint.load_model_checkpoint(tmp_path / "renamed.pt")["step"] == 3
    with pytest.raises(UserError, match="stays .pt"):
        checkpoint.save({**tiny_checkpoint(), "optimizer": {}}, tmp_path / "t.safetensors")
    # the name's case does not matter: .SAFETENSORS is safetensors too, not a torch zip
    checkpoint.save(tiny_checkpoint(), tmp_path / "upper.SAFETENSORS")
    assert not zipfile.is_zipfile(tmp_path / "upper.SAFETENSORS")
    assert checkpoint.load_model_checkpoint(tmp_path / "upper.SAFETENSORS")["step"] == 3


def test_bad_safetensors_files_are_refused_in_one_line(tmp_path):
    import safetensors.torch
    good = _export(tmp_path).read_bytes()
    state = tiny_checkpoint()["model"]
    meta = {"format": checkpoint.MODEL_FORMAT, "config": json_text(tiny_checkpoint()["config"]),
            "epoch": "0", "step": "0", "step_in_epoch": "0"}

    def written(name, tensors=state, metadata=meta):
        (tmp_path / name).write_bytes(safetensors.torch.save(tensors, metadata))
        return tmp_path / name

    n = int.from_bytes(good[:8], "little")
    (tmp_path / "cut.safetensors").write_bytes(good[: len(good) // 2])
    (tmp_path / "header.safetensors").write_bytes(good[:8] + b"[" + good[9:])
    cases = {
        tmp_path / "cut.safetensors": "truncated or corrupt",
        tmp_path / "header.safetensors": "truncated or corrupt",
        written("noconfig.safetensors", metadata={k: v for k, v in meta.items() if k != "config"}):
            "has no 'config'",
        written("version.safetensors", metadata={**meta, "format": "diffusion101/model/0"}):
            "not a Diffusion-101 file of this version",
        written("nometa.safetensors", metadata=None): "not a Diffusion-101 file of this version",
        written("badjson.safetensors", metadata={**meta, "step": "{oops"}): "'step' is not JSON",
        written("oldconfig.safetensors", metadata={**meta, "config": '{"model": {"layers": 3}}'}):
            "unknown config field 'model.layers'",
        written("name.safetensors", tensors={**state, "extra.weight": torch.ones(2)}):
            "does not fit this architecture",
        written("shape.safetensors", tensors={**state, "output.bias": torch.ones(2)}):
            r"tensor 'output.bias' has shape \(2,\); this architecture's is \(1,\)",
        written("dtype.safetensors", tensors={**state, "output.bias": state["output.bias"].half()}):
            "'output.bias' is torch.float16",
        written("nan.safetensors", tensors={**state, "output.bias": state["output.bias"] * float("nan")}):
            "'output.bias' holds NaN or inf",
    }
    assert n > 0
    for path, match in cases.items():
        with pytest.raises(UserError, match=match):
            models.load_model(path)


def json_text(value) -> str:
    import json
    return json.dumps(value)


@pytest.mark.parametrize("part, value", [
    ("model", torch.zeros(3)), ("model", [1, 2]), ("model", "weights"), ("model", {"a": [1.0]}),
    ("config", [1]), ("config", {"model": "tiny"}), ("ema", torch.zeros(1)),
    ("optimizer", torch.zeros(1)), ("rng", "seed"), ("epoch", "1"), ("step", -1),
    ("step", True), ("train_seconds", float("nan")), ("preset", 3)])
def test_a_part_of_the_wrong_type_is_refused_before_it_is_used(tmp_path, part, value):
    checkpoint.save({**tiny_checkpoint(), part: value}, tmp_path / "m.pt")
    with pytest.raises(UserError, match=f"its '{part}' must be"):
        models.load_model(tmp_path / "m.pt")


@pytest.mark.parametrize("part, value", [
    ("lora", torch.zeros(2)), ("lora", ["a"]), ("lora_config", "r=8"),
    ("lora_config", {"r": 8, "alpha": 1.0, "targets": "w_q"}), ("base_fingerprint", 12),
    ("steps", "5")])
def test_an_adapter_part_of_the_wrong_type_is_refused(tmp_path, part, value):
    adapter = checkpoint.lora_file(get_preset("tiny"), {}, 4, 1.0, ["w_q"], "0" * 64, 5)
    checkpoint.save({**adapter, part: value}, tmp_path / "a.pt")
    with pytest.raises(UserError, match=f"its '{part}' must be"):
        checkpoint.load_lora_file(tmp_path / "a.pt")
    checkpoint.save({**adapter, "lora": {"x.lora_a": torch.full((2, 4), float("inf"))}},
                    tmp_path / "inf.safetensors")
    with pytest.raises(UserError, match="'x.lora_a' holds NaN or inf"):
        checkpoint.load_lora_file(tmp_path / "inf.safetensors")


def test_a_state_dict_with_entries_that_are_no_tensors_is_refused_by_name():
    model = UNet(get_preset("tiny").model)
    state = dict(model.state_dict())
    for bad in ({**state, "note": "hello"}, {**state, "output.bias": [0.0]}, {**state, 3: state["output.bias"]}):
        with pytest.raises(UserError, match="not a named tensor"):
            checkpoint.load_state(model, bad, "old.pt")


def _bomb(elements: int) -> torch.Tensor:
    """A view of one stored number that claims `elements` of them (stride 0): a few bytes in
    a file, elements * 4 bytes once anything reads it whole."""
    return torch.zeros(1).expand(elements)


@pytest.mark.parametrize("where", ["model", "ema", "optimizer", "lora"])
def test_a_tensor_that_claims_more_than_its_file_holds_is_refused_unread(tmp_path, where):
    """Every way a tensor enters is checkpoint.load; in the weights, the EMA copy, deep in an
    optimizer's state, in an adapter: refused before one element is read (10^12 numbers,
    4 TB, would kill the process: the test passes only because nothing is allocated)."""
    if where == "lora":
        obj = {"format": checkpoint.LORA_FORMAT, "lora": {"a.lora_A": _bomb(10 ** 12)},
               "lora_config": {"r": 4, "alpha": 4.0, "targets": ["w_q"]},
               "base_fingerprint": "0" * 64, "config": tiny_checkpoint(0)["config"], "steps": 1}
    else:
        obj = tiny_checkpoint(0)
        bomb = _bomb(10 ** 12)
        if where == "optimizer":
            obj["optimizer"] = {"state": {0: {"exp_avg": [bomb]}}, "param_groups": []}
        else:
            obj[where] = {**obj["model"], "output.bias": bomb}
    torch.save(obj, tmp_path / "bomb.pt")
    assert (tmp_path / "bomb.pt").stat().st_size < 200_000
    with pytest.raises(UserError, match=r"claims 1,000,000,000,000 numbers .* stores 1 for it"):
        if where == "lora":
            checkpoint.load_lora_file(tmp_path / "bomb.pt")
        else:
            models.load_model(tmp_path / "bomb.pt")


def test_an_overlapping_view_is_refused_and_a_slice_loads(tmp_path):
    base = torch.arange(1000.0)
    overlapping = base.as_strided((1000, 1000), (0, 1))  # a million numbers from a thousand
    torch.save({"format": "x", "t": [overlapping]}, tmp_path / "overlap.pt")
    with pytest.raises(UserError, match=r"tensor 't\[0\]' claims 1,000,000 numbers"):
        checkpoint.load(tmp_path / "overlap.pt")
    ok = base[4:12]  # a slice of a bigger storage holds its shape: loads
    torch.save({"format": "x", "t": ok}, tmp_path / "slice.pt")
    assert torch.equal(checkpoint.load(tmp_path / "slice.pt")["t"], ok)
    state = {**tiny_checkpoint(0)["model"]}
    state["output.bias"] = _bomb(10 ** 9)  # a state built in memory (convert) is checked too
    with pytest.raises(UserError, match="has shape"):
        checkpoint.load_state(UNet(get_preset("tiny").model), state, "converted")
