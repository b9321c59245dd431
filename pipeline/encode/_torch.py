"""Small PyTorch helpers shared by the encoders (device, precision, pooling, normalisation)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# CLIP's pixel statistics (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def place(module: torch.nn.Module, device: str, half: bool) -> torch.nn.Module:
    """Eval mode on `device`; float16 weights only when asked and on a GPU."""
    module = module.eval().to(device)
    return module.half() if half and device != "cpu" else module


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def unit_rows(features: torch.Tensor) -> np.ndarray:
    """[B, d] any dtype/device -> float32 numpy [B, d] with unit L2 rows (computed in float32)."""
    return F.normalize(features.float(), dim=1).cpu().numpy().astype(np.float32, copy=False)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens: hidden [B, T, d], mask [B, T] (1 = token) -> [B, d]."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def pixels_to_tensor(pixels: np.ndarray, device: str, dtype: torch.dtype, *, scale: float,
                     mean, std) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> normalised [B, 3, S, S] on `device`: (x * scale - mean) / std.

    The uint8 array crosses to the device before the float conversion (4x less to copy).
    """
    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device)
    x = x.permute(0, 3, 1, 2).float() * scale
    mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return ((x - mean) / std).to(dtype).contiguous(memory_format=torch.channels_last)

