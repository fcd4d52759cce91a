"""Distillation (diffusion101/distill.py): on Gaussian data, where the teacher's ODE has a
closed-form solution, the pairs are that solution and the student's target walks to it in one
step; the loss falls on a fixed batch; a student is an ordinary checkpoint (.pt and
.safetensors, sampled by the usual commands) that resumes exactly; bad teachers are refused in
one line with nothing written."""
import dataclasses

import pytest
import torch
from torch import nn

from diffusion101 import checkpoint, distill as distillation
from diffusion101.cli import run_cli
from diffusion101.commands import distill_student
from diffusion101.config import DiffusionConfig, SampleConfig
from diffusion101.presets import get_preset
from diffusion101.denoise import make_sampler, sample
from diffusion101.distill import Pairs, Recipe, distill, make_pairs, pairs_path
from diffusion101.flow import FlowMatching
from diffusion101.model_files import export_for_sampling, load_model
from diffusion101.speed import Speed
from diffusion101.train import diffusion_loss
from diffusion101.train_state import build_state

FLOW = DiffusionConfig(objective="flow", clip="none", timesteps=100)
MU, S = 0.3, 0.5  # the data: every pixel N(MU, S^2), independent


class GaussianFlow(nn.Module):
    """The exact flow-matching velocity of Gaussian data N(MU, S^2) on x_t = (1 - t) x_0 + t z:
    E[z | x_t] - E[x_0 | x_t] (the teacher, with straight=False), or the velocity of each
    pair's straight line from z to its ODE image MU + S z (the student's target)."""

    def __init__(self, straight: bool):
        super().__init__()
        self.cfg = dataclasses.replace(get_preset("tiny").model, img_size=4)
        self.mu = nn.Parameter(torch.tensor(MU))  # (a parameter: the device and fingerprint)
        self.straight, self.null_label = straight, None

    def forward(self, x, t_net, labels):
        t = (t_net / (FLOW.timesteps - 1)).view(-1, 1, 1, 1)
        if self.straight:  # x_t = (1 - t)(MU + S z) + t z: read z off x_t, then z - x_0
            z = (x - (1 - t) * self.mu) / ((1 - t) * S + t)
            return z - (self.mu + S * z)
        var = (1 - t) ** 2 * S ** 2 + t ** 2
        centred = x - (1 - t) * self.mu
        return t * centred / var - (self.mu + (1 - t) * S ** 2 * centred / var)


def _walk(model, sampler_name, steps, noise):
    cfg = SampleConfig(sampler=sampler_name, steps=steps, guidance=1.0)
    images, _ = sample(model, make_sampler(cfg, FLOW), torch.zeros(len(noise), dtype=torch.long),
                       cfg, start=noise)
    return images


def test_the_pairs_of_an_exact_teacher_are_its_ode_solution_in_closed_form(tmp_path, monkeypatch):
    # The teacher's ODE carries z to MU + S z (each pixel's quantile is kept). Pairs made in
    # chunks, saved and continued, must pair each noise with the image made from it.
    monkeypatch.setattr(distillation, "CHUNK", 10)
    teacher, cfg = GaussianFlow(straight=False), get_preset("tiny")
    cfg.diffusion = FLOW
    walk = SampleConfig(sampler="heun", steps=128, guidance=1.0)
    path = tmp_path / "p.pt"
    first = make_pairs(teacher, cfg, walk, 15, 0, path, log=lambda *a: None)
    pairs = make_pairs(teacher, cfg, walk, 25, 0, path, log=lambda *a: None)  # 10 more
    assert torch.equal(pairs.noise[:15], first.noise) and torch.equal(pairs.images[:15], first.images)
    assert len(pairs) == 25 and pairs.labels.tolist() == [k % 10 for k in range(25)]
    error = (pairs.images - (MU + S * pairs.noise)).abs().max().item()
    assert error < 1e-3, error
    assert pairs.noise.std().item() == pytest.approx(1.0, abs=0.1)  # fresh noise, not zeros
    # another walk's (or seed's) file is refused, not overwritten
    before = path.read_bytes()
    with pytest.raises(distillation.UserError, match="another teacher, sampler or seed"):
        make_pairs(teacher, cfg, walk, 25, 1, path, log=lambda *a: None)
    assert path.read_bytes() == before


