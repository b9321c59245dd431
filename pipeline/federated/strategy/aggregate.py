"""Server-side math of a round: initial model, participants, learning rates, aggregation.

Pure functions (no Ray). Aggregation: theta <- theta + sum_c w_c delta_c / sum_c w_c, the
normalised weighted (or uniform) mean of the participants' trained parameters.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.config import ExperimentConfig, lr_value
from pipeline.models import model_for
from pipeline.models.base import InitialState

_SAMPLING_TAG = 0x5A3D


def feature_dims(data) -> dict[str, int]:
    """modality -> width of a PreparedDataset's frozen item features."""
    return {name: int(matrix.shape[1]) for name, matrix in data.features.items()}


def initial_state(config: ExperimentConfig, n_users: int, n_items: int,
                  feature_dims: dict[str, int] | None = None) -> InitialState:
    """The seeded initial model (model_seed), identical wherever it is built.
    feature_dims (modality -> d_m) sizes the fusion module's projections (FedMR only)."""
    generator = torch.Generator().manual_seed(config.train.model_seed)
    model = model_for(config.model)
    scheme = config.model.init
    if config.model.fusion is None:
        return model.init(n_users, n_items, config.model.dim, generator, scheme)
    return model.init(n_users, n_items, config.model.dim, generator, feature_dims or {}, scheme)


def round_lrs(config: ExperimentConfig, n_items: int, round_: int) -> dict[str, float]:
    """lr of every parameter in round t: (lr * the backbone's multiplier, or the parameter's
    group lr from train.lr_groups) * decay^t."""
    model = model_for(config.model)
    scale = model.lr_scale(n_items, config.model)
    groups = config.train.lr_groups
    decay = config.lr_decay() ** round_
    out = {}
    for name, factor in scale.items():
        group = model.LR_GROUPS[name]
        base = lr_value(groups[group], n_items, f"train.lr_groups.{group}") if group in groups else config.lr() * factor
        out[name] = base * decay
    return out


def participants(n_users: int, participation: float, seed: int, round_: int) -> np.ndarray:
    """Sorted users of round t: uniform without replacement, a pure function of (seed, t)."""
    if participation >= 1.0:
        return np.arange(n_users, dtype=np.int64)
    count = max(1, int(round(participation * n_users)))
    rng = np.random.default_rng([seed, round_, _SAMPLING_TAG])
    return np.sort(rng.choice(n_users, size=count, replace=False)).astype(np.int64)


def round_users(config: ExperimentConfig, train_counts: np.ndarray, round_: int):
    """The round's sampled users split into arrived, dropped and late (arrivals.Arrivals)."""
    from pipeline.federated.strategy.arrivals import arrivals

    train = config.train
    return arrivals(participants(len(train_counts), train.participation, train.seed, round_), train_counts, train,
                    round_)


def aggregate(config: ExperimentConfig, global_params: dict[str, torch.Tensor], uploads: list, adam_state: dict | None,
              round_: int) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The server's update from the pools' uploads: the mean of the arrived clients' updates
    (with privacy: clipped sums plus noise, privacy.privatize), then FedMR grad_adam's Adam step.
    Returns (new globals, new Adam state)."""
    from pipeline.federated.privacy import privatize

    if config.privacy is not None:
        uploads = [privatize(uploads, global_params, model_for(config.model), config.privacy, config.train.seed,
                             round_)]
    new = apply_uploads(global_params, uploads)
    fusion = config.model.fusion
    if fusion is not None and fusion.fusion_agg == "grad_adam":
        new, adam_state = apply_fusion_grads(new, uploads, adam_state, lr=server_lr(config), clip=fusion.server_clip)
    return new, adam_state


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
    for name in {name for upload in uploads for name in getattr(upload, "table_scale_sums", {})}:
        # weight decay: the mean client scaled every row it never touched by its own factor
        new[name] *= 1.0 + sum(upload.table_scale_sums.get(name, 0.0) for upload in uploads) / total
    for upload in uploads:
        for name, items in upload.table_items.items():
            new[name].index_add_(0, items, (upload.table_sums[name] / total).to(new[name].dtype))
        for name, summed in upload.dense_sums.items():
            new[name] += (summed / total).to(new[name].dtype)
    return new


def server_lr(config: ExperimentConfig) -> float:
    """grad_adam's server Adam lr: fusion.server_lr, else the base client lr (never decayed)."""
    fusion = config.model.fusion
    return fusion.server_lr if fusion is not None and fusion.server_lr is not None else config.lr()


def apply_fusion_grads(global_params: dict[str, torch.Tensor], uploads, state: dict | None, *, lr: float,
                       clip: float | None = None, betas: tuple[float, float] = (0.9, 0.999),
                       eps: float = 1e-8) -> tuple[dict[str, torch.Tensor], dict | None]:
    """fusion_agg=grad_adam: g = sum_c w_c g_c / sum_c w_c over the uploaded
    last-batch gradients, optionally clipped to global norm `clip` (as clip_grad_norm_), then
    exactly one Adam step on the server's copy. `state` (step, exp_avg, exp_avg_sq) persists
    across rounds and belongs in the server's checkpoint. Returns (new params, new state);
    nothing changes without uploads."""
    total = sum(upload.weight for upload in uploads)
    names = sorted({name for upload in uploads for name in upload.grad_sums})
    if total <= 0 or not names:
        return global_params, state
    grads = {name: sum(upload.grad_sums[name] for upload in uploads if name in upload.grad_sums) / total
             for name in names}
    if clip is not None:
        norm = torch.sqrt(sum(g.double().square().sum() for g in grads.values()))
        factor = min(1.0, float(clip / (norm + 1e-6)))
        grads = {name: g * factor for name, g in grads.items()}
    state = state or {"step": 0, "exp_avg": {}, "exp_avg_sq": {}}
    step = state["step"] + 1
    beta1, beta2 = betas
    new = dict(global_params)
    exp_avg, exp_avg_sq = dict(state["exp_avg"]), dict(state["exp_avg_sq"])
    for name in names:
        param, grad = global_params[name], grads[name].to(global_params[name].dtype)
        m = exp_avg.get(name, torch.zeros_like(param)) * beta1 + grad * (1 - beta1)
        v = exp_avg_sq.get(name, torch.zeros_like(param)) * beta2 + grad * grad * (1 - beta2)
        denom = v.sqrt() / math.sqrt(1 - beta2 ** step) + eps
        new[name] = param - (lr / (1 - beta1 ** step)) * m / denom
        exp_avg[name], exp_avg_sq[name] = m, v
    return new, {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
