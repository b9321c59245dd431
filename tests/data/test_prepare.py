"""The preparation protocol against its invariants and a textbook
per-user reference implementation."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pipeline.data.prepare import PrepareConfig, prepare
from pipeline.data.schema import DataError, Features, Interactions, RawDataset


def raw_from(user, item, ts, rating=None, split=None, features=None):
    return RawDataset("t", Interactions(np.asarray(user), np.asarray(item), np.asarray(ts),
                                        None if rating is None else np.asarray(rating, dtype=np.float32),
                                        None if split is None else np.asarray(split, dtype=np.int8)),
                      features=features)


def reference_split(user, item, ts, min_user, min_item):
    """Textbook version: dict of per-user chronological lists, loops everywhere."""
    first = {}
    for row, (u, i, t) in enumerate(zip(user, item, ts)):
        key = (u, i)
        if key not in first or (t, row) < first[key][:2]:
            first[key] = (t, row)
    rows = [(u, i, t, r) for (u, i), (t, r) in first.items()]
    min_user = max(min_user, 3)
    while True:
        uc, ic = {}, {}
        for u, i, _, _ in rows:
            uc[u] = uc.get(u, 0) + 1
            ic[i] = ic.get(i, 0) + 1
        kept = [x for x in rows if uc[x[0]] >= min_user and ic[x[1]] >= min_item]
        if len(kept) == len(rows):
            break
        rows = kept
    users = sorted({x[0] for x in rows})
    items = sorted({x[1] for x in rows})
    umap = {u: n for n, u in enumerate(users)}
    imap = {i: n for n, i in enumerate(items)}
    per_user = {}
    for u, i, t, r in rows:
        per_user.setdefault(umap[u], []).append((t, r, imap[i]))
    train, valid, test = {}, {}, {}
    for u, seq in per_user.items():
        seq.sort()
        test[u], valid[u] = seq[-1][2], seq[-2][2]
        train[u] = [x[2] for x in seq[:-2]]
    return users, items, train, valid, test


interaction_logs = st.integers(min_value=0, max_value=10_000).flatmap(
    lambda seed: st.tuples(st.just(seed), st.integers(20, 400), st.integers(2, 12), st.integers(2, 15),
                           st.integers(0, 5), st.integers(0, 5)))


@settings(max_examples=60, deadline=None)
@given(interaction_logs)
def test_split_matches_reference_and_invariants(params):
    seed, n, n_users, n_items, min_user, min_item = params
    rng = np.random.default_rng(seed)
    user = rng.integers(100, 100 + n_users, n) * 7  # sparse, non-contiguous ids
    item = rng.integers(0, n_items, n) * 3 + 5
    ts = rng.integers(0, 20, n)  # many timestamp ties
    raw = raw_from(user, item, ts)
    config = PrepareConfig(min_user=min_user, min_item=min_item)
    users, items, train, valid, test = reference_split(user.tolist(), item.tolist(), ts.tolist(), min_user, min_item)
    if not users:
        with pytest.raises(DataError):
            prepare(raw, config)
        return
    data = prepare(raw, config)
    assert data.user_ids.tolist() == users and data.item_ids.tolist() == items
    for u in range(data.n_users):
        got = data.train_items[data.train_indptr[u]:data.train_indptr[u + 1]].tolist()
        assert got == train[u]
        assert data.valid_item[u] == valid[u] and data.test_item[u] == test[u]
    # invariants
    assert (data.train_counts >= 1).all()
    pairs = np.concatenate([data.train_users * data.n_items + data.train_items,
                            np.arange(data.n_users) * data.n_items + data.valid_item,
                            np.arange(data.n_users) * data.n_items + data.test_item])
    assert np.unique(pairs).size == pairs.size
    last_train = np.maximum.reduceat(data.train_time, data.train_indptr[:-1])
    assert (data.valid_time >= last_train).all() and (data.test_time >= data.valid_time).all()
    # k-core on the prepared data is a no-op
    counts_u = data.train_counts + 2
    counts_i = np.bincount(np.concatenate([data.train_items, data.valid_item, data.test_item]),
                           minlength=data.n_items)
    assert counts_u.min() >= max(min_user, 3) and counts_i.min() >= min_item


def test_duplicates_and_repeats_are_counted():
    user = [1, 1, 1, 1, 1, 1]
    item = [10, 10, 11, 10, 12, 13]
    ts = [5, 5, 6, 7, 8, 9]  # row 1 exact duplicate of row 0; row 3 a later repeat of (1, 10)
    data = prepare(raw_from(user, item, ts), PrepareConfig(min_user=0, min_item=0))
    assert data.stats["dropped_exact_duplicates"] == 1
    assert data.stats["collapsed_repeated_pairs"] == 1
    assert data.train_items.tolist() == [0, 1] and data.valid_item[0] == 2 and data.test_item[0] == 3


def test_rating_threshold_and_implicit():
    user = [1] * 6
    item = [1, 2, 3, 4, 5, 6]
    rating = [5, 4, 3, 4, 5, 0]
    data = prepare(raw_from(user, item, range(6), rating=rating),
                   PrepareConfig(min_user=0, min_item=0, rating_threshold=4))
    assert data.item_ids.tolist() == [1, 2, 4, 5]
    all_ratings = prepare(raw_from(user, item, range(6), rating=rating), PrepareConfig(min_user=0, min_item=0))
    assert all_ratings.n_items == 5  # rating 0 is not an interaction
    with pytest.raises(DataError, match="no ratings"):
        prepare(raw_from(user, item, range(6)), PrepareConfig(rating_threshold=4))


def test_users_with_fewer_than_three_are_always_dropped():
    user = [1, 1, 2, 2, 2]
    data = prepare(raw_from(user, [1, 2, 1, 2, 3], range(5)), PrepareConfig(min_user=0, min_item=0))
    assert data.user_ids.tolist() == [2] and data.stats["dropped_users"] == 1


def test_predefined_split_is_used_as_is():
    user = [0, 0, 0, 0]
    item = [0, 1, 2, 3]
    ts = [1, 2, 3, 4]
    split = [0, 2, 0, 1]  # test is not the last interaction: honoured anyway
    data = prepare(raw_from(user, item, ts, split=split), PrepareConfig(min_user=5, min_item=5))
    assert data.test_item.tolist() == [1] and data.valid_item.tolist() == [3]
    assert data.train_items.tolist() == [0, 2]
    with pytest.raises(DataError, match="validation"):
        prepare(raw_from(user, item, ts, split=[0, 2, 0, 0]))


def test_features_follow_new_ids_normalised_and_mean_filled():
    user = [0, 0, 0, 1, 1, 1]
    item = [30, 10, 20, 30, 10, 40]  # item 40 has no feature row
    features = Features(np.array([10, 20, 30]), {"text": np.array([[3, 4], [0, 2], [1, 0]], dtype=np.float32)})
    data = prepare(raw_from(user, item, range(6), features=features), PrepareConfig(min_user=0, min_item=0))
    text = data.features["text"]
    assert data.item_ids.tolist() == [10, 20, 30, 40]
    np.testing.assert_allclose(text[:3], [[0.6, 0.8], [0, 1], [1, 0]], atol=1e-6)
    mean = np.array([0.6 + 0 + 1, 0.8 + 1 + 0]) / 3
    np.testing.assert_allclose(text[3], mean / np.linalg.norm(mean), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1, atol=1e-6)


def test_string_ids_remap_in_ascending_order():
    user = np.array(["b", "b", "b", "a", "a", "a"], dtype=object)
    item = np.array(["x", "y", "z", "z", "y", "x"], dtype=object)
    data = prepare(raw_from(user, item, range(6)), PrepareConfig(min_user=0, min_item=0))
    assert data.user_ids.tolist() == ["a", "b"] and data.item_ids.tolist() == ["x", "y", "z"]
    assert data.test_item.tolist() == [0, 2]


def test_identity_names_the_split_and_the_features():
    user, item = [0, 0, 0, 1, 1, 1], [30, 10, 20, 30, 10, 20]
    features = Features(np.array([10, 20, 30]), {"text": np.array([[3, 4], [0, 2], [1, 0]], dtype=np.float32)})
    config = PrepareConfig(min_user=0, min_item=0)
    data = prepare(raw_from(user, item, range(6), features=features), config)
    identity = data.identity()
    assert identity == {"name": data.name, "users": 2, "items": 3, "fingerprint": data.fingerprint(),
                        "features": data.features_fingerprint(), "skipped_rows_missing_fields": 0}
    assert data.mismatch(identity) is None
    # the same split with features changed in one value: same split fingerprint, other features
    other = prepare(raw_from(user, item, range(6), features=Features(
        np.array([10, 20, 30]), {"text": np.array([[3, 4], [0, 2], [1, 0.001]], dtype=np.float32)})), config)
    assert other.fingerprint() == data.fingerprint() and other.features_fingerprint() != data.features_fingerprint()
    assert "other item features" in other.mismatch(identity)
    bare = prepare(raw_from(user, item, range(6)), config)
    assert bare.features_fingerprint() is None and "other item features" in bare.mismatch(identity)
    # another split is named first; a block without features (older runs) is checked on the split
    assert "another preparation" in prepare(raw_from(user, item[::-1], range(6)), config).mismatch(identity)
    assert other.mismatch({k: v for k, v in identity.items() if k != "features"}) is None


def test_reencoding_is_the_same_recipe_with_other_bits():
    from pipeline.data.prepare import reencoding

    now = {"name": "d", "fingerprint": "split", "features": "bits-2", "features_recipe": "key-1"}
    assert reencoding({**now, "features": "bits-1"}, now)  # the same store encoded again
    assert reencoding({k: v for k, v in now.items() if k != "features_recipe"} | {"features": "bits-1"}, now)
    assert not reencoding(now, now)  # the same bits: nothing to accept
    assert not reencoding({**now, "features": "bits-1", "features_recipe": "key-2"}, now)  # another recipe
    assert not reencoding({**now, "features": "bits-1", "fingerprint": "other"}, now)  # another split
    assert not reencoding({**now, "features": "bits-1"}, {k: v for k, v in now.items() if k != "features_recipe"})
    assert not reencoding({k: v for k, v in now.items() if k != "features"}, now)  # made before the fingerprint
