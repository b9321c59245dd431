"""GFMFR grouping (pipeline/federated/strategy/grouping.py)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from pipeline.federated.strategy.grouping import (UNGROUPED, assign_ids, group_users, keep_groups, rbf_gamma, reduce,
                                                  standardise)


def planted(n_per_group=30, n_groups=4, dim=16, spread=0.3, seed=0):
    """Grouping vectors of n_groups planted taste groups: centres far apart, small noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_groups, dim)) * 3.0
    truth = np.repeat(np.arange(n_groups), n_per_group)
    return centres[truth] + spread * rng.normal(size=(len(truth), dim)), truth


@pytest.mark.parametrize("method", ["spectral", "kmeans"])
@pytest.mark.parametrize("use_pca", [False, True])
def test_recovers_planted_groups(method, use_pca):
    x, truth = planted()
    users = np.arange(len(truth)) * 3 + 7
    ids = group_users(x, users, 4, method=method, use_pca=use_pca, seed=1, round_=0)
    assert adjusted_rand_score(truth, ids) >= 0.8
    assert set(ids.tolist()) <= set(range(4))


def test_first_ids_follow_the_smallest_member():
    ids = assign_ids(np.array([2, 2, 0, 1, 0]), np.array([9, 4, 6, 1, 8]), None, 3)
    # clusters: raw 2 = {9, 4} (min 4), raw 0 = {6, 8} (min 6), raw 1 = {1} (min 1)
    assert ids.tolist() == [1, 1, 2, 0, 2]


def test_ids_stay_stable_across_rounds_and_permutations():
    x, truth = planted(seed=2)
    users = np.arange(len(truth))
    first = group_users(x, users, 4, seed=5, round_=0)
    previous = np.full(len(users), UNGROUPED)
    previous[users] = first
    # next round: the same tastes, new noise, clients arriving in another order
    x2, _ = planted(seed=2)
    x2 = x2 + 0.05 * np.random.default_rng(9).normal(size=x2.shape)
    perm = np.random.default_rng(4).permutation(len(users))
    second = group_users(x2[perm], users[perm], 4, seed=5, round_=1, previous=previous)
    assert np.array_equal(second, first[perm])  # each user keeps its id
    again = group_users(x2, users, 4, seed=5, round_=1, previous=previous)
    assert np.array_equal(again[perm], second)  # arrival order changes nothing


def test_hungarian_keeps_ids_and_fills_new_clusters_with_unused_ids():
    previous = np.array([0, 0, 1, 1, 2, UNGROUPED])
    # new raw clusters: 5 = users {0, 1} (was 0), 3 = users {2, 3} (was 1), 4 = {4, 5} (was 2 / none)
    ids = assign_ids(np.array([5, 5, 3, 3, 4, 4]), np.arange(6), previous, 4)
    assert ids.tolist() == [0, 0, 1, 1, 2, 2]
    # users 4 and 5 now form their own clusters: 4 keeps group 2, 5 (no overlap) takes unused 3
    ids = assign_ids(np.array([0, 0, 1, 1, 2, 3]), np.arange(6), previous, 4)
    assert ids.tolist() == [0, 0, 1, 1, 2, 3]


def test_few_participants_each_form_a_group():
    ids = group_users(np.ones((3, 5)), np.array([8, 2, 5]), 5)
    assert sorted(ids.tolist()) == [0, 1, 2] and ids.tolist() == [2, 0, 1]


def test_preprocessing():
    x = np.array([[1.0, 5.0, 2.0], [3.0, 5.0, 4.0], [5.0, 5.0, 9.0]])
    z = standardise(x)
    assert np.allclose(z.mean(0), 0) and np.allclose(z[:, [0, 2]].std(0), 1) and (z[:, 1] == 0).all()
    assert rbf_gamma(np.zeros((4, 2))) == 0.5  # all distances 0: m = 1
    assert rbf_gamma(np.array([[0.0], [2.0], [2.0]])) == pytest.approx(1 / (2 * 2.0 ** 2))  # non-zero median 2
    rng = np.random.default_rng(0)
    low_rank = standardise(rng.normal(size=(50, 2)) @ rng.normal(size=(2, 10)))
    assert reduce(low_rank).shape == (50, 2)


def test_keep_groups_keeps_ids_and_puts_new_clients_at_the_nearest_centroid():
    """model.gfmfr.regroup_every's rounds between groupings: known users keep their ids whatever
    their vectors now, new ones join the group whose known members' centroid is nearest, and
    with no known participant the caller must cluster (None)."""
    x, truth = planted(n_per_group=20, n_groups=3, seed=2)
    users = np.arange(len(truth)) * 2 + 1
    known = np.full(200, UNGROUPED, dtype=np.int64)
    new = np.arange(len(truth)) % 5 == 0  # one in five never grouped
    labels = (truth + 1) % 3  # ids that are not the raw planted labels
    known[users[~new]] = labels[~new]
    known[users[~new][0]] = 2 if labels[~new][0] != 2 else 0  # one known user in the "wrong" group: kept
    shuffled = np.random.default_rng(0).permutation(len(users))
    ids = keep_groups(x[shuffled], users[shuffled], known)
    assert np.array_equal(ids[~new[shuffled]], known[users[shuffled]][~new[shuffled]])
    assert np.array_equal(ids[new[shuffled]], labels[shuffled][new[shuffled]])
    everyone = known.copy()
    everyone[users[new]] = 0
    assert np.array_equal(keep_groups(x, users, everyone), everyone[users])  # no centroid needed
    assert keep_groups(x, users, np.full(200, UNGROUPED, dtype=np.int64)) is None
