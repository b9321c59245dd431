"""GFMFR's math, pure torch: group targets (the pools' per-group sums, the
server's means), the group fusion model f_phi trained to regress them, and the clients'
distillation term with its adaptive weight (teacher heads: each backbone's teacher_logits).

Shapes: G = groups, N = items, d_c = target width, P = participants, W = uploaded table rows.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.models.base import xavier

PROB_CLAMP = 1e-7
KD_SCHEDULES = ("cosine", "linear_increase", "exponential_increase", "constant")
EMA_DECAY = 0.9


# --- group targets ---------------------------------------------------------------------------------


def group_delta_sums(delta: torch.Tensor, row_client: torch.Tensor, row_item: torch.Tensor,
                     client_group: torch.Tensor, n_groups: int, n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums [G, N, d], members [G]): each group's sum of its members' changes to a table
    (delta [W, d] at (row_client [W], row_item [W]); client_group [P] group id of each client,
    -1: none, ignored). What a pool reduces its clients' uploads to; sums over pools add up."""
    grouped = client_group >= 0
    members = torch.bincount(client_group[grouped], minlength=n_groups)
    rows = grouped[row_client]
    keys = client_group[row_client[rows]] * n_items + row_item[rows]
    sums = delta.new_zeros(n_groups * n_items, delta.shape[1]).index_add_(0, keys, delta[rows])
    return sums.view(n_groups, n_items, -1), members


def targets_from_sums(global_table: torch.Tensor, sums: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """C̄ [G, N, d] = global_table + sums / members (empty groups: the global table)."""
    return global_table[None] + sums / members.clamp(min=1).to(sums.dtype)[:, None, None]


# --- group fusion model ---------------------------------------------------------------------------


class GroupFusion(torch.nn.Module):
    """z_{g,i} = Fuse(A_id e_g + a_id, A_t t_i + a_t, A_v v_i + a_v) in R^{d_c}.

    fusion: mlp (Linear(3 d_c -> 2 d_c), ReLU, Linear(2 d_c -> d_c); the default) or sum.
    feature_dims: modality -> width of the frozen item features (absent modalities dropped).
    """

    def __init__(self, n_groups: int, d_c: int, feature_dims: dict[str, int], group_dim: int = 512,
                 fusion: str = "mlp", generator: torch.Generator | None = None):
        super().__init__()
        if fusion not in ("mlp", "sum"):
            raise ValueError(f"group_fusion {fusion!r}: this version has 'mlp' and 'sum'")
        generator = generator or torch.Generator().manual_seed(0)
        self.fusion, self.modalities = fusion, tuple(m for m in ("text", "image") if m in feature_dims)
        self.group = torch.nn.Parameter(xavier((n_groups, group_dim), generator))
        self.proj = torch.nn.ModuleDict({"id": self._linear(group_dim, d_c, generator)})
        for m in self.modalities:
            self.proj[m] = self._linear(feature_dims[m], d_c, generator)
        if fusion == "mlp":
            width = (1 + len(self.modalities)) * d_c
            self.fc1 = self._linear(width, 2 * d_c, generator)
            self.fc2 = self._linear(2 * d_c, d_c, generator)

    @staticmethod
    def _linear(fan_in: int, fan_out: int, generator: torch.Generator) -> torch.nn.Linear:
        layer = torch.nn.Linear(fan_in, fan_out)
        with torch.no_grad():
            layer.weight.copy_(xavier((fan_out, fan_in), generator))
            layer.bias.zero_()
        return layer

    def forward(self, groups: torch.Tensor, items: torch.Tensor, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """groups, items [B] -> z [B, d_c]."""
        parts = [self.proj["id"](self.group[groups])]
        parts += [self.proj[m](features[m][items]) for m in self.modalities]
        if self.fusion == "sum":
            return torch.stack(parts).sum(0)
        return self.fc2(torch.relu(self.fc1(torch.cat(parts, -1))))

    def table(self, group: int, features: dict[str, torch.Tensor], n_items: int) -> torch.Tensor:
        """Z_g [N, d_c] of one group, in eval mode."""
        with torch.no_grad():
            items = torch.arange(n_items)
            return self(torch.full((n_items,), group, dtype=torch.int64), items, features)


def train_group_fusion(model: GroupFusion, targets: torch.Tensor, members: torch.Tensor,
                       features: dict[str, torch.Tensor], *, epochs: int = 50, lr: float = 0.01,
                       weight_decay: float = 1e-4, batch: int = 256, seed: int = 0) -> list[float]:
    """Regress C̄_g[i] (targets [G, N, d_c]) on all (g, i) pairs of the non-empty groups with
    MSE (mean reduction), a fresh SGD each call (warm start of the model), shuffled batches
    seeded by `seed`. Returns the mean training loss of every epoch."""
    n_items = targets.shape[1]
    groups = torch.nonzero(members > 0).squeeze(1)
    pair_group = groups.repeat_interleave(n_items)
    pair_item = torch.arange(n_items).repeat(len(groups))
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(pair_group), generator=generator)
        total = 0.0
        for start in range(0, len(order), batch):
            chosen = order[start:start + batch]
            g, i = pair_group[chosen], pair_item[chosen]
            loss = F.mse_loss(model(g, i, features), targets[g, i])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(chosen)
        losses.append(total / max(len(order), 1))
    model.eval()
    return losses


# --- client distillation --------------------------------------------------------------------------


def kd_per_row(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """[R] KL(q || p̂) of the two-class distributions q = [s, 1-s] (teacher) and p̂ = [ŷ, 1-ŷ]
    (student probabilities), both clamped to [1e-7, 1]; a client's L_KD is its rows' mean."""
    q = torch.stack([teacher, 1 - teacher], -1).clamp(PROB_CLAMP, 1.0)
    p = torch.stack([student, 1 - student], -1).clamp(PROB_CLAMP, 1.0)
    return (q * (q.log() - p.log())).sum(-1)


def kd_schedule(kind: str, round_: int, rounds: int) -> float:
    """a(t): cosine cos(pi t / 2T) (default), linear_increase t/T, exponential_increase
    1 - exp(-t/10), constant 1; T = the configured rounds, t the 0-based round."""
    if kind == "cosine":
        return math.cos(math.pi * round_ / (2 * rounds))
    if kind == "linear_increase":
        return round_ / rounds
    if kind == "exponential_increase":
        return 1 - math.exp(-round_ / 10)
    if kind == "constant":
        return 1.0
    raise ValueError(f"kd_schedule {kind!r}: expected one of {KD_SCHEDULES}")


def update_ratio_ema(rho: np.ndarray, bce: np.ndarray, kd: np.ndarray, rho_max: float | None = None) -> np.ndarray:
    """Per-client EMA of r = L_BCE / (L_KD + 1e-8) (detached scalars of one mini-batch; arrays [B]):
    rho unset (NaN) takes r, else 0.9 rho + 0.1 r; no update where L_KD <= 1e-8; rho >= 0 (and
    <= rho_max, a project option)."""
    ratio = bce / (kd + 1e-8)
    updated = np.where(np.isnan(rho), ratio, EMA_DECAY * rho + (1 - EMA_DECAY) * ratio)
    updated = np.maximum(updated, 0.0) if rho_max is None else np.clip(updated, 0.0, rho_max)
    return np.where(kd > 1e-8, updated, rho)
