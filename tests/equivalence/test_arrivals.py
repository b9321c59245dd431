"""Dropouts and stragglers (pipeline/federated/strategy/arrivals.py): who arrives, that the round
aggregates exactly the arrived clients (the engine equals the oracle), and that a client that
did not arrive keeps its state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.federated.strategy.aggregate import round_users
from pipeline.federated.strategy.arrivals import arrivals
from test_equivalence import VARIANTS, engine_dense, make_config, max_diffs, run_engine, run_oracle, synthetic

ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """One torch thread (conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def data():
    return synthetic()


def train_options(*overrides):
    return load_config(None, list(overrides)).train


def test_sampled_users_split_into_arrived_dropped_and_late():
    users = np.arange(0, 2000, 2)
    counts = np.random.default_rng(0).integers(1, 100, 2000)
    train = train_options("train.dropout=0.3", "train.deadline=1.5", "train.speed_spread=0.5")
    split = arrivals(users, counts, train, 4)
    parts = np.concatenate([split.arrived, split.dropped, split.late])
    assert np.array_equal(np.sort(parts), users) and len(np.unique(parts)) == len(users)
    assert abs(len(split.dropped) / len(users) - 0.3) < 0.05
    assert 0 < len(split.late) < len(users) // 2
    again = arrivals(users, counts, train, 4)
    assert all(np.array_equal(a, b) for a, b in zip((split.arrived, split.dropped, split.late),
                                                     (again.arrived, again.dropped, again.late)))
    other = arrivals(users, counts, train, 5)
    assert not np.array_equal(split.dropped, other.dropped)
    # the dropouts do not depend on whether a deadline is set
    no_deadline = arrivals(users, counts, train_options("train.dropout=0.3"), 4)
    assert np.array_equal(no_deadline.dropped, split.dropped) and len(no_deadline.late) == 0


def test_without_speed_spread_the_deadline_cuts_the_largest_clients():
    users = np.arange(50)
    counts = np.arange(1, 51)
    split = arrivals(users, counts, train_options("train.deadline=1.2", "train.speed_spread=0"), 0)
    median = np.median(counts)
    assert np.array_equal(split.late, users[counts > 1.2 * median])
    assert np.array_equal(split.arrived, users[counts <= 1.2 * median])


def test_no_dropout_no_deadline_everyone_arrives():
    cfg = load_config(None, ["train.participation=0.5"])
    split = round_users(cfg, np.ones(40, dtype=np.int64), 3)
    assert len(split.arrived) == 20 and len(split.dropped) == 0 and len(split.late) == 0


@pytest.mark.parametrize("variant", ["fedavg", "fcf", "pfedrec-two_step", "fedrap-l1"])
def test_engine_matches_oracle_with_dropouts_and_a_deadline(data, variant):
    """The round aggregates the arrived clients only, weights normalised over them (FedAvg: by
    their rows), the same numbers as the one-client-at-a-time oracle."""
    backbone, *extra = VARIANTS[variant]
    cfg = make_config(backbone, "train.participation=0.8", "train.dropout=0.3", "train.deadline=1.5", *extra)
    splits = [round_users(cfg, data.train_counts, r) for r in range(3)]
    assert all(len(s.dropped) > 0 and len(s.late) > 0 for s in splits)
    shards, g = run_engine(cfg, data, 3, n_shards=2)
    oracle = run_oracle(cfg, data, 3)
    diffs = max_diffs(engine_dense(shards, g, data.n_items), oracle)
    assert max(diffs.values()) < ATOL, diffs
    everyone = run_oracle(make_config(backbone, "train.participation=0.8", *extra), data, 3)
    assert max((everyone.globals[k] - oracle.globals[k]).abs().max().item() for k in oracle.globals) > 1e-3


def test_a_client_that_did_not_arrive_keeps_its_state(data):
    backbone, *extra = VARIANTS["fedrap-l1"]
    cfg = make_config(backbone, "train.dropout=0.4", *extra)
    before_shards, before_g = run_engine(cfg, data, 1, n_shards=2)
    after_shards, after_g = run_engine(cfg, data, 2, n_shards=2)
    before = engine_dense(before_shards, before_g, data.n_items)
    after = engine_dense(after_shards, after_g, data.n_items)
    split = round_users(cfg, data.train_counts, 1)
    assert len(split.dropped) > 0 and len(split.arrived) > 0
    for user in split.dropped.tolist():
        for name, value in before.personal[user].items():
            assert torch.equal(value, after.personal[user][name]), (user, name)
    changed = [user for user in split.arrived.tolist()
               if any(not torch.equal(v, after.personal[user][k]) for k, v in before.personal[user].items())]
    assert changed == split.arrived.tolist()