def test_the_student_target_jumps_where_the_teacher_walks():
    # The student learns each pair's straight line: 1, 2 or 4 Euler steps land on the ODE's
    # image MU + S z exactly; the teacher's curved field needs many steps to get there.
    noise = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    exact = MU + S * noise
    student, teacher = GaussianFlow(straight=True), GaussianFlow(straight=False)
    for steps in (1, 2, 4):
        assert (_walk(student, "euler", steps, noise) - exact).abs().max() < 1e-5
        assert (_walk(teacher, "euler", steps, noise) - exact).abs().max() > 0.02
    # the student's loss on the pairs, at the times of its walk, is zero for that field alone
    pairs = Pairs(exact, torch.zeros(6, dtype=torch.long), noise)
    walk4 = FlowMatching(dataclasses.replace(FLOW, t_sampling="walk", walk_steps=4))
    recipe = get_preset("tiny").train
    recipe.loss = "mse"
    losses = {}
    for name, net in (("student", student), ("teacher", teacher)):
        g = torch.Generator().manual_seed(0)
        losses[name] = diffusion_loss(net, walk4, pairs.batch(torch.arange(6)), g, recipe).item()
    assert losses["student"] < 1e-10 and losses["teacher"] > 1e-3, losses


def test_walk_times_are_the_grid_of_the_walk():
    cfg = dataclasses.replace(FLOW, t_sampling="walk", walk_steps=4)
    t = FlowMatching(cfg).sample_timesteps(40_000, torch.Generator().manual_seed(0))
    values, counts = t.unique(return_counts=True)
    assert values.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert (counts / 40_000 - 0.25).abs().max() < 0.01


def _flow_teacher(path, seed=0):
    torch.manual_seed(seed)
    cfg = get_preset("tiny")
    cfg.diffusion = FLOW
    cfg.sample = SampleConfig(sampler="euler", steps=4, guidance=1.0)
    from diffusion101.unet import UNet
    checkpoint.save(checkpoint.model_file(cfg, "tiny", {"model": UNet(cfg.model).state_dict()}), path)
    return cfg


