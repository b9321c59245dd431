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
