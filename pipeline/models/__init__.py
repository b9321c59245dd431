"""Pure PyTorch backbones, one module each, and the FedMR fusion module; no Ray here."""

from importlib import import_module

BACKBONES = ("fedavg", "fcf", "fedncf", "pfedrec", "fedrap")


def backbone(name: str):
    """The module implementing backbone `name`."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}: expected one of {', '.join(BACKBONES)}")
    return import_module(f"pipeline.models.{name}")


def model_for(model_config):
    """The model of a ModelConfig: the backbone module (ID only), or the backbone composed with
    FedMR's fusion module when `fusion` is set (pipeline/models/fusion.py)."""
    module = backbone(model_config.backbone)
    if model_config.fusion is None:
        return module
    from pipeline.models.fusion import FedMR

    return FedMR(module, model_config)
