"""Negative sampling: P1 evaluation negatives (persisted) and training negatives.

Both are vectorised over users. Training negatives use a counter-based generator keyed by
(run_seed, round, epoch, user, draw index), so a client's negatives never depend on which
worker trains it or on the other clients in its batch.

Shapes: U = users, I = items, B = clients in a batch, P = positives of those clients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.data.prepare import PreparedDataset

P1_NEGATIVES = 99
_KEY_BUDGET = 1 << 24  # random keys per chunk of users (fixed: results depend on it)


@dataclass(frozen=True)
class EvalNegatives:
    """P1 negatives. valid, test: [U, 99] int32 item ids, -1 where a user has fewer than 99
    available items; n_valid, n_test: [U] counts actually drawn."""

    valid: np.ndarray
    test: np.ndarray
    n_valid: np.ndarray
    n_test: np.ndarray
    seed: int
    fingerprint: str

    @property
    def short_users(self) -> int:
        """Users evaluated over fewer than 99 negatives (logged per the protocol)."""
        return int((self.n_test < P1_NEGATIVES).sum())


def interacted_csr(data: PreparedDataset) -> tuple[np.ndarray, np.ndarray]:
    """Every item of every user in any split, as CSR (indptr [U+1], items [T + 2U])."""
    counts = data.train_counts + 2
    indptr = np.zeros(data.n_users + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    items = np.empty(indptr[-1], dtype=np.int64)
    train_pos = np.arange(len(data.train_items)) + 2 * data.train_users
    items[train_pos] = data.train_items
    items[indptr[1:] - 2] = data.valid_item
    items[indptr[1:] - 1] = data.test_item
    return indptr, items


def sample_eval_negatives(data: PreparedDataset, seed: int = 0) -> EvalNegatives:
    """P1 negatives: 198 items without replacement from those the user never interacted with;
    the first 99 for validation, the last 99 for test. With 99..197 available, the two sets
    are drawn independently; below 99, all available items are used."""
    n_items, m = data.n_items, P1_NEGATIVES
    indptr, items = interacted_csr(data)
    chunk = max(1, _KEY_BUDGET // n_items)
    valid = np.full((data.n_users, m), -1, dtype=np.int32)
    test = np.full((data.n_users, m), -1, dtype=np.int32)
    for index, start in enumerate(range(0, data.n_users, chunk)):
        stop = min(start + chunk, data.n_users)
        rng = np.random.default_rng([seed, index])
        excluded = _dense_mask(indptr[start:stop + 1] - indptr[start],
                               items[indptr[start]:indptr[stop]], n_items)
        available = n_items - excluded.sum(axis=1)
        first = _smallest_keys(rng.random(excluded.shape, dtype=np.float32), excluded, 2 * m)
        valid[start:stop] = first[:, :m]
        test[start:stop] = first[:, m:2 * m]
        redo = np.flatnonzero(available < 2 * m)  # not enough for disjoint sets
        if redo.size:
            second = _smallest_keys(rng.random((redo.size, n_items), dtype=np.float32),
                                    excluded[redo], m)
            test[start + redo] = second
    return EvalNegatives(valid=valid, test=test, n_valid=(valid >= 0).sum(1), n_test=(test >= 0).sum(1),
                         seed=seed, fingerprint=data.fingerprint())


def _dense_mask(indptr: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    """CSR rows -> [rows, I] bool mask."""
    mask = np.zeros((len(indptr) - 1, n_items), dtype=bool)
    mask[np.repeat(np.arange(len(indptr) - 1), np.diff(indptr)), items] = True
    return mask


def _smallest_keys(keys: np.ndarray, excluded: np.ndarray, k: int) -> np.ndarray:
    """Per row, the (up to) k non-excluded columns with the smallest random keys, in key order;
    -1 pads rows with fewer. A uniform sample without replacement, in random order."""
    keys[excluded] = np.inf
    k_eff = min(k, keys.shape[1])
    part = np.argpartition(keys, k_eff - 1, axis=1)[:, :k_eff]
    part_keys = np.take_along_axis(keys, part, axis=1)
    order = np.argsort(part_keys, axis=1, kind="stable")
    picked = np.take_along_axis(part, order, axis=1).astype(np.int32)
    picked[np.isinf(np.take_along_axis(part_keys, order, axis=1))] = -1
    if k_eff < k:
        picked = np.pad(picked, ((0, 0), (0, k - k_eff)), constant_values=-1)
    return picked


# ---------------------------------------------------------------------------------------------
# training negatives

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic is intended)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def stream_uniform(seed: int, round_: int, epoch: int, users: np.ndarray, draw: np.ndarray) -> np.ndarray:
    """Counter-based uniforms in [0, 1): one per (user, draw) pair, a pure function of
    (seed, round, epoch, user, draw). users, draw: [P] ints -> [P] float64."""
    with np.errstate(over="ignore"):
        head = np.array([seed, round_, epoch], dtype=np.uint64)
        state = _mix(np.array([0x5EED], dtype=np.uint64) ^ head[:1])
        for part in head[1:]:
            state = _mix((state + _GOLDEN) ^ part)
        key = _mix((state + np.asarray(users, dtype=np.uint64) * _GOLDEN) ^ np.uint64(0xC1))
        bits = _mix(key + np.asarray(draw, dtype=np.uint64) * _GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def sample_training_negatives(
    users: np.ndarray,
    excluded_indptr: np.ndarray,
    excluded_items: np.ndarray,
    n_draws: np.ndarray,
    n_items: int,
    *,
    seed: int,
    round_: int,
    epoch: int,
    universe: np.ndarray | None = None,
) -> np.ndarray:
    """Uniform negatives from (universe or all items) minus each user's excluded items.

    users: [B] user ids (they key the random stream).
    excluded_indptr, excluded_items: CSR [B+1], sorted unique items per row (the user's
        training positives, plus held-out items under `neg_exclude_heldout`).
    n_draws: [B] negatives to draw for each user (positives x neg_ratio).
    universe: sorted candidate items (`neg_pool = train_items`), or None for all items.
    Returns [sum(n_draws)] int64, the negatives of user 0 first, then user 1, ...
    """
    users = np.asarray(users, dtype=np.int64)
    n_draws = np.asarray(n_draws, dtype=np.int64)
    row_of_draw = np.repeat(np.arange(len(users)), n_draws)
    draw_index = np.arange(row_of_draw.size) - np.repeat(np.cumsum(n_draws) - n_draws, n_draws)

    excluded_rows = np.repeat(np.arange(len(users)), np.diff(excluded_indptr))
    excluded = np.asarray(excluded_items, dtype=np.int64)
    size = n_items
    if universe is not None:  # work in universe positions; excluded items outside it don't matter
        pos = np.searchsorted(universe, excluded)
        inside = (pos < len(universe)) & (universe[np.minimum(pos, len(universe) - 1)] == excluded)
        excluded, excluded_rows, size = pos[inside], excluded_rows[inside], len(universe)
    n_excluded = np.bincount(excluded_rows, minlength=len(users))
    available = size - n_excluded
    if (available[n_draws > 0] <= 0).any():
        bad = int(users[(available <= 0) & (n_draws > 0)][0])
        raise ValueError(f"user {bad} has no item left to draw a negative from")

    u = stream_uniform(seed, round_, epoch, users[row_of_draw], draw_index)
    j = np.minimum((u * available[row_of_draw]).astype(np.int64), available[row_of_draw] - 1)
    # the j-th non-excluded position is j + #{k : excluded_k - k <= j} (segmented search)
    rank_in_row = np.arange(len(excluded)) - np.repeat(np.cumsum(n_excluded) - n_excluded, n_excluded)
    stride = size + 1
    keys = excluded_rows * stride + (excluded - rank_in_row)
    starts = np.cumsum(n_excluded) - n_excluded
    shift = np.searchsorted(keys, row_of_draw * stride + j, side="right") - starts[row_of_draw]
    picked = j + shift
    return picked if universe is None else universe[picked]
