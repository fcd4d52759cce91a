import pytest
import torch
import torch.nn.functional as F

from diffusion101 import checkpoint
from diffusion101.config import UserError, get_preset
from diffusion101.dataset import load_mnist
from diffusion101.diffusion import NoiseSchedule
from diffusion101.train import train
from diffusion101.unet import UNet


def test_tiny_overfits_one_fixed_batch():
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model, sched = UNet(cfg.model), NoiseSchedule(cfg.diffusion)
    x0, y = load_mnist(train=False, img_size=16).batch(torch.arange(16))
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, cfg.diffusion.timesteps, (16,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    xt = sched.add_noise(x0, noise, t)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    losses = []
    for _ in range(150):
        loss = F.l1_loss(model(xt, t, y), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize("overrides", [
    ["model.block=residual", "model.norm=group"], ["model.attn_from_level=1"],
    ["train.snr_gamma=5", "train.loss=mse"], ["train.snr_gamma=5", "diffusion.prediction=v"],
], ids=lambda o: ",".join(o))
def test_options_learn_one_fixed_batch_through_train_step(overrides):
    from diffusion101.config import apply_override
    from diffusion101.diffusion import NoiseSchedule
    from diffusion101.train import Speed, build_state, train_step
    cfg = get_preset("tiny")
    for o in overrides:
        apply_override(cfg, o)
    torch.manual_seed(0)
    speed = Speed.for_device(cfg.train, torch.device("cpu"))
    state = build_state(cfg, "cpu", speed, total_steps=100)
    sched = NoiseSchedule(cfg.diffusion)
    x0, y = load_mnist(train=False, img_size=16).batch(torch.arange(16))
    losses = []
    for _ in range(100):
        state.generator.manual_seed(0)  # the same timesteps and noise every step: a fixed batch
        losses.append(train_step(state, sched, x0, y, cfg.train, speed))
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def _cfg(max_steps):
    cfg = get_preset("tiny")
    cfg.train.max_steps = max_steps
    cfg.train.epochs = 3
    return cfg


def test_train_saves_and_resumes(tmp_path, fake_data):
    out = tmp_path / "model.pt"
    train(_cfg(5), "tiny", out, tmp_path / "runs", "cpu", data=fake_data, log=lambda *a: None)
    raw = torch.load(out, weights_only=True)
    assert (raw["step"], raw["epoch"], raw["step_in_epoch"]) == (5, 0, 5)
    assert set(raw) >= {"model", "optimizer", "config", "epoch", "step", "rng"}
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "runs").iterdir())
    # 256 images / batch 16 = 16 steps an epoch: resume to step 20 crosses into epoch 2
    state = train(_cfg(20), "tiny", out, tmp_path / "runs", "cpu", resume=True, data=fake_data,
                  log=lambda *a: None)
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (20, 1, 4)


def test_mid_epoch_checkpoints_carry_their_training_time(tmp_path, fake_data, monkeypatch):
    # a job killed after a mid-epoch save resumes from that file: its clock must include the
    # steps since the epoch began, or every resumed run under-reports its training minutes
    saved = []
    monkeypatch.setattr(checkpoint, "save", lambda state, path: saved.append(dict(state)))
    cfg = _cfg(12)
    cfg.train.save_every = 4
    train(cfg, "tiny", tmp_path / "model.pt", tmp_path / "runs", "cpu", data=fake_data,
          log=lambda *a: None)
    steps = [s["step"] for s in saved]
    seconds = [s["train_seconds"] for s in saved]
    assert steps[:3] == [4, 8, 12]  # all inside the first 16-step epoch
    assert 0 < seconds[0] < seconds[1] < seconds[2], seconds


def test_resume_other_architecture_refused(tmp_path, fake_data):
    out = tmp_path / "model.pt"
    train(_cfg(2), "tiny", out, tmp_path / "runs", "cpu", data=fake_data, log=lambda *a: None)
    before = out.read_bytes()
    other = _cfg(4)
    other.model.channels = (8, 32)
    with pytest.raises(UserError, match="another architecture"):
        train(other, "tiny", out, tmp_path / "runs", "cpu", resume=True, data=fake_data,
              log=lambda *a: None)
    assert out.read_bytes() == before


