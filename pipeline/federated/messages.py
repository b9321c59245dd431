"""The messages of a round: what the server sends the pools and what a pool sends back.

Both sides import them from here (the engine never imports server code): an Upload is a
shard's reduced result of local training, a TeacherDownload GFMFR's teacher scores for the
next round, and flatten_vectors packs a client's grouping vector as it travels in an Upload.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Upload:
    """What a shard sends after a round (reduced over its clients).

    table_items: name -> [K] items touched.  table_sums: name -> [K, d] sum_c w_c * delta_c.
    dense_sums: name -> sum_c w_c * delta_c of each global dense weight.
    grad_sums: name -> sum_c w_c * g_c, last-batch gradients (FedMR fusion_agg=grad_adam).
    weight: sum_c w_c (w_c = 1 for a uniform mean, rows processed for the weighted mean).
    """

    table_items: dict[str, torch.Tensor] = field(default_factory=dict)
    table_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    dense_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    grad_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    weight: float = 0.0
    # weight decay: name -> sum_c w_c (f_c - 1), f_c the factor by which client c's decay scaled the
    # rows it never touched; the server scales the whole table by 1 + this / weight (aggregate.py)
    table_scale_sums: dict[str, float] = field(default_factory=dict)
    clients: int = 0
    rows: int = 0
    loss_sum: float = 0.0
    seconds: float = 0.0
    # GFMFR: the clients in upload order, their grouping vectors [B, F], their
    # FedMR mixing weights [B, 3] (moe), and the (sum, count) of their final rho (shared_round)
    group_users: np.ndarray | None = None
    group_vectors: torch.Tensor | None = None
    group_alpha: torch.Tensor | None = None
    rho: tuple[float, int] = (0.0, 0)
    distilled: int = 0  # clients that trained with a teacher
    clipped: int = 0  # privacy: clients whose update was scaled down to the clip norm

    def nbytes(self) -> int:
        tensors = [*self.table_items.values(), *self.table_sums.values(), *self.dense_sums.values(),
                   *self.grad_sums.values(), *(t for t in (self.group_vectors, self.group_alpha) if t is not None)]
        return int(sum(t.numel() * t.element_size() for t in tensors))


@dataclass
class TeacherDownload:
    """What a round's pools receive for distillation.

    scores: [G, N] s_g of every group (NaN rows: empty groups).  group_of: [U] the group each
    user distils in this round (UNGROUPED: none, it trains on its own loss).  weight: a(t).
    shared_rho: ema_scope=shared_round, the rho every client starts from (NaN: unset).
    A client reads only s_{g(u)} at its own rows' items (Shard.teacher_rows).
    """

    scores: torch.Tensor
    group_of: np.ndarray
    weight: float
    shared_rho: float = math.nan


def flatten_vectors(model, vectors: dict[str, torch.Tensor], n_clients: int) -> torch.Tensor:
    """[B, F]: the clients' grouping vectors from their trained parameters (name -> [B, ...])."""
    return torch.cat([vectors[name].reshape(n_clients, -1) for name in model.GROUP_VECTOR], 1)


def declared_upload(model, initial, config) -> dict:
    """What one client's Upload holds, read from the method's declaration alone
    (pipeline.models.base.Method): field -> parameter name -> shape, with K the items the client
    touched and d the model's dim (the format tests/equivalence/upload_schema.json pins from real uploads).

      table_items, table_sums   every GLOBAL_TABLE: the touched rows' ids [K] and summed changes [K, d]
      dense_sums                every other global weight not uploaded as a gradient
      grad_sums                 UPLOAD_GRADS (FedMR's fusion_agg=grad_adam)
      table_scale_sums          every global table under weight decay (train.weight_decay)
      group_users, group_vectors, group_alpha
                                GFMFR: the client, its grouping vector (the GROUP_VECTOR parameters
                                flattened) and, with FedMR's mixture of experts, its mixing weights
    Personal parameters never appear."""
    dim = config.model.dim

    def shape(dims) -> str:
        return "[" + ", ".join("d" if n == dim else str(n) for n in dims) + "]"

    params = initial.global_params
    grads = set(model.UPLOAD_GRADS)
    gfmfr, fusion = config.model.gfmfr is not None, model.FUSION
    width = sum(int(np.prod(initial.personal_shared[n].shape if n in initial.personal_shared else params[n].shape))
                for n in model.GROUP_VECTOR)
    moe = fusion is not None and fusion.fusion == "moe"
    return {
        "clients": "int", "clipped": "int", "distilled": "int", "loss_sum": "float", "rho": "tuple", "rows": "int",
        "seconds": "float", "weight": "float",
        "table_items": {name: "[K]" for name in sorted(model.GLOBAL_TABLES)},
        "table_sums": {name: "[K, d]" for name in sorted(model.GLOBAL_TABLES)},
        "dense_sums": {name: shape(params[name].shape) for name in sorted(model.GLOBAL_DENSE) if name not in grads},
        "grad_sums": {name: shape(params[name].shape) for name in sorted(grads)},
        "table_scale_sums": {name: "float" for name in sorted(model.GLOBAL_TABLES)} if config.train.weight_decay else {},
        "group_users": "ids [1]" if gfmfr else None,
        "group_vectors": shape((1, width)) if gfmfr else None,
        "group_alpha": shape((1, len(fusion.modalities))) if gfmfr and moe else None,
    }
