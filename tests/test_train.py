import pytest
import torch
import torch.nn.functional as F

from diffusion101 import checkpoint
from diffusion101.config import UserError
from diffusion101.presets import get_preset
from diffusion101.dataset import load_mnist
from diffusion101.diffusion import NoiseSchedule
from diffusion101.train_run import train
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
    from diffusion101.settings import apply_override
    from diffusion101.diffusion import NoiseSchedule
    from diffusion101.speed import Speed
    from diffusion101.train import train_step
    from diffusion101.train_state import build_state
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
        losses.append(train_step(state, sched, (x0, y), cfg.train, speed))
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


def test_resume_refuses_another_batch_size_and_a_shrunken_data_set(tmp_path, fake_data):
    # the position inside the epoch counts batches of the run's size in the run's data: with
    # another size, or fewer images, it would point elsewhere (or past the end)
    from diffusion101.dataset import ImageData
    out = tmp_path / "model.pt"
    train(_cfg(12), "tiny", out, tmp_path / "runs", "cpu", data=fake_data, log=lambda *a: None)
    before = out.read_bytes()
    other = _cfg(20)
    other.train.batch_size = 8
    with pytest.raises(UserError, match="batches of 16: resume with that batch size"):
        train(other, "tiny", out, tmp_path / "runs", "cpu", resume=True, data=fake_data,
              log=lambda *a: None)
    fewer = ImageData(fake_data.images[:64], fake_data.labels[:64])  # 4 batches an epoch, not 16
    with pytest.raises(UserError, match="stopped at batch 12 of an epoch that now has 4"):
        train(_cfg(20), "tiny", out, tmp_path / "runs", "cpu", resume=True, data=fewer,
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


def test_cuda_graphs_are_refused_off_cuda_in_one_line_and_nothing_is_written(tmp_path, fake_data):
    from diffusion101.speed import Speed
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


def _cpu16():
    """The cpu-ddpm preset's recipe (EMA, null class, v, cosine schedule, AdamW, warmup,
    clipping) on a 16 px network."""
    cfg = get_preset("cpu-ddpm")
    cfg.model.img_size, cfg.model.channels, cfg.model.time_emb_dim = 16, (8, 16), 16
    cfg.train.batch_size, cfg.train.warmup_steps, cfg.sample.steps = 16, 5, 5
    return cfg


def plain_loop(cfg, data, steps: int) -> tuple:
    """The training recipe of `cfg` written out as the plainest loop: no checkpoints, grids,
    clocks or progress bars. (weights, EMA weights or None) after `steps` steps. The loop of
    train.py must train exactly these weights: whatever it does beside the steps (saving,
    drawing grids, crossing epochs, resuming) must not touch what the steps compute."""
    import math

    from diffusion101.dataset import epoch_batches
    from diffusion101.ema import EMA
    recipe = cfg.train
    torch.manual_seed(recipe.seed)
    model = UNet(cfg.model)
    kind = torch.optim.AdamW if recipe.optimizer == "adamw" else torch.optim.Adam
    opt = kind(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)

    def factor(k):  # warm-up then cosine to zero at the last step, or constant
        if recipe.lr_schedule == "constant":
            return 1.0
        if k < recipe.warmup_steps:
            return (k + 1) / recipe.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (k - recipe.warmup_steps) / max(1, steps - recipe.warmup_steps))))

    lr = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    ema = EMA(model, recipe.ema_decay) if recipe.ema_decay > 0 else None
    g = torch.Generator().manual_seed(recipe.seed)
    schedule = NoiseSchedule(cfg.diffusion)
    step = 0
    for epoch in range(recipe.epochs):
        for idx in epoch_batches(len(data), recipe.batch_size, recipe.seed, epoch):
            x0, y = data.batch(idx)
            t = torch.randint(0, cfg.diffusion.timesteps, (len(y),), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            if recipe.p_uncond > 0:  # some labels become the null class
                y = torch.where(torch.rand(len(y), generator=g) < recipe.p_uncond,
                                torch.full_like(y, model.null_label), y)
            pred = model(schedule.add_noise(x0, noise, t), t, y)
            target = schedule.target(x0, noise, t)
            loss = F.l1_loss(pred, target) if recipe.loss == "l1" else F.mse_loss(pred, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            opt.step()
            lr.step()
            if ema is not None:
                ema.update(model, step)
            step += 1
            if step == steps:
                return model.state_dict(), None if ema is None else ema.state_dict()
    raise AssertionError("the recipe has fewer steps than asked")


def assert_same_weights(got: dict, want: dict, what: str):
    assert got.keys() == want.keys(), what
    for k in want:
        assert torch.equal(got[k], want[k]), f"{what}: {k} differs"


@pytest.mark.parametrize("name", ["tiny", "cpu16"])
def test_the_loop_trains_the_weights_of_a_plain_loop_bit_for_bit(tmp_path, fake_data, name):
    # 20 steps of 16 an epoch: a save every 7, an epoch boundary, a grid, a stop mid-epoch. Both
    # runs are in this process, on the same kernels and threads: equal bits on any machine.
    cfg = get_preset("tiny") if name == "tiny" else _cpu16()
    cfg.train.max_steps, cfg.train.epochs, cfg.train.save_every = 20, 3, 7
    ckpt = train(cfg, name, tmp_path / "m.pt", tmp_path / "runs", "cpu", data=fake_data,
                 log=lambda *a: None)
    weights, ema = plain_loop(cfg, fake_data, 20)
    assert_same_weights(ckpt["model"], weights, name)
    if ema is not None:
        assert_same_weights(ckpt["ema"], ema, f"{name} EMA")
    assert ("ema" in ckpt) == (ema is not None)


def test_lora_finetuning_trains_the_adapter_of_a_plain_loop_bit_for_bit(tmp_path, fake_data):
    from diffusion101.dataset import epoch_batches
    from diffusion101.lora import inject_lora, lora_state_dict
    from diffusion101.lora_finetune import finetune
    from diffusion101.model_files import load_model
    cfg = get_preset("tiny")
    cfg.train.max_steps = 3
    train(cfg, "tiny", tmp_path / "base.pt", tmp_path / "runs", "cpu", data=fake_data,
          log=lambda *a: None)
    torch.manual_seed(5)
    adapter = finetune(tmp_path / "base.pt", tmp_path / "lora.pt", torch.device("cpu"),
                       lora={"max_steps": 20}, data=fake_data, log=lambda *a: None)
    # the same by hand: the base's weights, adapters on the default targets, Adam on them alone,
    # the base's loss at the lora section's batch size and rate, from seed 0 (the adapters'
    # random A drawn from the global generator, after the base's own initialisation)
    torch.manual_seed(5)
    model, ckpt, _ = load_model(tmp_path / "base.pt", device="cpu")
    model.load_state_dict(ckpt["ema"] if "ema" in ckpt else ckpt["model"])
    lora_cfg = cfg.lora
    inject_lora(model, lora_cfg.r, lora_cfg.alpha, lora_cfg.targets)
    model.train()
    for m in model.modules():  # the base is frozen, BatchNorm's running statistics too
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lora_cfg.lr)
    g, schedule, step = torch.Generator().manual_seed(0), NoiseSchedule(cfg.diffusion), 0
    while step < 20:
        for idx in epoch_batches(len(fake_data), lora_cfg.batch_size, 0, step // 16):
            x0, y = fake_data.batch(idx)
            t = torch.randint(0, cfg.diffusion.timesteps, (len(y),), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            loss = F.l1_loss(model(schedule.add_noise(x0, noise, t), t, y), schedule.target(x0, noise, t))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step == 20:
                break
    assert adapter["steps"] == 20
    assert_same_weights(adapter["lora"], lora_state_dict(model), "LoRA")


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