def test_nan_loss_stops_and_keeps_last_good(tmp_path, fake_data):
    out = tmp_path / "model.pt"
    cfg = _cfg(8)
    cfg.train.save_every = 1
    cfg.train.lr = 1e30  # Adam's first step moves every weight by ~1e30: the next loss overflows
    with pytest.raises(UserError, match=r"loss is (nan|inf) at step (\d+).*last good checkpoint \(step (\d+)\)") as e:
        train(cfg, "tiny", out, tmp_path / "runs", "cpu", data=fake_data, log=lambda *a: None)
    bad_step = int(str(e.value).split("at step ")[1].split()[0])
    saved = torch.load(out, weights_only=True)
    assert saved["step"] == bad_step - 1  # the checkpoint before the bad step is the one kept
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_torchrun_two_cpu_processes_keep_identical_weights(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "scripts" / "train.py"), "--preset", "tiny", "--max-steps", "4",
           "--device", "cpu", "--out", "ddp.pt", "--logdir", "runs"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "replicas agree: max |w_rank - w_0| = 0 over 2 processes" in proc.stdout
    assert proc.stdout.count("saved ddp.pt") == 1  # rank 0 alone writes
    assert [p.name for p in tmp_path.glob("*.pt")] == ["ddp.pt"]
    ckpt = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert ckpt["step"] == 4
    assert not any(k.startswith("module.") for k in ckpt["model"])  # the unwrapped model
    assert len(list((tmp_path / "runs").glob("events.out.tfevents.*"))) == 1


def test_speed_options_auto_is_cuda_only_and_reference_keeps_fp32():
    from diffusion101.train import Speed
    recipe = get_preset("cpu").train
    on_cuda = Speed.for_device(recipe, torch.device("cuda"))
    # every setting but CUDA graphs, which only train.compile=graphs turns on
    assert on_cuda.enabled() == [name for name in vars(Speed()) if name != "cuda_graphs"]
    assert Speed.for_device(recipe, torch.device("cpu")) == Speed()  # all off: plain fp32
    ref_cuda = Speed.for_device(get_preset("reference").train, torch.device("cuda"))
    assert not ref_cuda.bf16 and not ref_cuda.tf32 and ref_cuda.channels_last


def test_cuda_graphs_are_refused_off_cuda_in_one_line_and_nothing_is_written(tmp_path, fake_data):
    from diffusion101.train import Speed
    cfg = _cfg(3)
    cfg.train.compile = "graphs"
    assert Speed.for_device(cfg.train, torch.device("cuda")).cuda_graphs
    with pytest.raises(UserError, match="train.compile=graphs replays CUDA graphs and needs a CUDA"):
        train(cfg, "tiny", tmp_path / "m.pt", tmp_path / "runs", "cpu", data=fake_data,
              log=lambda *a: None)
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "runs").exists()


def test_cuda_code_paths_run_on_cpu(tmp_path, fake_data):
    # bf16 autocast and channels_last, forced on for the CPU: the same code the CUDA default
    # takes; the checkpoint must come out in plain fp32 with unprefixed names.
    cfg = _cfg(3)
    cfg.train.precision, cfg.train.channels_last = "bf16", "on"
    state = train(cfg, "tiny", tmp_path / "m.pt", tmp_path / "runs", "cpu", data=fake_data,
                  log=lambda *a: None)
    assert state["step"] == 3
    assert all(v.dtype in (torch.float32, torch.int64) for v in state["model"].values())
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in state["model"])


