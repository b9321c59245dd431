"""Trivial rankings (no learning): the floor every learned model is read against.

Each is a scorer for pipeline.eval.protocols: users [B] -> scores [B, I]; the same scores for
every user. Ties are ranked pessimistically by the evaluator, so a tie never helps.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.data.prepare import PreparedDataset


def _broadcast(item_scores: np.ndarray):
    scores = torch.as_tensor(item_scores, dtype=torch.float64)

    def scorer(users: torch.Tensor) -> torch.Tensor:
        return scores.expand(len(users), -1)

    return scorer


def popularity(data: PreparedDataset):
    """Score = number of training interactions of the item."""
    return _broadcast(data.item_popularity().astype(np.float64))


def cold_first_then_popularity(data: PreparedDataset):
    """Items never seen in training first (tied among themselves), then by popularity."""
    pop = data.item_popularity().astype(np.float64)
    return _broadcast(np.where(pop == 0, pop.max() + 1.0, pop))


def ascending_item_id(data: PreparedDataset):
    """Lower item id first (no ties): what an all-tied model looks like under lowest-index
    tie-breaking."""
    return _broadcast(-np.arange(data.n_items, dtype=np.float64))


BASELINES = {
    "popularity": popularity,
    "cold-first-then-popularity": cold_first_then_popularity,
    "ascending-item-id": ascending_item_id,
}


def evaluate_baselines(data: PreparedDataset, negatives, names=("popularity",), protocols=("p3", "p1"),
                       ks=(10, 20, 50)) -> list[dict]:
    """One row per (baseline, protocol, split): label keys plus metric fractions."""
    from pipeline.eval.protocols import evaluate

    rows = []
    for name in names:
        scorer = BASELINES[name](data)
        for protocol in protocols:
            for split in ("valid", "test"):
                metrics = evaluate(scorer, data, protocol, split, negatives=negatives, ks=ks)
                rows.append({"dataset": data.name, "method": name, "protocol": protocol.upper(),
                             "split": split, **metrics})
    return rows
