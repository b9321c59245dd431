"""P1 evaluation negatives and training negatives."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import stats

from pipeline.data.negatives import (interacted_csr, sample_eval_negatives, sample_training_negatives,
                                     stream_uniform)
from pipeline.data.prepare import PrepareConfig, prepare
from pipeline.data.schema import Interactions, RawDataset


def random_dataset(seed, n_users=40, n_items=300, per_user=(3, 40)):
    rng = np.random.default_rng(seed)
    counts = rng.integers(*per_user, n_users)
    user = np.repeat(np.arange(n_users), counts)
    item = np.concatenate([rng.choice(n_items, c, replace=False) for c in counts])
    raw = RawDataset("r", Interactions(user, item, rng.integers(0, 1000, len(user))))
    return prepare(raw, PrepareConfig(min_user=0, min_item=0))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 1000), st.integers(120, 400))
def test_eval_negatives_properties(seed, n_items):
    data = random_dataset(seed, n_items=n_items, per_user=(3, 60))
    neg = sample_eval_negatives(data, seed=7)
    indptr, items = interacted_csr(data)
    for u in range(data.n_users):
        seen = set(items[indptr[u]:indptr[u + 1]].tolist())
        valid, test = neg.valid[u], neg.test[u]
        available = data.n_items - len(seen)
        assert neg.n_valid[u] == neg.n_test[u] == min(99, available)
        for row in (valid, test):
            drawn = row[row >= 0]
            assert len(set(drawn.tolist())) == drawn.size  # without replacement
            assert not seen & set(drawn.tolist())
        if available >= 198:
            assert not set(valid.tolist()) & set(test.tolist())


def test_eval_negatives_deterministic_and_seeded():
    data = random_dataset(1)
    a, b, c = sample_eval_negatives(data, 0), sample_eval_negatives(data, 0), sample_eval_negatives(data, 1)
    assert np.array_equal(a.valid, b.valid) and np.array_equal(a.test, b.test)
    assert not np.array_equal(a.valid, c.valid)
    assert a.fingerprint == data.fingerprint()


def test_eval_negatives_few_available_counted():
    # 120 items, a user with 30 interactions has 90 < 99 available
    data = random_dataset(3, n_users=10, n_items=120, per_user=(28, 31))
    neg = sample_eval_negatives(data, 0)
    assert neg.short_users == int(((120 - (data.train_counts + 2)) < 99).sum()) > 0
    assert ((neg.valid >= 0).sum(1) == neg.n_valid).all()


def test_eval_negatives_uniform():
    data = random_dataset(5, n_users=400, n_items=250, per_user=(3, 5))
    neg = sample_eval_negatives(data, 0)
    # for a fixed item, how often it is drawn, against how often it could have been
    counts = np.bincount(neg.valid[neg.valid >= 0], minlength=data.n_items)
    assert stats.chisquare(counts[counts > 0]).pvalue > 1e-4


def csr(lists):
    indptr = np.cumsum([0] + [len(x) for x in lists])
    return indptr, np.concatenate([np.sort(np.asarray(x, dtype=np.int64)) for x in lists] or [np.zeros(0, int)])


def test_training_negatives_never_positive_and_batch_independent():
    rng = np.random.default_rng(0)
    positives = [np.unique(rng.integers(0, 50, rng.integers(1, 40))) for _ in range(30)]
    users = np.arange(100, 130)
    indptr, items = csr(positives)
    draws = np.array([len(p) * 4 for p in positives])
    neg = sample_training_negatives(users, indptr, items, draws, 50, seed=3, round_=2, epoch=1)
    offsets = np.concatenate([[0], np.cumsum(draws)])
    for b, pos in enumerate(positives):
        mine = neg[offsets[b]:offsets[b + 1]]
        assert mine.size == draws[b] and not set(mine.tolist()) & set(pos.tolist())
        assert mine.min() >= 0 and mine.max() < 50
    # the same client alone, or in another batch order, gets the same negatives
    for b in (0, 7, 29):
        alone = sample_training_negatives(users[b:b + 1], *csr([positives[b]]), draws[b:b + 1], 50,
                                          seed=3, round_=2, epoch=1)
        assert np.array_equal(alone, neg[offsets[b]:offsets[b + 1]])
    # a new epoch, round or seed gives new draws
    other = sample_training_negatives(users, indptr, items, draws, 50, seed=3, round_=2, epoch=2)
    assert not np.array_equal(other, neg)


def test_training_negatives_uniform_over_allowed_items():
    excluded = [np.array([0, 1, 2, 7, 9])]
    neg = sample_training_negatives(np.array([4]), *csr(excluded), np.array([60_000]), 12,
                                    seed=0, round_=0, epoch=0)
    counts = np.bincount(neg, minlength=12)
    assert (counts[excluded[0]] == 0).all()
    allowed = np.setdiff1d(np.arange(12), excluded[0])
    assert stats.chisquare(counts[allowed]).pvalue > 1e-4


def test_training_negatives_universe_option():
    universe = np.array([2, 3, 5, 8, 13, 21])
    neg = sample_training_negatives(np.array([0, 1]), *csr([[3, 4, 21], [2]]), np.array([500, 500]), 30,
                                    seed=1, round_=0, epoch=0, universe=universe)
    assert set(neg[:500].tolist()) == {2, 5, 8, 13}
    assert set(neg[500:].tolist()) == {3, 5, 8, 13, 21}


def test_training_negatives_refuse_when_nothing_left():
    with pytest.raises(ValueError, match="no item left"):
        sample_training_negatives(np.array([0]), *csr([[0, 1, 2]]), np.array([1]), 3, seed=0, round_=0, epoch=0)


def test_stream_uniform_is_a_pure_function():
    a = stream_uniform(1, 2, 3, np.array([5, 6, 5]), np.array([0, 0, 0]))
    assert a[0] == a[2] and a[0] != a[1] and ((a >= 0) & (a < 1)).all()
