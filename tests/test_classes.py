"""classes.py: the names of a model's classes, the rules they keep, and the labels a user names."""
import pytest

from diffusion101.config import UserError
from diffusion101.presets import get_preset
from diffusion101.settings import apply_override, validate


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
    from diffusion101.classes import class_names, is_mnist_model
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
