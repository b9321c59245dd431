"""GFMFR's group fusion model trained as autograd and torch.optim.SGD train it, one batch at a
time: the implementation before pipeline.models.group_fusion.train_group_fusion wrote the same
steps out by hand. tests/unit/test_group_fusion.py pins the two together and bench.gfmfr_server
times both."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.models.group_fusion import GroupFusion, _converged, _fusion_pairs


def train_group_fusion_reference(model: GroupFusion, targets: torch.Tensor, members: torch.Tensor,
                                 features: dict[str, torch.Tensor], *, epochs: int = 50, lr: float = 0.01,
                                 weight_decay: float = 1e-4, batch: int = 256, seed: int = 0,
                                 tol: float | None = None) -> list[float]:
    """train_group_fusion's steps as autograd and torch.optim.SGD run them, one batch at a time."""
    n_items = targets.shape[1]
    pair_group, pair_item = _fusion_pairs(members, n_items)
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
        if _converged(losses, tol):
            break
    model.eval()
    return losses
