"""The scripts end to end on `tiny`, as a user runs them, and every bad input's one-line error."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, run_script


def _progress(line: str) -> bool:
    """A progress bar's line: tqdm shows its rate as it/s, or as s/it when a step takes longer
    than a second (a slow or busy machine)."""
    return "it/s" in line or "s/it" in line


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """One tiny model and adapter, trained by the scripts themselves, shared by these tests."""
    d = tmp_path_factory.mktemp("e2e")
    run_script("train", "--preset", "tiny", "--max-steps", "8", "--out", "model.pt",
               "--logdir", "runs", cwd=d)
    run_script("lora_finetune", "--base", "model.pt", "--out", "lora.pt", "--max-steps", "4", cwd=d)
    return d


def test_train_finetune_denoise_end_to_end(work):
    assert list((work / "runs").glob("events.out.tfevents.*"))
    adapter = torch.load(work / "lora.pt", weights_only=True)
    assert set(adapter) >= {"lora", "lora_config", "base_fingerprint"}
    assert all(k.endswith((".lora_a", ".lora_b")) for k in adapter["lora"])
    proc = run_script("denoise", "--ckpt", "model.pt", "--lora", "lora.pt", "--out", "imgs/g.png",
                      "--npz", "s.npz", "--digits", "0,3,7", "--n-per-digit", "2",
                      "--gif", "imgs/walk.gif", cwd=work)
    assert "wrote" in proc.stdout
    assert Image.open(work / "imgs/g.png").size == (3 * 18 + 2, 2 * 18 + 2)
    gif = Image.open(work / "imgs/walk.gif")
    # the first row's walk, scaled 2x
    assert gif.n_frames == 20 and gif.size == (2 * (3 * 18 + 2), 2 * (16 + 2 * 2))
    assert Image.open(work / "imgs/g_progress.png").size[0] > 0
    s = np.load(work / "s.npz")
    assert s["images"].shape == (6, 16, 16) and s["images"].dtype == np.uint8
    assert s["labels"].tolist() == [0, 3, 7, 0, 3, 7] and s["labels"].dtype == np.int64


def test_sampling_is_byte_for_byte_repeatable(work):
    for name in ("a", "b"):
        run_script("denoise", "--ckpt", "model.pt", "--out", f"{name}.png", "--npz", f"{name}.npz",
                   "--seed", "7", cwd=work)
    assert (work / "a.png").read_bytes() == (work / "b.png").read_bytes()
    assert (work / "a_progress.png").read_bytes() == (work / "b_progress.png").read_bytes()
    assert (work / "a.npz").read_bytes() == (work / "b.npz").read_bytes()


def _fails(name, *args, cwd, match, env_extra=None, fault=None):
    proc = run_script(name, *args, cwd=cwd, env_extra=env_extra, check=False, fault=fault)
    # stderr may carry tqdm's progress bar before the failure; the failure itself is one line
    lines = [ln for ln in proc.stderr.strip().splitlines() if not _progress(ln)]
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], proc.stderr
    return proc


def test_bad_inputs_one_line_and_nothing_overwritten(work, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(work)
    keep = {p: (work / p).read_bytes() for p in ("model.pt", "lora.pt")}
    (work / "keep.png").write_bytes(b"precious")
    # one in a fresh interpreter, as a user runs it; the rest in this one (same code path, and
    # no torch import per case)
    _fails("train", "--preset", "nope", cwd=work, match="unknown preset")
    _refused(capsys, "train", "--preset", "tiny", "--set", "model.layers=3",
             match="unknown config field")
    _refused(capsys, "train", "--preset", "tiny", "--lr", "fast", match="invalid float")
    _refused(capsys, "train", "--preset", "tiny", "--set", "train.loss=l7", match="train.loss")
    _refused(capsys, "denoise", "--ckpt", "model.pt", "--digits", "3,11", "--out", "keep.png",
             match="0-9")
    _refused(capsys, "denoise", "--ckpt", "absent.pt", "--out", "keep.png", match="not found")
    (work / "junk.pt").write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    _refused(capsys, "denoise", "--ckpt", "junk.pt", "--out", "keep.png", match="corrupt")
    _refused(capsys, "denoise", "--ckpt", "lora.pt", "--out", "keep.png", match="LoRA adapter")
    # a checkpoint of another architecture: resuming it under other model settings
    _refused(capsys, "train", "--preset", "tiny", "--set", "model.channels=8,32", "--out",
             "model.pt", "--resume", "--max-steps", "9", match="another architecture")
    # a lora.pt trained on another base
    run_script("train", "--preset", "tiny", "--max-steps", "2", "--seed", "5", "--out", "other.pt",
               "--logdir", "runs2", cwd=work)
    _refused(capsys, "denoise", "--ckpt", "other.pt", "--lora", "lora.pt", "--out", "keep.png",
             match="another base")
    _refused(capsys, "lora_finetune", "--base", "absent.pt", "--out", "lora.pt", match="not found")
    _refused(capsys, "denoise", "--ckpt", "model.pt", "--device", "tpu", "--out", "keep.png",
             match="unknown device")
    assert (work / "keep.png").read_bytes() == b"precious"
    assert all((work / p).read_bytes() == b for p, b in keep.items())


def test_malicious_checkpoint_refused_by_script(work, tmp_path):
    marker = tmp_path / "marker"
    payload = (f"import torch, os\nclass P:\n    def __reduce__(self):\n"
               f"        return (os.system, ('touch {marker}',))\n"
               f"torch.save({{'model': P()}}, 'evil.pt')\n")
    (tmp_path / "make.py").write_text(payload)
    import subprocess
    import sys
    subprocess.run([sys.executable, "make.py"], cwd=tmp_path, check=True)
    _fails("denoise", "--ckpt", str(tmp_path / "evil.pt"), cwd=work, match="convert")
    assert not marker.exists()


def test_full_disk_during_save_keeps_previous(work):
    before = (work / "model.pt").read_bytes()
    _fails("train", "--preset", "tiny", "--out", "model.pt", "--resume", "--max-steps", "10",
           cwd=work, match="No space left", env_extra={"DIFFUSION101_FAULT": "disk_full"})
    assert (work / "model.pt").read_bytes() == before
    assert not list(work.glob(".model.pt.*.tmp"))


def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(tmp_path):
    common = ["--preset", "tiny", "--max-steps", "12", "--save-every", "4", "--seed", "3",
              "--logdir", "runs"]
    run_script("train", *common, "--out", "straight.pt", cwd=tmp_path)
    killed = run_script("train", *common, "--out", "crash.pt", cwd=tmp_path, check=False,
                        fault="kill_after_step:7")
    assert killed.returncode == -9  # SIGKILL at step 7; the last save was at step 4
    assert torch.load(tmp_path / "crash.pt", weights_only=True)["step"] == 4
    run_script("train", *common, "--out", "crash.pt", "--resume", cwd=tmp_path)
    a = torch.load(tmp_path / "straight.pt", weights_only=True)
    b = torch.load(tmp_path / "crash.pt", weights_only=True)
    assert a["step"] == b["step"] == 12 and b["epoch"] == 0  # still inside the first epoch
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a["rng"]["generator"], b["rng"]["generator"])


def test_lora_on_an_image_folder_and_stacked_adapters(work, tmp_path, capsys, monkeypatch):
    from diffusion101.dataset import ImageData, write_image_folder
    # a tiny ImageFolder of 40 RGB 20x20 'digits', to check the conversion to 1 channel, 16 px
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 20, 20), generator=g, dtype=torch.uint8)
    write_image_folder(ImageData(images, torch.arange(40) % 10), tmp_path / "folder")
    Image.open(tmp_path / "folder" / "3" / "00003.png").convert("RGB").save(
        tmp_path / "folder" / "3" / "00003.png")
    proc = run_script("lora_finetune", "--base", "model.pt", "--data", tmp_path / "folder",
                      "--out", tmp_path / "style.pt", "--max-steps", "3",
                      "--targets", "w_q,w_k,w_v,z_linear", cwd=work)
    assert "12 layers" in proc.stdout and "% of the base" in proc.stdout
    for merge in ("--merge", "--no-merge"):
        run_script("denoise", "--ckpt", "model.pt", "--lora", "lora.pt:0.7",
                   "--lora", f"{tmp_path / 'style.pt'}:0.3", merge, "--npz", f"{merge[2:]}.npz",
                   "--out", f"{merge[2:]}.png", "--seed", "2", cwd=work)
    a, b = np.load(work / "merge.npz")["images"], np.load(work / "no-merge.npz")["images"]
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # same images, up to rounding
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cat").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "bad" / "cat" / "x.png")
    monkeypatch.chdir(work)
    _refused(capsys, "lora_finetune", "--base", "model.pt", "--data", tmp_path / "bad", "--out",
             "x.pt", match="the model has no class 'cat'")


def test_truncated_checkpoint_and_nan_loss_from_the_command_line(work, tmp_path, capsys,
                                                                monkeypatch):
    monkeypatch.chdir(work)
    data = (work / "model.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    _refused(capsys, "denoise", "--ckpt", tmp_path / "cut.pt", "--out", tmp_path / "x.png",
             match="truncated or corrupt")
    _refused(capsys, "train", "--out", tmp_path / "cut.pt", "--resume",
             match="truncated or corrupt")
    assert not (tmp_path / "x.png").exists()
    proc = _fails("train", "--preset", "tiny", "--save-every", "1", "--max-steps", "6",
                  "--out", tmp_path / "nan.pt", "--logdir", tmp_path / "r", cwd=work,
                  match="loss is nan at step 4", fault="nan_at_step:4")
    step = int(proc.stderr.split("(step ")[-1].split(")")[0])
    assert step == 3 and torch.load(tmp_path / "nan.pt", weights_only=True)["step"] == 3


def _ran(capsys, name, *args) -> str:
    """In-process (fast) run of scripts/<name>.py that must succeed; returns what it printed."""
    import signal

    from conftest import load_script
    from diffusion101.cli import release_locks
    before = signal.getsignal(signal.SIGTERM)
    try:  # the script's main is its entry point: the one-line boundary included
        code = load_script(name).main([str(a) for a in args])
    finally:
        signal.signal(signal.SIGTERM, before)
        release_locks()
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    return out.out


def _refused(capsys, name, *args, match):
    """In-process (fast) run of scripts/<name>.py: exit 2 and one 'error:' line naming `match`."""
    import signal

    from conftest import load_script
    from diffusion101.cli import release_locks
    before = signal.getsignal(signal.SIGTERM)
    try:  # the script's main is its entry point: the one-line boundary included
        code = load_script(name).main([str(a) for a in args])
    finally:
        signal.signal(signal.SIGTERM, before)
        release_locks()  # what the script's exit would do
    err = capsys.readouterr().err.strip().splitlines()
    err = [ln for ln in err if not _progress(ln)]
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and match in err[0], err


def test_outputs_that_would_destroy_inputs_are_refused_before_any_work(work, tmp_path, capsys,
                                                                       monkeypatch):
    monkeypatch.chdir(work)
    keep = {p: (work / p).read_bytes() for p in ("model.pt", "lora.pt")}
    # outputs named as their kind wants, that are the checkpoint under another name
    os.link(work / "model.pt", work / "hard.png")
    os.symlink("model.pt", work / "soft.gif")
    os.link(work / "model.pt", work / "hard.json")
    _refused(capsys, "denoise", "--ckpt", "model.pt", "--out", "hard.png", match="also --ckpt")
    _refused(capsys, "denoise", "--ckpt", "model.pt", "--out", "./x.png", "--npz", "x.png",
             match="ending in .npz")
    _refused(capsys, "denoise", "--ckpt", "model.pt", "--out", "./x.png", "--gif", "x.png",
             match="ending in .gif")
    _refused(capsys, "denoise", "--ckpt", "model.pt", "--gif", "soft.gif", match="also --ckpt")
    (work / "walk.gif").mkdir(exist_ok=True)
    _refused(capsys, "denoise", "--ckpt", "model.pt", "--gif", "walk.gif", match="--gif walk.gif is a folder")
    (work / "w.png").write_bytes(b"an earlier grid")
    os.link(work / "w.png", work / "w.gif")  # two outputs that are one file
    _refused(capsys, "denoise", "--ckpt", "model.pt", "--out", "w.png", "--gif", "./w.gif",
             match="same file")
    _refused(capsys, "export_checkpoint", "model.pt", "./model.pt", match="also src")
    _refused(capsys, "evaluate", "--ckpt", "model.pt", "--json", "hard.json", match="also --ckpt")
    _refused(capsys, "lora_finetune", "--base", "model.pt", "--out", "model.pt", match="also --base")
    (work / "afile").write_text("x")
    # a bad --logdir is found before the data is loaded or a step is taken
    _refused(capsys, "train", "--preset", "tiny", "--out", tmp_path / "t.pt", "--logdir", "afile",
             match="a folder is wanted")
    assert not (tmp_path / "t.pt").exists()
    assert all((work / p).read_bytes() == b for p, b in keep.items())


def test_runs_that_train_nothing_write_nothing(work, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(work)
    keep = {p: (work / p).read_bytes() for p in ("model.pt", "lora.pt")}
    _refused(capsys, "train", "--preset", "tiny", "--epochs", "0", "--out", tmp_path / "e.pt",
             "--logdir", tmp_path / "r", match="nothing to train")
    assert not (tmp_path / "e.pt").exists()
    _refused(capsys, "train", "--out", "model.pt", "--resume", "--max-steps", "8",
             match="nothing to train")  # the work fixture's run already took its 8 steps
    _refused(capsys, "lora_finetune", "--base", "model.pt", "--out", "lora.pt", "--epochs", "0",
             match="nothing to train")
    # a speed setting this device cannot take is refused before any file or folder is made
    _refused(capsys, "train", "--preset", "tiny", "--set", "train.compile=graphs", "--device",
             "cpu", "--out", tmp_path / "g.pt", "--logdir", tmp_path / "g_runs",
             match="train.compile=graphs replays CUDA graphs and needs a CUDA device")
    assert not (tmp_path / "g.pt").exists() and not (tmp_path / "g_runs").exists()
    assert all((work / p).read_bytes() == b for p, b in keep.items())


def test_non_finite_and_out_of_range_numbers_are_refused_by_name(work, tmp_path, capsys,
                                                                  monkeypatch):
    monkeypatch.chdir(work)
    (work / "keep.png").write_bytes(b"precious")
    for args, match in [
        (["denoise", "--guidance", "nan"], "sample.guidance"),
        (["denoise", "--guidance", "inf"], "sample.guidance"),
        (["denoise", "--steps", "0"], "sample.steps"),
        (["denoise", "--lora", "lora.pt:nan"], "strength"),
        (["denoise", "--lora", "lora.pt:notanumber"], "the strength after ':' must be a number"),
        (["denoise", "--seed", str(2 ** 70)], "--seed"),
        (["denoise", "--guidance-interval", "0.2,nan"], "sample.guidance_interval"),
        (["evaluate", "--n", "0"], "--n"),
    ]:
        out = ["--out", "keep.png"] if args[0] == "denoise" else ["--json", tmp_path / "e.json"]
        _refused(capsys, args[0], "--ckpt", "model.pt", *args[1:], *out, match=match)
    for args, match in [(["--lr", "nan"], "train.lr"), (["--epochs", "-1"], "train.epochs"),
                        (["--set", "model.num_classes=0"], "model.num_classes"),
                        (["--set", "model.in_channels=3"], "model.in_channels"),
                        (["--set", "model.cls_emb_dim=-1"], "model.cls_emb_dim"),
                        (["--set", "train.max_minutes=inf"], "train.max_minutes")]:
        _refused(capsys, "train", "--preset", "tiny", *args, "--out", tmp_path / "n.pt", match=match)
    assert (work / "keep.png").read_bytes() == b"precious"
    assert not (tmp_path / "n.pt").exists() and not (tmp_path / "e.json").exists()


def test_a_second_run_on_the_same_out_is_refused(work, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(work)
    # as a running training would hold it (another process: _refused releases this one's)
    import subprocess
    import sys
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from diffusion101.cli "
                               f"import lock_output; lock_output({str(tmp_path / 'busy.pt')!r}); "
                               "print('locked', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    try:
        _refused(capsys, "train", "--preset", "tiny", "--max-steps", "2", "--out",
                 tmp_path / "busy.pt", "--logdir", tmp_path / "r",
                 match=f"being written by another run (pid {holder.pid})")
    finally:
        holder.kill()
    assert not (tmp_path / "busy.pt").exists()


def test_interrupted_style_data_leaves_no_half_made_folder(tmp_path, monkeypatch):
    from conftest import load_script
    from diffusion101 import dataset
    script = load_script("make_style_data")
    written = []

    def write_then_interrupt(data, root):
        (root / "0").mkdir(parents=True)
        (root / "0" / "00000.png").write_bytes(b"\x89PNG truncated")
        written.append(root)
        raise KeyboardInterrupt
    monkeypatch.setattr(dataset, "write_image_folder", write_then_interrupt)
    assert script.main(["--out", str(tmp_path / "bold"), "--n", "20"]) == 130
    assert written and list(tmp_path.iterdir()) == []  # neither the folder nor its temporary


def _shapes_folder(root, classes=("circle", "square", "triangle"), n=48):
    """A small RGB folder of `classes` drawn by dataset.draw_shape, 16 px."""
    import numpy as np_
    from diffusion101.dataset import draw_shape
    rng = np_.random.default_rng(0)
    for i in range(n):
        kind = classes[i % len(classes)]
        (root / kind).mkdir(parents=True, exist_ok=True)
        draw_shape(kind, 16, rng).save(root / kind / f"{i:03d}.png")
    return root


def test_a_folder_of_three_classes_trains_samples_by_name_and_travels_as_safetensors(
        tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = _shapes_folder(tmp_path / "shapes")
    (data / "notes.txt").write_text("not an image: skipped")
    out = _ran(capsys, "train", "--preset", "tiny", "--data", data, "--set", "model.in_channels=3",
               "--max-steps", "3", "--out", "shapes.pt", "--logdir", "runs")
    assert "48 training images" in out and "skipped 1 file" in out
    saved = torch.load(tmp_path / "shapes.pt", weights_only=True)
    assert saved["config"]["model"]["class_names"] == ["circle", "square", "triangle"]
    assert saved["config"]["model"]["num_classes"] == 3
    assert saved["model"]["cls_emb.weight"].shape[0] == 3
    args = ["--digits", "triangle,circle", "--n-per-digit", "2", "--seed", "5"]
    _ran(capsys, "denoise", "--ckpt", "shapes.pt", "--out", "pt.png", "--npz", "pt.npz", *args)
    _ran(capsys, "export_checkpoint", "shapes.pt", "shapes.safetensors")
    _ran(capsys, "denoise", "--ckpt", "shapes.safetensors", "--out", "st.png", "--npz", "st.npz",
         *args)
    a, b = np.load(tmp_path / "pt.npz"), np.load(tmp_path / "st.npz")
    assert a["images"].shape == (4, 16, 16, 3) and a["labels"].tolist() == [2, 0, 2, 0]
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["labels"], b["labels"])
    for name in ("pt.png", "pt_progress.png"):
        twin = name.replace("pt", "st", 1)
        assert (tmp_path / name).read_bytes() == (tmp_path / twin).read_bytes(), name
    # the grid carries a caption strip above its two columns of 16 px tiles
    assert Image.open(tmp_path / "pt.png").size == (2 * 18 + 2, 2 * 18 + 2 + 14)


def test_bad_image_folders_are_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one = _shapes_folder(tmp_path / "one", classes=("circle",), n=4)
    empty_class = _shapes_folder(tmp_path / "gap", n=6)
    (empty_class / "cross").mkdir()
    (empty_class / "cross" / "readme.md").write_text("no image here")
    broken = _shapes_folder(tmp_path / "broken", n=6)
    (broken / "square" / "bad.png").write_bytes(b"not a png")
    control = _shapes_folder(tmp_path / "control", n=6)
    (control / "circle").rename(control / "new\tline")
    cases = [(tmp_path / "absent", "image folder not found"), (tmp_path / "nothing", "holds 0 class"),
             (one, "holds 1 class"), (empty_class, "cross holds no image file"),
             (broken, "bad.png: cannot identify image file"), (control, "cannot be a caption")]
    (tmp_path / "nothing").mkdir()
    for folder, match in cases:
        _refused(capsys, "train", "--preset", "tiny", "--data", folder, "--out", "m.pt",
                 "--logdir", "runs", match=match)
    _refused(capsys, "train", "--preset", "tiny", "--data", "", "--out", "m.pt", match="empty path")
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "runs").exists()


def test_resume_and_lora_refuse_classes_the_checkpoint_does_not_know(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = _shapes_folder(tmp_path / "shapes", n=24)
    _ran(capsys, "train", "--preset", "tiny", "--data", data, "--max-steps", "2", "--out", "m.pt",
         "--logdir", "runs", "--save-every", "1")
    before = (tmp_path / "m.pt").read_bytes()
    other = _shapes_folder(tmp_path / "other", classes=("circle", "cross", "square"), n=9)
    _refused(capsys, "train", "--resume", "--data", other, "--out", "m.pt", "--max-steps", "4",
             "--logdir", "runs", match="holds the classes circle, cross, square; m.pt was trained "
                                       "on circle, square, triangle")
    _refused(capsys, "lora_finetune", "--base", "m.pt", "--data", other, "--out", "l.pt",
             match="the model has no class 'cross'")
    _refused(capsys, "lora_finetune", "--base", "m.pt", "--out", "l.pt",
             match="not trained on MNIST's digits")
    _refused(capsys, "evaluate", "--ckpt", "m.pt", "--n", "10", match="need a classifier of that data")
    # a subset of the base's classes is fine for LoRA: one class, by its name
    subset = _shapes_folder(tmp_path / "subset", classes=("square",), n=8)
    _ran(capsys, "lora_finetune", "--base", "m.pt", "--data", subset, "--out", "l.safetensors",
         "--max-steps", "2")
    _ran(capsys, "denoise", "--ckpt", "m.pt", "--lora", "l.safetensors:0.5", "--digits", "square",
         "--out", "g.png")
    assert (tmp_path / "m.pt").read_bytes() == before and not (tmp_path / "l.pt").exists()


def test_files_of_the_wrong_kind_and_paths_that_name_folders_are_refused(work, tmp_path, capsys,
                                                                         monkeypatch):
    monkeypatch.chdir(work)
    before = {p: (work / p).read_bytes() for p in ("model.pt", "lora.pt")}
    _ran(capsys, "export_checkpoint", "model.pt", tmp_path / "export.pt")
    _refused(capsys, "train", "--resume", "--out", tmp_path / "export.pt", "--logdir", tmp_path / "r",
             match="so it cannot be resumed")
    _refused(capsys, "train", "--preset", "tiny", "--out", tmp_path / "m.safetensors",
             match="is written as a .pt file")
    ckpt = torch.load(work / "model.pt", weights_only=True)
    torch.save({**ckpt, "optimizer": {"state": {}, "param_groups": [{"params": [0]}]}},
               tmp_path / "damaged.pt")
    _refused(capsys, "train", "--resume", "--out", tmp_path / "damaged.pt", "--max-steps", "20",
             "--logdir", tmp_path / "r", match="its optimizer cannot be restored")
    np.save(tmp_path / "s.npy", np.zeros((10, 28, 28), dtype=np.uint8))
    _refused(capsys, "evaluate", "--npz", tmp_path / "s.npy", match="no zip of arrays")
    for flag, value, match in (("--out", "", "empty path"), ("--out", "new/", "names a folder"),
                               ("--out", ".", "names a folder"), ("--npz", "x/", "names a folder"),
                               ("--gif", "", "empty path"), ("--ckpt", "", "empty path")):
        _refused(capsys, "denoise", "--ckpt", "model.pt", flag, value, match=match)
    _refused(capsys, "train", "--preset", "tiny", "--out", "fresh/", match="names a folder")
    # every file output's name ends as what is written there (any case), or it is refused
    for script, args, match in (
            ("denoise", ["--out", "g.jpg"], "ending in .png"), ("denoise", ["--npz", "x.png"], ".npz"),
            ("denoise", ["--gif", "x.png"], ".gif"), ("denoise", ["--out", "-"], "standard output"),
            ("evaluate", ["--json", "x.txt"], ".json"), ("export_checkpoint", ["model.pt", "m.bin"], ".safetensors"),
            ("lora_finetune", ["--out", "l.txt"], ".pt or .safetensors"), ("train", ["--out", "t"], ".pt"),
            ("posthoc_ema", ["snaps", "p.txt"], ".pt or"), ("convert_checkpoint", ["--trust", "model.pt", "c.txt"], ".pt or"),
            ("train_classifier", ["--out", "c.safetensors"], ".pt"), ("distill", ["--out", "s.safetensors"], ".pt")):
        _refused(capsys, script, *args, match=match)
    _ran(capsys, "export_checkpoint", "model.pt", tmp_path / "upper.SAFETENSORS")
    assert (tmp_path / "upper.SAFETENSORS").read_bytes()[8:9] == b"{"  # safetensors' JSON header
    _refused(capsys, "evaluate", "--ckpt", "model.pt", "--json", "", match="empty path")
    _refused(capsys, "export_checkpoint", "model.pt", "out/", match="names a folder")
    assert not (work / "new").exists() and not (work / "fresh").exists()
    # one adapter under two spellings, or through a link: refused, never applied twice
    (tmp_path / "link.pt").symlink_to(work / "lora.pt")
    for second in ("./lora.pt:0.5", str(tmp_path / "link.pt")):
        _refused(capsys, "denoise", "--ckpt", "model.pt", "--lora", "lora.pt", "--lora", second,
                 "--out", tmp_path / "g.png", match="one file given twice")
    assert {p: (work / p).read_bytes() for p in before} == before
    assert not (tmp_path / "g.png").exists()


def test_guidance_rules_from_the_command_line_and_in_an_export(work, tmp_path, capsys,
                                                              monkeypatch):
    import json

    from safetensors import safe_open
    monkeypatch.chdir(work)
    common = ["--ckpt", "model.pt", "--digits", "2,5", "--seed", "3", "--sampler", "ddim",
              "--steps", "5"]
    _ran(capsys, "denoise", *common, "--out", tmp_path / "plain.png", "--npz", tmp_path / "p.npz")
    out = _ran(capsys, "denoise", *common, "--guidance-rule", "auto", "--guide", "model.pt",
               "--guidance", "3", "--out", tmp_path / "auto.png", "--npz", tmp_path / "a.npz")
    assert "guidance 3.0 (auto)" in out
    a, b = np.load(tmp_path / "p.npz")["images"], np.load(tmp_path / "a.npz")["images"]
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # guided by itself: unguided
    _refused(capsys, "denoise", *common, "--guidance-rule", "auto", "--out", tmp_path / "x.png",
             match="needs sample.guide")
    _refused(capsys, "denoise", *common, "--apg-eta", "2", "--out", tmp_path / "x.png",
             match="sample.apg_eta must be a finite number in [0, 1]")
    _refused(capsys, "denoise", *common, "--guidance-rule", "apg", "--guidance", "2",
             "--out", tmp_path / "x.png", match="needs a model trained with a null class")
    # a rule at guidance 1 guides nothing: a file that says so would mislead (issue 46)
    _refused(capsys, "export_checkpoint", "model.pt", tmp_path / "e.safetensors", "--set",
             "sample.guidance_rule=apg", "--set", "sample.apg_eta=0.25", match="guides nothing")
    assert not (tmp_path / "e.safetensors").exists()
    _ran(capsys, "export_checkpoint", "model.pt", tmp_path / "e.safetensors", "--set",
         "sample.guidance_rule=auto", "--set", "sample.guide=model.pt", "--set",
         "sample.guidance=3", "--set", "sample.apg_eta=0.25", "--set", "sample.apg_momentum=-0.5")
    with safe_open(str(tmp_path / "e.safetensors"), framework="pt") as f:
        sample_section = json.loads(f.metadata()["config"])["sample"]
    assert sample_section["guidance_rule"] == "auto" and sample_section["apg_eta"] == 0.25
    assert sample_section["apg_momentum"] == -0.5 and sample_section["guidance"] == 3
