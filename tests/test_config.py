import pytest

from diffusion101.config import Config, UserError, get_preset

from diffusion101.settings import apply_override, validate


def test_reference_preset_is_spec():
    cfg = get_preset("reference")
    assert cfg.model.img_size == 48 and cfg.model.channels == (64, 128, 256, 512, 1024)
    assert cfg.model.time_emb_dim == 256 and cfg.model.cls_emb_dim == 32
    assert (cfg.model.q_dim, cfg.model.v_dim, cfg.model.ffn_dim) == (16, 16, 32)
    assert (cfg.diffusion.timesteps, cfg.diffusion.beta_start, cfg.diffusion.beta_end) == (1000, 1e-4, 0.02)
    assert cfg.diffusion.clip == "x_t"
    t = cfg.train
    assert (t.loss, t.lr, t.batch_size, t.epochs) == ("l1", 1e-3, 400, 200)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.targets) == (8, 1.0, ("w_q", "w_k", "w_v"))


def test_override_types_and_round_trip():
    cfg = get_preset("tiny")
    apply_override(cfg, "model.channels=4,8,16")
    apply_override(cfg, "train.lr=0.5")
    apply_override(cfg, "lora.targets=w_v")
    assert cfg.model.channels == (4, 8, 16) and cfg.train.lr == 0.5 and cfg.lora.targets == ("w_v",)
    again = Config.from_dict(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize("bad", ["model.nope=1", "nope.x=1", "train.lr=abc", "trainlr=1", "train.lr"])
def test_bad_override_is_user_error(bad):
    with pytest.raises(UserError):
        apply_override(get_preset("tiny"), bad)


def test_unknown_preset():
    with pytest.raises(UserError, match="unknown preset"):
        get_preset("huge")


def test_validate_rejects_indivisible_size():
    cfg = get_preset("tiny")
    cfg.model.img_size = 15
    with pytest.raises(UserError, match="divisible"):
        validate(cfg)


def _numeric_fields():
    import dataclasses
    cfg = get_preset("tiny")
    for section in ("model", "diffusion", "train", "lora", "sample"):
        for f in dataclasses.fields(getattr(cfg, section)):
            if "range" in f.metadata:
                yield f"{section}.{f.name}", f.metadata["range"]


@pytest.mark.parametrize("key,rng", list(_numeric_fields()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_number_refuses_nan_inf_and_its_out_of_range_neighbours(key, rng):
    lo, hi, above_lo, below_hi = rng
    # the value just outside each end (the end itself where that end is open)
    outside = [lo if above_lo else lo - 1, hi if below_hi else hi * 2 + 1]
    for text in ["nan", "inf", "-inf"] + [repr(v) for v in outside]:
        cfg = get_preset("tiny")
        try:
            apply_override(cfg, f"{key}={text}")
        except UserError:
            continue  # refused while parsing (an int field given 'nan'): fine too
        with pytest.raises(UserError, match=key.replace(".", r"\.")):
            validate(cfg)


def test_a_hand_edited_config_in_a_file_is_refused_with_the_field_name():
    from diffusion101.checkpoint import config_of
    for section, name, value in [("model", "num_classes", 0), ("model", "in_channels", 3),
                                 ("model", "cls_emb_dim", -1), ("model", "channels", ["a"]),
                                 ("train", "lr", float("nan")), ("sample", "guidance", "2"),
                                 ("model", "null_class", "yes"), ("model", "channels", 8),
                                 ("model", "class_names", "abc"), ("train", "data", 3)]:
        d = get_preset("tiny").to_dict()
        d[section][name] = value
        with pytest.raises(UserError, match=f"{section}.{name}"):
            config_of({"config": d})
    assert config_of({"config": get_preset("tiny").to_dict()}) == get_preset("tiny")


def test_attention_must_remain_somewhere():
    cfg = get_preset("tiny")  # two levels: 0 and 1
    cfg.model.attn_from_level = 1
    validate(cfg)
    cfg.model.attn_from_level = 2
    with pytest.raises(UserError, match="attn_from_level=2 leaves no cross-attention"):
        validate(cfg)


def test_a_field_this_version_does_not_know_is_refused_by_name():
    old = get_preset("cpu").to_dict()
    old["train"]["eval_every"] = 2  # a field of an early version, never in a shipped file
    with pytest.raises(UserError, match="unknown config field 'train.eval_every'"):
        Config.from_dict(old)


def _folder_model(**model):
    """The tiny preset as a folder of shapes sets it up (dataset.training_data)."""
    cfg = get_preset("tiny")
    cfg.train.data = "shapes"
    cfg.model.num_classes, cfg.model.class_names = 3, ("circle", "square", "triangle")
    for name, value in model.items():
        setattr(cfg.model, name, value)
    return cfg


@pytest.mark.parametrize("change, match", [
    ({"in_channels": 2}, "1 \\(grey\\) or 3 \\(RGB\\)"),
    ({"num_classes": 4}, "names 3 classes, model.num_classes is 4"),
    ({"class_names": ("a", "a", "b")}, "each class once"),
    ({"class_names": ("a", "b", "c,d")}, "cannot be a caption"),
    ({"class_names": ("a", "b", "line\nbreak")}, "cannot be a caption"),
    ({"class_names": ("a", "b", " padded")}, "cannot be a caption"),
    ({"class_names": ("a", "b", "x" * 41)}, "cannot be a caption"),
    ({"class_names": ("a", "b", "bad\udcff")}, "cannot be a caption"),  # undecodable file name
    ({"num_classes": 1001, "class_names": ()}, "at most 1000 classes"),
])
def test_a_folder_models_classes_are_checked(change, match):
    validate(_folder_model())
    validate(_folder_model(in_channels=3))
    with pytest.raises(UserError, match=match):
        validate(_folder_model(**change))


def test_mnist_means_ten_grey_digits_and_only_they_are_scored():
    from diffusion101.settings import class_names, is_mnist_model
    for change in ({"num_classes": 3}, {"in_channels": 3}, {"class_names": tuple("0123456789")}):
        cfg = get_preset("tiny")
        for name, value in change.items():
            setattr(cfg.model, name, value)
        with pytest.raises(UserError, match="train.data=mnist holds the ten grey digits"):
            validate(cfg)
    cfg = _folder_model()
    assert class_names(cfg.model) == ("circle", "square", "triangle")
    assert class_names(get_preset("tiny").model) == tuple("0123456789")
    assert is_mnist_model(get_preset("tiny").model) and not is_mnist_model(cfg.model)
    cfg.train.eval_every_steps = 10
    with pytest.raises(UserError, match="eval_every_steps scores with the MNIST classifier"):
        validate(cfg)
    cfg = get_preset("tiny")
    with pytest.raises(UserError, match="train.data must be a non-empty text"):
        apply_override(cfg, "train.data=")
        validate(cfg)


def test_set_and_files_reach_only_the_config_fields():
    # a section is one of the five dataclass fields, never another attribute of the config
    cfg = get_preset("tiny")
    for bad in ("__class__.model=1", "to_dict.x=1", "section.x=1"):
        with pytest.raises(UserError, match="unknown config section"):
            apply_override(cfg, bad)
    with pytest.raises(UserError, match="unknown config section '__class__'"):
        Config.from_dict({"__class__": {"model": 1}})
    assert "model" not in vars(Config)  # the class itself was not given a field


def test_sampling_settings_that_would_fail_at_the_first_grid_fail_before_the_first_step(tmp_path, capsys):
    # a guided sampler on a model without a null class, an auto rule without its guide, a
    # sampler of the other objective: each would only fail when training draws its grid
    from diffusion101.cli import run_cli
    from diffusion101.commands import train as train_command
    for setting, words in (("sample.guidance=2", "needs a model trained with a null class"),
                           ("sample.guidance_rule=auto", "needs sample.guide"),
                           ("sample.sampler=euler", "use ddpm, ddim or dpm")):
        cfg = get_preset("tiny")
        apply_override(cfg, setting)
        with pytest.raises(UserError, match=words):
            validate(cfg)
        out = tmp_path / "m.pt"
        assert run_cli(train_command, ["--preset", "tiny", "--set", setting, "--out", str(out)]) == 2
        assert not out.exists()
    guided = get_preset("tiny")
    guided.model.null_class, guided.train.p_uncond, guided.sample.guidance = True, 0.1, 2.0
    validate(guided)  # with its null class, the same guidance is fine
    # autoguidance with its guide named: a fine model file's setting, but training's grids
    # load no guide network, so the training command refuses it before the first step
    (tmp_path / "guide.pt").write_bytes(b"")
    auto = ["--set", "model.null_class=true", "--set", "train.p_uncond=0.1", "--set",
            "sample.guidance=2", "--set", "sample.guidance_rule=auto", "--set",
            f"sample.guide={tmp_path / 'guide.pt'}"]
    capsys.readouterr()
    assert run_cli(train_command, ["--preset", "tiny", *auto, "--out", str(out)]) == 2
    assert "without a guide network" in capsys.readouterr().err and not out.exists()


def test_memory_is_estimated_before_it_is_spent(tmp_path, monkeypatch):
    from diffusion101 import checkpoint, settings
    from diffusion101.model_files import load_model
    from diffusion101.unet import UNet
    from conftest import tiny_checkpoint
    for name in ("tiny", "cpu", "reference"):  # counted on the meta device, as built for real
        m = get_preset(name).model
        assert settings.parameter_count(m) == sum(p.numel() for p in UNet(m).parameters())
        assert settings.activation_floats(m, training=True) > settings.activation_floats(m, training=False) > 0
    monkeypatch.setattr(settings, "device_memory", lambda device: 2 ** 30)  # a 1 GiB machine
    cpu = get_preset("cpu").model
    settings.check_memory(cpu, 20, "cpu")  # the grid of digits 0-9, guided
    settings.check_memory(cpu, 128, "cpu", training=True)
    with pytest.raises(UserError, match=r"sampling 200,000 images at once .* needs about [\d,.]+ GiB"):
        settings.check_memory(cpu, 200_000, "cpu")
    big = get_preset("cpu").model
    big.img_size = 512
    with pytest.raises(UserError, match="training in batches of 128"):
        settings.check_memory(big, 128, "cpu", training=True)
    # a small file whose config asks for a huge network: refused from the counts alone
    crafted = tiny_checkpoint()
    crafted["config"]["model"]["channels"] = [8192, 8192]
    checkpoint.save(crafted, tmp_path / "crafted.pt")
    with pytest.raises(UserError, match=r"describes a network of [\d,]+ parameters, but its weights hold"):
        load_model(tmp_path / "crafted.pt")


@pytest.mark.parametrize("preset,settings,words", [
    # a walk its sampler cannot take (issue 46's two, and two more)
    ("cpu", ["sample.steps=20000"], "steps must be in 1..10000"),
    ("tiny", ["sample.sampler=ddpm", "sample.steps=7"], "DDPM samples with all 100 steps"),
    ("cpu-ddpm", ["sample.sampler=ddpm", "sample.steps=999"], "DDPM samples with all 1000 steps"),
    ("tiny", ["sample.sampler=ddim", "sample.steps=101"], r"steps must be in 1\.\.100"),
    # settings the walk would ignore
    ("tiny", ["sample.shift=3"], "sample.shift bends flow matching's time grid"),
    ("cpu", ["sample.eta=0.5"], "sample.eta and sample.timestep_spacing shape a DDPM"),
    ("cpu", ["sample.timestep_spacing=trailing"], "a flow model's time grid takes sample.shift"),
    ("tiny", ["sample.sampler=dpm", "sample.steps=10", "sample.eta=0.3"], "eta is DDIM's noise"),
    ("cpu", ["sample.guidance=1", "sample.guidance_rule=apg"], "guides nothing"),
    ("cpu", ["sample.shift=1e-300"], r"sample\.shift"),  # NaN samples once
])
def test_a_setting_a_run_will_use_later_is_built_and_checked_before_the_first_step(
        tmp_path, capsys, preset, settings, words):
    """Training, export and sampling build their sampler from the config before any work:
    what used to train for minutes and then fail at the first grid (before its save), or be
    silently dropped, is one line, and nothing is written."""
    from diffusion101.cli import run_cli
    from diffusion101.commands import export, train
    from diffusion101.model_files import FLOW_PATH, SHIPPED_PATH
    sets = [a for s in settings for a in ("--set", s)]
    out = tmp_path / "m.pt"
    assert run_cli(train, ["--preset", preset, *sets, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and __import__("re").search(words, err[0]), err
    assert not out.exists() and not (tmp_path / "runs").exists()
    if preset in ("cpu", "cpu-ddpm") and all(s.startswith("sample.") for s in settings):
        src = FLOW_PATH if preset == "cpu" else SHIPPED_PATH  # the same settings on a file
        assert run_cli(export, [str(src), str(tmp_path / "e.pt"), *sets]) == 2
        assert __import__("re").search(words, capsys.readouterr().err)
        assert not (tmp_path / "e.pt").exists()


def _kernel(tmp_path, monkeypatch, files: dict, address_space=None):
    """settings.cpu_memory reading a made-up /proc and /sys/fs/cgroup (and, if given, an
    address-space limit in bytes)."""
    import resource

    from diffusion101 import settings
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(settings, "PROC", tmp_path / "proc")
    monkeypatch.setattr(settings, "CGROUP", tmp_path / "cgroup")
    limit = resource.RLIM_INFINITY if address_space is None else address_space
    monkeypatch.setattr(resource, "getrlimit", lambda which: (limit, resource.RLIM_INFINITY))
    return settings


GIB = 2 ** 30


@pytest.mark.parametrize("files,address_space,room", [
    # what the machine has available, then less under each kind of limit
    ({"proc/meminfo": f"MemTotal: 99 kB\nMemAvailable: {GIB // 1024} kB\n"}, None, GIB),
    ({"proc/meminfo": "MemAvailable: 99999999999 kB\n", "proc/self/cgroup": "0::/job\n",
      "cgroup/job/memory.max": str(3 * GIB), "cgroup/job/memory.current": str(GIB)}, None, 2 * GIB),
    ({"proc/self/cgroup": "4:memory:/box\n1:name=systemd:/\n",
      "cgroup/memory/box/memory.limit_in_bytes": str(3 * GIB),
      "cgroup/memory/box/memory.usage_in_bytes": str(GIB // 2)}, None, 5 * GIB // 2),
    ({"proc/self/cgroup": "0::/\n", "cgroup/memory.max": "max\n"}, None, None),  # no limit
    ({"proc/self/status": f"Name: python\nVmSize: {GIB // 1024} kB\n"}, 4 * GIB, 3 * GIB),
])
def test_the_memory_a_process_may_take_is_the_least_of_its_limits(tmp_path, monkeypatch, files,
                                                                   address_space, room):
    import os
    settings = _kernel(tmp_path, monkeypatch, files, address_space)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert settings.cpu_memory() == (total if room is None else room)


def test_a_batch_beyond_a_containers_limit_is_refused_with_its_number(tmp_path, monkeypatch):
    settings = _kernel(tmp_path, monkeypatch, {
        "proc/self/cgroup": "0::/\n", "cgroup/memory.max": str(3 * GIB),
        "cgroup/memory.current": "0"})
    with pytest.raises(UserError, match=r"training in batches of 60000 .* this process may take "
                                        r"3\.0 GiB on the cpu device"):
        settings.check_memory(get_preset("cpu").model, 60_000, "cpu", training=True)


def test_an_allocation_that_fails_inside_torch_is_one_line(capsys):
    """Under an address-space limit torch's allocator fails with a RuntimeError of its own."""
    import torch

    from diffusion101.cli import run_cli

    def allocate(argv):
        torch.empty(2 ** 50, dtype=torch.uint8)  # a PiB: no machine has it

    def other(argv):
        raise RuntimeError("some other failure")
    assert run_cli(allocate, []) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["error: out of memory: an allocation of 1,048,576.0 GiB failed (ask for "
                     "fewer or smaller images, or a smaller model); files already saved are intact"]
    with pytest.raises(RuntimeError, match="some other failure"):  # not ours to word
        run_cli(other, [])
