"""Evaluation protocols P1 (99 sampled negatives) and P3 (full ranking, training items masked).

A model is evaluated through a scorer: a callable mapping a batch of user ids [B] (int64
tensor) to scores over all items [B, I] (float tensor; logits or probabilities, only the
order matters). Each user's scores come from that user's own model.
A scorer may also score given items only: `scorer.score_candidates(users [B], items [B, C])`
-> [B, C] scores of those items (an item may repeat in a row: the user's candidate set is the
distinct items of its row). P1 then asks only for each user's target and negatives.
Users are processed in batches; everything inside a batch is one tensor operation.

Results are averages over users, as fractions in [0, 1]; tables print them in %.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Literal

import numpy as np
import torch

from pipeline.data.negatives import EvalNegatives
from pipeline.data.prepare import PreparedDataset
from pipeline.eval.metrics import DEFAULT_KS, hit_ndcg, rank_in_full_scores, rank_of_target

Scorer = Callable[[torch.Tensor], torch.Tensor]
Split = Literal["valid", "test"]


def _targets(data: PreparedDataset, split: Split) -> np.ndarray:
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    return data.valid_item if split == "valid" else data.test_item


_progress: Callable[[int], None] | None = None  # see reporting_progress


@contextmanager
def reporting_progress(callback: Callable[[int], None]):
    """While inside, every evaluation in this process calls callback(n) after each batch of n users
    it has ranked (a progress display counts users evaluated; the callback should be cheap)."""
    global _progress
    before, _progress = _progress, callback
    try:
        yield
    finally:
        _progress = before


def _user_batches(n_users: int, batch_users: int, users: np.ndarray | None):
    users = np.arange(n_users) if users is None else np.asarray(users)
    for start in range(0, len(users), batch_users):
        batch = users[start:start + batch_users]
        yield batch
        if _progress is not None:  # the batch has been ranked
            _progress(len(batch))


def _mean(per_user: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    return {name: float(torch.cat(parts).mean()) for name, parts in per_user.items()}


def new_covered(n_items: int, ks) -> dict[int, torch.Tensor]:
    """k -> [I] bool: the items that reached some user's top k (filled by the evaluators)."""
    return {k: torch.zeros(n_items, dtype=torch.bool) for k in ks}


def coverage(covered: dict[int, torch.Tensor]) -> dict[str, float]:
    """Catalogue coverage@k: the fraction of all items in at least one user's top k."""
    return {f"coverage@{k}": float(hit.to(torch.float64).mean()) for k, hit in covered.items()}


def _cover(covered: dict[int, torch.Tensor], scores: torch.Tensor, items: torch.Tensor | None = None) -> None:
    """Mark each row's top-k items by `scores` [B, C] (-inf: never recommended) in `covered`; the
    columns are `items` [B, C], else the item ids themselves (full ranking)."""
    top = scores.topk(min(max(covered), scores.shape[1]), dim=1)
    ranked = top.indices if items is None else items.gather(1, top.indices)
    for k, hit in covered.items():
        shown = top.values[:, :k] > -torch.inf
        hit[ranked[:, :k][shown]] = True


def evaluate_full(scorer: Scorer, data: PreparedDataset, split: Split = "test", *, ks=DEFAULT_KS,
                  batch_users: int = 1024, mask_heldout_other: bool = False,
                  users: np.ndarray | None = None, covered: dict[int, torch.Tensor] | None = None) -> dict[str, float]:
    """P3: rank the held-out item among all items, the user's training items scored -inf.

    mask_heldout_other also masks the user's other held-out item (GFMFR's `full`, not default).
    Catalogue coverage@k of these users' top-k lists is among the metrics; `covered` (new_covered)
    also receives the items themselves, for a union over several calls.
    """
    covered = new_covered(data.n_items, ks) if covered is None else covered
    targets = _targets(data, split)
    other = data.test_item if split == "valid" else data.valid_item
    per_user: dict[str, list[torch.Tensor]] = {}
    for batch in _user_batches(data.n_users, batch_users, users):
        scores = scorer(torch.as_tensor(batch)).to(torch.float64, copy=True)  # masked below: never the scorer's own
        rows, cols = _train_entries(data, batch)
        scores[rows, cols] = -torch.inf
        if mask_heldout_other:
            scores[torch.arange(len(batch)), torch.as_tensor(other[batch])] = -torch.inf
        rank = rank_in_full_scores(scores, torch.as_tensor(targets[batch]))
        for name, value in hit_ndcg(rank, ks).items():
            per_user.setdefault(name, []).append(value)
        _cover(covered, scores)
    return {**_mean(per_user), **coverage(covered)}