def test_the_student_loss_falls_on_a_fixed_batch(tmp_path):
    cfg = _flow_teacher(tmp_path / "t.pt")
    teacher, _, _ = load_model(tmp_path / "t.pt")
    pairs = make_pairs(teacher, cfg, cfg.sample, 16, 0, tmp_path / "p.pt", log=lambda *a: None)
    student_cfg = distillation.student_config(cfg, Recipe(steps=2, lr=3e-3), 16)
    state = build_state(student_cfg, "cpu", Speed(), 40)
    objective = FlowMatching(student_cfg.diffusion)
    from diffusion101.train import train_step
    batch = pairs.batch(torch.arange(16))
    losses = [train_step(state, objective, batch, student_cfg.train, Speed()) for _ in range(40)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_a_teacher_of_named_rgb_classes_gets_a_student_of_them():
    cfg = get_preset("tiny")
    cfg.model.class_names, cfg.model.num_classes, cfg.model.in_channels = ("circle", "square"), 2, 3
    cfg.train.data = "shapes"
    student = distillation.student_config(cfg, Recipe(), 100)
    assert student.model == cfg.model and student.train.data == "shapes"  # (validated: a
    # student of a folder's classes trained "on mnist" would be refused)


def _recipe(**kw):
    return Recipe(**{"steps": 2, "pairs": 32, "max_steps": 6, "batch_size": 16, **kw})


def test_a_student_is_an_ordinary_checkpoint_that_resumes_exactly(tmp_path, monkeypatch, fake_data):
    import diffusion101 as d
    from diffusion101 import train as training
    _flow_teacher(tmp_path / "t.pt")
    quiet = dict(log=lambda *a: None)
    whole = distill(tmp_path / "t.pt", tmp_path / "a.pt", "cpu", _recipe(), logdir=tmp_path / "r", **quiet)
    assert whole["step"] == 6 and len(torch.load(pairs_path(tmp_path / "a.pt"))["labels"]) == 32
    cfg = checkpoint.config_of(whole)
    assert (cfg.diffusion.objective, cfg.diffusion.t_sampling, cfg.diffusion.walk_steps) == ("flow", "walk", 2)
    assert (cfg.sample.sampler, cfg.sample.steps, cfg.sample.guidance) == ("euler", 2, 1.0)
    # stopped after step 4 (the end of the second epoch of 2 batches), then resumed: the same weights
    real_step = training.train_step

    def stop_after_4(state, *args):
        if state.step == 4:
            raise KeyboardInterrupt
        return real_step(state, *args)
    monkeypatch.setattr(training, "train_step", stop_after_4)
    with pytest.raises(KeyboardInterrupt):
        distill(tmp_path / "t.pt", tmp_path / "b.pt", "cpu", _recipe(), logdir=tmp_path / "r", **quiet)
    monkeypatch.setattr(training, "train_step", real_step)
    assert torch.load(tmp_path / "b.pt", weights_only=True)["step"] == 4
    resumed = distill(tmp_path / "t.pt", tmp_path / "b.pt", "cpu", _recipe(), resume=True,
                      logdir=tmp_path / "r", **quiet)
    assert all(torch.equal(whole["ema"][k], resumed["ema"][k]) for k in whole["ema"])
    from diffusion101.commands import train as train_command  # (its data are the pairs)
    assert run_cli(train_command, ["--resume", "--out", str(tmp_path / "a.pt")]) == 2
    # .pt and its .safetensors export sample the same digits, by the API too
    export_for_sampling(tmp_path / "a.pt", tmp_path / "a.safetensors", **quiet)
    images = [d.sample(d.load(tmp_path / f"a.{ext}"), classes=[3, 7], seed=5) for ext in ("pt", "safetensors")]
    assert images[0].shape == (2, 16, 16) and torch.equal(images[0], images[1])
    # and it takes LoRA like any flow model
    from diffusion101.lora_finetune import finetune
    finetune(tmp_path / "a.pt", tmp_path / "lora.pt", "cpu", lora={"max_steps": 2}, data=fake_data, **quiet)
    adapted = d.sample(d.load(tmp_path / "a.pt", loras=[tmp_path / "lora.pt"]), classes=[3, 7], seed=5)
    assert adapted.shape == images[0].shape and torch.isfinite(adapted).all()


def _refused(argv, capsys):
    code = run_cli(distill_student, argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_teachers_are_refused_in_one_line_and_nothing_is_written(tmp_path, capsys):
    _flow_teacher(tmp_path / "t.pt")
    adapter = checkpoint.lora_file(get_preset("tiny"), {}, 4, 1.0, ["w_q"], "0" * 64, 5)
    checkpoint.save(adapter, tmp_path / "lora.pt")
    (tmp_path / "notes.pt").write_text("not a model")
    ddpm = get_preset("tiny")  # its own walk is DDPM's: random, so no pairs
    from diffusion101.unet import UNet
    checkpoint.save(checkpoint.model_file(ddpm, "tiny", {"model": UNet(ddpm.model).state_dict()}),
                    tmp_path / "ddpm.pt")
    cases = {"lora.pt": "LoRA adapter", "notes.pt": "truncated or corrupt", "ddpm.pt": "deterministic",
             "missing.pt": "not found"}
    outs = [tmp_path / f"s{i}.pt" for i in range(len(cases) + 3)]  # (each run locks its --out)
    for out, (name, message) in zip(outs, cases.items()):
        assert message in _refused(["--teacher", str(tmp_path / name), "--out", str(out)], capsys)
    teacher = str(tmp_path / "t.pt")
    assert "is also --teacher" in _refused(["--teacher", teacher, "--out", teacher], capsys)
    assert "distill.steps" in _refused(["--teacher", teacher, "--out", str(outs[-2]), "--steps", "0"],
                                       capsys)
    assert "nothing to resume" in _refused(["--teacher", teacher, "--out", str(outs[-1]), "--resume"],
                                           capsys)
    assert not any(out.exists() or pairs_path(out).exists() for out in outs)


def test_resume_takes_only_a_student_of_this_teacher(tmp_path, capsys):
    """Mechanism 1 of round four: the file --resume continues is checked for what it is."""
    from diffusion101.commands import train as train_command
    _flow_teacher(tmp_path / "t.pt")
    quiet = dict(log=lambda *a: None)
    # an ordinary training run of the teacher's own architecture: resuming it as a student
    # would train it on pairs and overwrite it
    assert run_cli(train_command, ["--preset", "tiny", "--max-steps", "1", "--out",
                                   str(tmp_path / "run.pt"), "--logdir", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    before = (tmp_path / "run.pt").read_bytes()
    err = _refused(["--teacher", str(tmp_path / "t.pt"), "--out", str(tmp_path / "run.pt"),
                    "--resume"], capsys)
    assert "not a distilled student" in err and (tmp_path / "run.pt").read_bytes() == before
    # a student, of a teacher of another network
    distill(tmp_path / "t.pt", tmp_path / "s.pt", "cpu", _recipe(), logdir=tmp_path / "r", **quiet)
    cfg = get_preset("tiny")
    cfg.model.channels, cfg.diffusion, cfg.sample = (8, 8), FLOW, SampleConfig(sampler="euler", steps=4)
    from diffusion101.unet import UNet
    checkpoint.save(checkpoint.model_file(cfg, "tiny", {"model": UNet(cfg.model).state_dict()}),
                    tmp_path / "other.pt")
    capsys.readouterr()
    assert "another network" in _refused(["--teacher", str(tmp_path / "other.pt"), "--out",
                                          str(tmp_path / "s.pt"), "--resume"], capsys)


def test_flags_given_on_resume_are_honoured_or_refused(tmp_path, capsys):
    _flow_teacher(tmp_path / "t.pt")
    quiet = dict(log=lambda *a: None)
    distill(tmp_path / "t.pt", tmp_path / "s.pt", "cpu", _recipe(), logdir=tmp_path / "r", **quiet)
    capsys.readouterr()
    base = ["--teacher", str(tmp_path / "t.pt"), "--out", str(tmp_path / "s.pt"), "--resume",
            "--logdir", str(tmp_path / "r")]
    before = (tmp_path / "s.pt").read_bytes()
    for flags, words in ((["--steps", "4"], "--steps 4: the student"), (["--lr", "0.5"], "--lr 0.5"),
                         (["--batch-size", "8"], "--batch-size 8"), (["--pairs", "64"], "--pairs 64")):
        assert run_cli(distill_student, base + flags) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]  # (after the pairs' bar)
        assert words in last and last.startswith("error:"), flags
    assert (tmp_path / "s.pt").read_bytes() == before
    # --max-steps is honoured: the student, trained 6 steps, trains on to 9
    assert run_cli(distill_student, base + ["--max-steps", "9"]) == 0
    saved = torch.load(tmp_path / "s.pt", weights_only=True)
    assert saved["step"] == 9 and checkpoint.config_of(saved).train.max_steps == 9


def _pairs_file(tmp_path):
    cfg = _flow_teacher(tmp_path / "t.pt")
    teacher, _, _ = load_model(tmp_path / "t.pt")
    path = tmp_path / "p.pt"
    make_pairs(teacher, cfg, cfg.sample, 8, 0, path, log=lambda *a: None)
    return teacher, cfg, path


@pytest.mark.parametrize("change,words", [
    (lambda d: d.update(images=d["images"][:, :, :8, :8], noise=d["noise"][:, :, :8, :8]), "float32 (N, 1, 16, 16)"),
    (lambda d: d.update(labels=d["labels"].float()), "int64 labels"),
    (lambda d: d.update(labels=d["labels"].to(torch.int8)), "int64 labels"),
    (lambda d: d.update(images=d["images"].double()), "float32"),
    (lambda d: d.update(noise=torch.cat([d["noise"]] * 3, dim=1)), "float32 (N, 1, 16, 16)"),
    (lambda d: d["labels"].__setitem__(0, 10), "labels outside 0..9"),
    (lambda d: d["labels"].__setitem__(0, -1), "labels outside 0..9"),
    (lambda d: d["images"].__setitem__((0, 0, 0, 0), float("nan")), "NaN or inf"),
])
def test_a_pairs_file_is_checked_for_what_it_holds(tmp_path, change, words):
    teacher, cfg, path = _pairs_file(tmp_path)
    saved = torch.load(path, weights_only=True)
    change(saved)
    torch.save(saved, path)
    with pytest.raises(distillation.UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        distillation.read_pairs(path, saved["teacher"], saved["walk"], saved["seed"], teacher.cfg)


def test_pairs_are_counted_first_and_the_file_is_rewritten_a_few_times(tmp_path, monkeypatch):
    from diffusion101 import memory
    teacher, cfg, path = _pairs_file(tmp_path)
    monkeypatch.setattr(memory, "device_memory", lambda device: 10 ** 6)  # 1 MB to spare
    with pytest.raises(distillation.UserError, match="100,000 pairs needs about"):
        make_pairs(teacher, cfg, cfg.sample, 100_000, 0, tmp_path / "big.pt", log=lambda *a: None)
    assert not (tmp_path / "big.pt").exists()
    monkeypatch.undo()
    # chunks of 4 pairs: 40 pairs are saved after 4, 8, 16, 32 and 40 (not after each chunk),
    # and hold what one call made at once holds
    monkeypatch.setattr(distillation, "CHUNK", 4)
    writes = []
    real = distillation.atomic_write
    monkeypatch.setattr(distillation, "atomic_write", lambda p, fn, **kw: (writes.append(p), real(p, fn, **kw)))
    pairs = make_pairs(teacher, cfg, cfg.sample, 40, 0, tmp_path / "q.pt", log=lambda *a: None)
    assert len(writes) == 5
    saved = torch.load(tmp_path / "q.pt", weights_only=True)
    assert torch.equal(saved["images"], pairs.images) and len(saved["labels"]) == 40
    first = torch.load(path, weights_only=True)  # the 8 made by _pairs_file, in chunks of 1000
    assert torch.equal(first["noise"], saved["noise"][:8])
