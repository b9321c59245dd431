"""Ranks with pessimistic ties and HR / NDCG / MRR at K. Pure torch.

Shapes: B = users in a batch, C = candidates per user, I = items.
"""

from __future__ import annotations

import math

import torch

DEFAULT_KS = (10, 20, 50)


def check_finite_or_masked(scores: torch.Tensor) -> None:
    """Any NaN score is an error (a silent NaN would rank as 'never better')."""
    if torch.isnan(scores).any():
        raise ValueError("NaN in model scores: the evaluation refuses to rank them")


def rank_of_target(scores: torch.Tensor, target_score: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """1 + number of other candidates scoring >= the target (every tie counts against it).

    scores: [B, C] scores of the candidates OTHER than the target (masked entries = -inf,
    or excluded through `valid` [B, C] bool). target_score: [B]. Returns [B] int64.
    """
    check_finite_or_masked(scores)
    check_finite_or_masked(target_score)
    beats = scores >= target_score[:, None]
    if valid is not None:
        beats &= valid
    return 1 + beats.sum(dim=1)


def rank_in_full_scores(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pessimistic rank of `target` [B] among all columns of `scores` [B, I] (masked = -inf)."""
    target_score = scores.gather(1, target[:, None]).squeeze(1)
    if (target_score == -torch.inf).any():
        raise ValueError("a held-out target item is masked: it can never be ranked")
    # the target column is >= itself, so subtract it from the count
    return rank_of_target(scores, target_score) - 1


def hit_ndcg(rank: torch.Tensor, ks=DEFAULT_KS) -> dict[str, torch.Tensor]:
    """Per-user HR@K, NDCG@K and MRR@K of one held-out item (IDCG = 1; MRR@K = 1 / rank within
    the top K, else 0). With one held-out item per user Recall@K equals HR@K. rank: [B] ->
    {name: [B] float64}."""
    rank = rank.to(torch.float64)
    out = {}
    for k in ks:
        hit = rank <= k
        out[f"hr@{k}"] = hit.to(torch.float64)
        out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(rank + 1.0), torch.zeros_like(rank))
        out[f"mrr@{k}"] = torch.where(hit, 1.0 / rank, torch.zeros_like(rank))
    return out


def ndcg_of_rank(rank: int) -> float:
    """Scalar NDCG of one rank (for hand-computed test cases)."""
    return 1.0 / math.log2(rank + 1)