# sha256 of checkpoint.fingerprint() of the weights these runs trained before the redesign of
# the loop (tests/test_train.py's recipe below, one thread): the loop must not change a bit.
# Float sums depend on how they are split over threads, hence the one thread, and on the CPU's
# vector kernels: the first set came from the machine of the redesign, the second from an AMD
# EPYC, where the code of that redesign (commit 8f39286) gives these very digests.
TRAINED_DIGESTS = [{
    "tiny": "6c1114531f37c4f9a8a64069816186d75754e6a10560295c1ea080f7afb7de8f",
    "cpu16": "e6089a7e311ba6f1376fc8e6de678192ef20e4690ff45abceb84d3650aa0465d",
    "cpu16 ema": "7279425344359ebc335af951259f7bf376fdc56d33171f638ba55a16c8814652",
    "lora": "92ef2a04f3ed117bd1368d465de6890671dde0cf8c328980a23ac2e9aac00a2d",
}, {
    "tiny": "e72c7e18780e20c58c1dbd6d8fff9b3d0925352f4966aacff68278a400226358",
    "cpu16": "b657286c007cc877e8cfd39ba4baffc5ec982737b59e289d859034b4d85eff44",
    "cpu16 ema": "ad1eab3a8630a7c2b58542c3a9ce303b870674deeea7eea851e532a291653638",
    "lora": "2e44258a6f51f797852a8022b125999a2f6f16abdd64f085ce920f31fd81efc2",
}]


def _cpu16():
    """The cpu preset's recipe (EMA, null class, v, cosine schedule, AdamW, warmup, clipping)
    on a 16 px network."""
    cfg = get_preset("cpu")
    cfg.model.img_size, cfg.model.channels, cfg.model.time_emb_dim = 16, (8, 16), 16
    cfg.train.batch_size, cfg.train.warmup_steps, cfg.sample.steps = 16, 5, 5
    return cfg


def test_training_and_lora_train_the_same_weights_bit_for_bit_as_before(tmp_path, fake_data):
    from diffusion101.lora_finetune import finetune
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = {}
        # 20 steps of 16 a epoch: a save every 7, an epoch boundary, a grid, a stop mid-epoch
        for name, cfg in (("tiny", get_preset("tiny")), ("cpu16", _cpu16())):
            cfg.train.max_steps, cfg.train.epochs, cfg.train.save_every = 20, 3, 7
            torch.manual_seed(0)
            ckpt = train(cfg, name, tmp_path / f"{name}.pt", tmp_path / name, "cpu",
                         data=fake_data, log=lambda *a: None)
            got[name] = checkpoint.fingerprint(ckpt["model"])
            if "ema" in ckpt:
                got[f"{name} ema"] = checkpoint.fingerprint(ckpt["ema"])
        adapter = finetune(tmp_path / "tiny.pt", tmp_path / "lora.pt", torch.device("cpu"),
                           lora={"max_steps": 5}, data=fake_data, log=lambda *a: None)
        got["lora"] = checkpoint.fingerprint(adapter["lora"])
    finally:
        torch.set_num_threads(threads)
    assert got in TRAINED_DIGESTS


def test_tensorboard_shows_loss_lr_config_and_the_last_grid(tmp_path, fake_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = _cfg(5)  # a stop inside the first 16-step epoch: no epoch ends, the grid is logged anyway
    cfg.train.lr_schedule, cfg.train.warmup_steps = "cosine", 2
    train(cfg, "tiny", tmp_path / "m.pt", tmp_path / "runs", "cpu", data=fake_data,
          log=lambda *a: None)
    events = EventAccumulator(str(tmp_path / "runs"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5]
    # the rate the next step uses: warmup (2 steps) to the peak, then cosine down to 0 at step 5,
    # 0.5 (1 + cos(pi (k - 2) / 3)) of it after step k
    lr = [e.value for e in events.Scalars("train/lr")]
    assert lr == pytest.approx([1e-3, 1e-3, 0.75e-3, 0.25e-3, 0.0], rel=1e-6, abs=1e-12)
    assert [e.step for e in events.Images("samples")] == [5]
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "preset `tiny`" in text and '"lr_schedule": "cosine"' in text
