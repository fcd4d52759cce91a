"""Classes: the name of every label, the labels a user names (by number or by name), and the
rules a model's class names keep (the data decides them: MNIST's ten digits, or a folder's
sub-folders)."""
from __future__ import annotations

import operator

from .config import ModelConfig, UserError


# The most classes a folder may hold: more is a mistake (a folder of files, not of classes)
# sooner than a dataset this package is made for.
MAX_CLASSES = 1000
MAX_NAME_LENGTH = 40  # a class name is a caption under a 28-pixel column


def class_names(m: ModelConfig) -> tuple:
    """The name of every label: model.class_names, or the digits '0', '1', ... when empty."""
    return m.class_names or tuple(str(i) for i in range(m.num_classes))


def is_mnist_model(m: ModelConfig) -> bool:
    """Whether the labels are MNIST's ten digits in grey, which the evaluation classifier reads."""
    return m.in_channels == 1 and class_names(m)[:10] == tuple(str(i) for i in range(10))


def check_class_name(name: str, where: str) -> None:
    """A class name must caption a PNG and be named on a command line: printable text (no
    control characters, no line breaks, no undecodable bytes from a file name) of at most
    MAX_NAME_LENGTH characters, without a comma (--digits separates names by commas)."""
    if not (name and name.isprintable() and len(name) <= MAX_NAME_LENGTH
            and name == name.strip() and "," not in name):
        raise UserError(f"{where}: class name {name!r} cannot be a caption; use printable text "
                        f"of 1-{MAX_NAME_LENGTH} characters, no comma, no leading or trailing "
                        f"space")


def _as_label(c) -> int:
    """An integer of any kind as an int; -1 for anything else (True is no label, nor is a
    one-element array, which operator.index would take)."""
    if isinstance(c, (str, bool)) or getattr(c, "ndim", 0) != 0:
        return -1
    try:
        return operator.index(c)
    except TypeError:
        return -1


def class_labels(classes, names: tuple, where: str = "digits") -> list:
    """The labels of `classes`, each a label (an int) or a class name; a name wins over a
    number, so a folder whose classes are '1', '2', '3' is sampled by those names. At most
    MAX_CLASSES of them: each is a column of the grid and of its progression figure."""
    classes = list(classes)
    if len(classes) > MAX_CLASSES:
        raise UserError(f"{where}: {len(classes):,} classes asked for; at most {MAX_CLASSES} "
                        f"(repeat them with --n-per-class, or n in the API)")
    labels = []
    for c in classes:
        if isinstance(c, str) and c in names:
            labels.append(names.index(c))
        elif isinstance(c, str) and c.isascii() and c.isdecimal() and int(c) < len(names):
            labels.append(int(c))
        elif 0 <= _as_label(c) < len(names):  # an int, a numpy or torch integer
            labels.append(_as_label(c))
        else:
            shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
            raise UserError(f"{where}: {c!r} is no class of this model (labels 0-"
                            f"{len(names) - 1}, or the names {shown})")
    if not labels:
        raise UserError(f"{where}: name at least one class")
    return labels


def validate_classes(m: ModelConfig, data: str) -> None:
    """MNIST is ten grey digits; a folder's model names each of its classes once."""
    if data == "mnist":
        if m.class_names or m.num_classes < 10 or m.in_channels != 1:
            raise UserError("train.data=mnist holds the ten grey digits: model.num_classes >= 10, "
                            "model.in_channels=1 and no model.class_names")
        return
    if m.class_names and len(m.class_names) != m.num_classes:
        raise UserError(f"model.class_names names {len(m.class_names)} classes, "
                        f"model.num_classes is {m.num_classes}")
    if len(set(m.class_names)) != len(m.class_names):
        raise UserError("model.class_names must name each class once")
    if m.num_classes > MAX_CLASSES:
        raise UserError(f"model.num_classes={m.num_classes}: at most {MAX_CLASSES} classes")
    for name in m.class_names:
        check_class_name(name, "model.class_names")