def _train_entries(data: PreparedDataset, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(row in batch, item) index pairs of the batch users' training items."""
    starts, stops = data.train_indptr[batch], data.train_indptr[batch + 1]
    counts = stops - starts
    rows = np.repeat(np.arange(len(batch)), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return torch.as_tensor(rows), torch.as_tensor(data.train_items[np.repeat(starts, counts) + offsets])


def evaluate_sampled(scorer: Scorer, data: PreparedDataset, negatives: EvalNegatives,
                     split: Split = "test", *, ks=DEFAULT_KS, batch_users: int = 1024,
                     users: np.ndarray | None = None, covered: dict[int, torch.Tensor] | None = None) -> dict[str, float]:
    """P1: rank the held-out item among its 99 persisted negatives (fewer where the user
    had fewer available; padding -1 is ignored). Coverage@k: of the items in the users' top k
    among their candidates (see evaluate_full)."""
    covered = new_covered(data.n_items, ks) if covered is None else covered
    if negatives.fingerprint != data.fingerprint():
        raise ValueError(f"P1 negatives belong to dataset {negatives.fingerprint}, "
                         f"not {data.fingerprint()}: re-prepare the dataset")
    targets = _targets(data, split)
    table = negatives.valid if split == "valid" else negatives.test
    per_user: dict[str, list[torch.Tensor]] = {}
    by_candidates = hasattr(scorer, "score_candidates")
    for batch in _user_batches(data.n_users, batch_users, users):
        neg = torch.as_tensor(table[batch].astype(np.int64))
        valid = neg >= 0
        target = torch.as_tensor(targets[batch]).to(torch.int64)
        if by_candidates:  # the target, then the negatives (a padding slot repeats the target)
            items = torch.cat([target[:, None], torch.where(valid, neg, target[:, None])], 1)
            scores = scorer.score_candidates(torch.as_tensor(batch), items).to(torch.float64)
            target_score, neg_scores = scores[:, 0], scores[:, 1:]
        else:
            scores = scorer(torch.as_tensor(batch)).to(torch.float64)
            neg_scores = scores.gather(1, neg.clamp(min=0))
            target_score = scores.gather(1, target[:, None]).squeeze(1)
        rank = rank_of_target(neg_scores, target_score, valid)
        for name, value in hit_ndcg(rank, ks).items():
            per_user.setdefault(name, []).append(value)
        candidates = torch.cat([target[:, None], neg.clamp(min=0)], 1)
        shown = torch.cat([target_score[:, None], neg_scores.masked_fill(~valid, -torch.inf)], 1)
        _cover(covered, shown, candidates)
    return {**_mean(per_user), **coverage(covered)}


def evaluate(scorer: Scorer, data: PreparedDataset, protocol: str, split: Split = "test",
             negatives: EvalNegatives | None = None, **kwargs) -> dict[str, float]:
    """Dispatch on protocol name: 'p1' or 'p3'."""
    if protocol == "p3":
        return evaluate_full(scorer, data, split, **kwargs)
    if protocol == "p1":
        if negatives is None:
            raise ValueError("protocol p1 needs the persisted evaluation negatives")
        return evaluate_sampled(scorer, data, negatives, split, **kwargs)
    raise ValueError(f"unknown protocol {protocol!r}: expected 'p1' or 'p3'")
