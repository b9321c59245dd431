"""Server-side math of a round: initial model, participants, learning rates, aggregation.

Pure functions (no Ray). Aggregation: theta <- theta + sum_c w_c delta_c / sum_c w_c, the
normalised weighted (or uniform) mean of the participants' trained parameters.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.config import ExperimentConfig
from pipeline.models import backbone
from pipeline.models.base import InitialState

_SAMPLING_TAG = 0x5A3D


def initial_state(config: ExperimentConfig, n_users: int, n_items: int) -> InitialState:
    """The seeded initial model (model_seed), identical wherever it is built."""
    generator = torch.Generator().manual_seed(config.train.model_seed)
    return backbone(config.model.backbone).init(n_users, n_items, config.model.dim, generator)


def round_lrs(config: ExperimentConfig, n_items: int, round_: int) -> dict[str, float]:
    """lr of every parameter in round t: lr * decay^t * the backbone's multiplier."""
    lr = config.lr() * config.lr_decay() ** round_
    scale = backbone(config.model.backbone).lr_scale(n_items, config.model)
    return {name: lr * factor for name, factor in scale.items()}


def participants(n_users: int, participation: float, seed: int, round_: int) -> np.ndarray:
    """Sorted users of round t: uniform without replacement, a pure function of (seed, t)."""
    if participation >= 1.0:
        return np.arange(n_users, dtype=np.int64)
    count = max(1, int(round(participation * n_users)))
    rng = np.random.default_rng([seed, round_, _SAMPLING_TAG])
    return np.sort(rng.choice(n_users, size=count, replace=False)).astype(np.int64)


def shard_users(train_counts: np.ndarray, n_shards: int) -> list[np.ndarray]:
    """Contiguous user ranges with about equal training rows each (results do not depend on it)."""
    n_shards = max(1, min(n_shards, len(train_counts)))
    cumulative = np.cumsum(train_counts)
    bounds = np.searchsorted(cumulative, cumulative[-1] * np.arange(1, n_shards) / n_shards)
    bounds = np.unique(np.clip(bounds, 1, len(train_counts) - 1))
    return [part for part in np.split(np.arange(len(train_counts), dtype=np.int64), bounds) if len(part)]


def apply_uploads(global_params: dict[str, torch.Tensor], uploads) -> dict[str, torch.Tensor]:
    """New global parameters from the shards' reduced uploads (nothing changes without any)."""
    total = sum(upload.weight for upload in uploads)
    if total <= 0:
        return global_params
    new = {name: value.clone() for name, value in global_params.items()}
    for upload in uploads:
        for name, items in upload.table_items.items():
            new[name].index_add_(0, items, (upload.table_sums[name] / total).to(new[name].dtype))
        for name, summed in upload.dense_sums.items():
            new[name] += (summed / total).to(new[name].dtype)
    return new
