"""Pure PyTorch backbones, one module each; no Ray here."""

from importlib import import_module

BACKBONES = ("fedavg", "fcf", "fedncf", "pfedrec", "fedrap")


def backbone(name: str):
    """The module implementing backbone `name`."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}: expected one of {', '.join(BACKBONES)}")
    return import_module(f"pipeline.models.{name}")
