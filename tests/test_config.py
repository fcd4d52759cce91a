import pytest

from diffusion101.config import Config, UserError
from diffusion101.presets import get_preset

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
    from diffusion101.denoise import check_config
    for setting, words in (("sample.guidance=2", "needs a model trained with a null class"),
                           ("sample.guidance_rule=auto", "needs sample.guide"),
                           ("sample.sampler=euler", "use ddpm, ddim or dpm")):
        cfg = get_preset("tiny")
        apply_override(cfg, setting)
        with pytest.raises(UserError, match=words):
            check_config(cfg)
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
